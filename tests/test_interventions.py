"""Interventions: ablation, steering and patching change exactly what they should."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from microscope.errors import HookError
from microscope.hooks.interventions import (ablate_heads, ablate_neurons, add_vector, patch_from,
                                            token_mean)
from microscope.scope import Scope

ATOL = 1e-5


def test_head_ablation_equals_manual_recomputation(layout, token_ids):
    """Zeroing head 2 of layer 1 equals replacing that layer's attention output by out_proj of z
    with the head's slice zeroed, which removes exactly that head's residual-stream write."""
    scope = Scope(tiny_model(layout))
    out_proj = scope.model.model.decoder.layers[1].self_attn.out_proj
    _, clean = scope.run_with_cache(token_ids, names=["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"])
    z = clean["blocks.1.attn.hook_z"].clone()
    z[:, :, 2] = 0
    with torch.no_grad():
        manual_attn_out = out_proj(z.flatten(-2))
    torch.testing.assert_close(manual_attn_out, clean["blocks.1.hook_attn_out"] - clean.head_results(1)[:, :, 2],
                               atol=ATOL, rtol=0)
    with torch.no_grad():
        want = scope.run(token_ids, hooks={"blocks.1.hook_attn_out": lambda x, hook: manual_attn_out})
    with torch.no_grad():
        got = scope.run(token_ids, hooks=ablate_heads({1: [2]}))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert not torch.allclose(got, scope.run(token_ids), atol=1e-4)


def test_mean_ablation_fills_the_token_mean(token_ids):
    scope = Scope(tiny_model("pre_ln"))
    _, ref = scope.run_with_cache(token_ids, names=["blocks.0.attn.hook_z", "blocks.2.mlp.hook_post"])
    hooks = {**ablate_heads([(0, 1), (0, 3)], mean_from=ref), **ablate_neurons({2: [7]}, mean_from=ref)}
    with scope.hooks(hooks):
        _, run = scope.run_with_cache(token_ids, names=list(ref))
    z_mean = ref["blocks.0.attn.hook_z"].flatten(0, 1).mean(0)
    assert torch.equal(run["blocks.0.attn.hook_z"][:, :, [1, 3]], z_mean[[1, 3]].expand(3, 10, 2, -1))
    torch.testing.assert_close(run["blocks.0.attn.hook_z"][:, :, [0, 2]], ref["blocks.0.attn.hook_z"][:, :, [0, 2]])
    post_mean = ref["blocks.2.mlp.hook_post"].flatten(0, 1).mean(0)[7]
    assert torch.all(run["blocks.2.mlp.hook_post"][:, :, 7] == post_mean)
    assert torch.equal(token_mean(ref, "blocks.2.mlp.hook_post")[7], post_mean)


def test_neuron_ablation_equals_manual_mlp(layout, token_ids):
    scope = Scope(tiny_model(layout))
    fc2 = scope.model.model.decoder.layers[0].fc2
    _, clean = scope.run_with_cache(token_ids, names="blocks.0.mlp.hook_post")
    post = clean["blocks.0.mlp.hook_post"].clone()
    post[:, :, [3, 50]] = 0
    with scope.hooks(ablate_neurons({0: [3, 50]})):
        _, run = scope.run_with_cache(token_ids, names="blocks.0.hook_mlp_out")
    with torch.no_grad():
        torch.testing.assert_close(run["blocks.0.hook_mlp_out"], fc2(post), atol=ATOL, rtol=0)


def test_zero_steering_vector_changes_nothing(layout, token_ids):
    scope = Scope(tiny_model(layout))
    plain = scope.run(token_ids)
    zero = torch.zeros(scope.config.hidden_size)
    steered = scope.run(token_ids, hooks=add_vector("blocks.*.hook_resid_*", zero, scale=3.0))
    assert torch.equal(plain, steered)


def test_steering_at_a_position_leaves_earlier_positions_alone(token_ids):
    scope = Scope(tiny_model("pre_ln"))
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    plain = scope.run(token_ids)
    with scope.hooks(add_vector("blocks.1.hook_resid_pre", v, positions=[6])):
        steered, cache = scope.run_with_cache(token_ids, names="blocks.1.hook_resid_pre")
    _, base = scope.run_with_cache(token_ids, names="blocks.1.hook_resid_pre")
    diff = cache["blocks.1.hook_resid_pre"] - base["blocks.1.hook_resid_pre"]
    torch.testing.assert_close(diff[:, 6], v.expand(3, -1), atol=ATOL, rtol=0)
    assert not diff[:, [0, 1, 2, 3, 4, 5, 7, 8, 9]].any()
    assert torch.equal(steered[:, :6], plain[:, :6])
    assert not torch.allclose(steered[:, 6:], plain[:, 6:], atol=1e-4)


def test_patching_a_whole_clean_cache_reproduces_clean_logits_exactly(layout, token_ids):
    scope = Scope(tiny_model(layout))
    corrupted = token_ids.flip(1)
    clean_logits, clean = scope.run_with_cache(token_ids)
    patched = scope.run(corrupted, hooks=patch_from(clean, "*"))
    assert torch.equal(patched, clean_logits)
    # the first residual alone carries everything downstream, bit for bit (same sdpa path both runs)
    clean_logits, first = scope.run_with_cache(token_ids, names="blocks.0.hook_resid_pre")
    assert torch.equal(scope.run(corrupted, hooks=patch_from(first, "blocks.0.hook_resid_pre")), clean_logits)


def test_patching_one_head_at_one_position(token_ids):
    scope = Scope(tiny_model("pre_ln"))
    corrupted = token_ids.flip(1)
    _, clean = scope.run_with_cache(token_ids, names="blocks.1.attn.hook_z")
    _, corrupt = scope.run_with_cache(corrupted, names="blocks.1.attn.hook_z")
    with scope.hooks(patch_from(clean, "blocks.1.attn.hook_z", positions=[4], heads=[1])):
        _, run = scope.run_with_cache(corrupted, names="blocks.1.attn.hook_z")
    want = corrupt["blocks.1.attn.hook_z"].clone()
    want[:, 4, 1] = clean["blocks.1.attn.hook_z"][:, 4, 1]
    assert torch.equal(run["blocks.1.attn.hook_z"], want)
    with pytest.raises(HookError, match="same batch size"):
        scope.run(corrupted[:, :5], hooks=patch_from(clean, "blocks.1.attn.hook_z"))
    with pytest.raises(HookError, match="per-head hooks"):
        scope.run(corrupted, hooks=patch_from(clean, "blocks.1.attn.hook_z", heads=[0]) |
                  patch_from(scope.run_with_cache(token_ids, names="hook_embed")[1], "hook_embed", heads=[0]))
