"""Activation patching and its gradient estimate: zero where nothing differs, exact where
everything is patched, and batched patches equal to one-at-a-time runs."""

from __future__ import annotations

import pytest
import torch

import microscope
from microscope.analysis.attribution_patching import attribution_patching, patching_agreement
from microscope.analysis.patching import (SITES, activation_patching, logit_diff, run_patched,
                                          symmetric_corruption)
from microscope.errors import AnalysisInputError
from microscope.names import act_name
from tests.analysis_fixtures import single_thread  # noqa: F401 (autouse)
from tests.conftest import tiny_model

ANSWER, WRONG = 5, 7


@pytest.fixture(params=["pre_ln", "post_ln"])
def scope(request):
    return microscope.load(tiny_model(request.param))


@pytest.fixture
def clean(token_ids) -> torch.Tensor:
    """Prompts that mention the answer token (or the wrong one) so symmetric corruption applies."""
    ids = token_ids.clone()
    ids[:, 2] = torch.tensor([ANSWER, WRONG, ANSWER])
    ids[:, 6] = torch.tensor([WRONG, ANSWER, 30])
    return ids


def test_symmetric_corruption_swaps_the_answer_and_the_wrong_token(clean):
    corrupt = symmetric_corruption(clean, torch.full((3,), ANSWER), torch.full((3,), WRONG))
    assert corrupt[:, 2].tolist() == [WRONG, ANSWER, WRONG]
    assert corrupt[:, 6].tolist() == [ANSWER, WRONG, 30]
    swapped = (clean == ANSWER) | (clean == WRONG)
    assert torch.equal(corrupt[swapped], ANSWER + WRONG - clean[swapped])
    assert torch.equal(corrupt[~swapped], clean[~swapped])
    with pytest.raises(AnalysisInputError, match="corrupted="):
        symmetric_corruption(clean, torch.full((3,), 80), torch.full((3,), 81))


@pytest.mark.parametrize("site", list(SITES))
@pytest.mark.parametrize("mode", ["denoising", "noising"])
def test_patching_between_identical_runs_has_zero_effect(scope, clean, site, mode):
    result = activation_patching(scope, clean, clean, answer=ANSWER, wrong=WRONG, site=site, mode=mode)
    assert result.effects.abs().max() < 1e-5
    assert torch.allclose(result.base_metric, result.source_metric)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_patching_every_position_of_a_residual_recovers_the_clean_logits(scope, clean, layer):
    corrupt = symmetric_corruption(clean, torch.full((3,), ANSWER), torch.full((3,), WRONG))
    mask = torch.ones_like(clean)
    names = [f"blocks.{layer}.hook_resid_pre"]
    clean_logits, cache = scope.run_with_cache(clean, names=names)
    patched = run_patched(scope, corrupt, cache, names, attention_mask=mask)
    torch.testing.assert_close(patched, clean_logits, atol=1e-5, rtol=1e-5)
    unpatched = scope.run(corrupt, attention_mask=mask)
    assert (unpatched - clean_logits).abs().max() > 1e-3  # the corruption does change the output


def test_patching_every_head_and_mlp_output_recovers_the_clean_logits(scope, clean):
    corrupt = symmetric_corruption(clean, torch.full((3,), ANSWER), torch.full((3,), WRONG))
    names = [f"blocks.{l}.{p}" for l in range(3) for p in ("attn.hook_z", "hook_mlp_out")]
    clean_logits, cache = scope.run_with_cache(clean, names=names + ["hook_embed"])
    # embeddings differ too: patch them as well, then every write to the residual is clean
    patched = run_patched(scope, corrupt, cache, names + ["hook_embed"], attention_mask=torch.ones_like(clean))
    torch.testing.assert_close(patched, clean_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("site,mode", [("resid_pre", "denoising"), ("heads", "noising"), ("mlp_out", "denoising")])
def test_batched_patching_equals_patching_one_site_at_a_time(scope, clean, site, mode):
    result = activation_patching(scope, clean, answer=ANSWER, wrong=WRONG, site=site, mode=mode, max_rows=7)
    corrupt = result.corrupted_ids
    base, source = (corrupt, clean) if mode == "denoising" else (clean, corrupt)
    mask, last = torch.ones_like(clean), torch.full((3,), clean.shape[1] - 1)
    answer, wrong = torch.full((3,), ANSWER), torch.full((3,), WRONG)
    with torch.no_grad():
        base_metric = logit_diff(scope.run(base, attention_mask=mask), last, answer, wrong)
    for layer, index in [(0, 2), (1, 3), (2, 1)]:
        name = act_name(SITES[site], layer)
        _, cache = scope.run_with_cache(source, names=[name])

        def paste_one(act, hook, index=index):
            out = act.clone()
            if site == "heads":
                out[:, :, index] = cache[name][:, :, index]
            else:
                out[:, index] = cache[name][:, index]
            return out
        with torch.no_grad(), scope.hooks({name: paste_one}):
            single = logit_diff(scope.run(base, attention_mask=mask), last, answer, wrong) - base_metric
        torch.testing.assert_close(result.effects[:, layer, index], single, atol=1e-5, rtol=1e-4)


def test_the_normalized_effect_of_the_final_residual_at_the_last_token_is_one(scope, clean):
    result = activation_patching(scope, clean, answer=ANSWER, wrong=WRONG, site="resid_post")
    torch.testing.assert_close(result.normalized[-1, -1], torch.tensor(1.0), atol=1e-4, rtol=1e-4)
    assert result.normalized[-1, :-1].abs().max() < 1e-5  # later layers: only the read position matters
    frame = result.to_frame()
    assert len(frame) == 3 * clean.shape[1] and {"layer", "position", "token", "normalized"} <= set(frame)


def test_corrupted_prompts_of_another_length_are_refused(scope, clean):
    with pytest.raises(AnalysisInputError, match="same token lengths"):
        activation_patching(scope, clean, clean[:, :-1], answer=ANSWER, wrong=WRONG)


@pytest.mark.parametrize("mode", ["denoising", "noising"])
def test_attribution_patching_agrees_in_sign_with_activation_patching_on_the_strongest_heads(scope, clean, mode):
    activation = activation_patching(scope, clean, answer=ANSWER, wrong=WRONG, site="heads", mode=mode)
    attribution = attribution_patching(scope, clean, answer=ANSWER, wrong=WRONG, site="heads", mode=mode)
    assert attribution.effect.shape == activation.effect.shape
    agreement = patching_agreement(activation, attribution, top_k=3)
    assert agreement.sign_agreement == 1.0
    assert agreement.pearson > 0.9
    assert all(p.requires_grad for p in scope.model.parameters())  # left as found


def test_attribution_patching_is_exact_on_the_final_residual_of_a_post_ln_model(clean):
    """After the last block only project_out and lm_head follow (linear): first order is exact."""
    scope = microscope.load(tiny_model("post_ln"))
    activation = activation_patching(scope, clean, answer=ANSWER, wrong=WRONG, site="resid_post")
    attribution = attribution_patching(scope, clean, answer=ANSWER, wrong=WRONG, site="resid_post")
    torch.testing.assert_close(attribution.effects[:, -1], activation.effects[:, -1], atol=1e-4, rtol=1e-4)
