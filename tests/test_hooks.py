"""Hook points: names, exact values in every layout, padding, positions, writes, attention paths."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_hooks_reference import reference_activations, word_tokenizer

from microscope.errors import HookError, PromptError, UnknownHookError
from microscope.scope import Scope

ATOL = 1e-5


def padded_batch():
    """Three prompts of lengths 9, 5 and 7 (ids in [4, 90)), right-padded with id 1."""
    g = torch.Generator().manual_seed(3)
    lengths = [9, 5, 7]
    ids = torch.ones(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, 90, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def test_hook_names_follow_the_contract(layout):
    scope = Scope(tiny_model(layout))
    n = scope.config.num_hidden_layers
    per_layer = ["hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern",
                 "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post",
                 "hook_mlp_out", "hook_resid_post"]
    final = ["ln_final.hook_normalized"] if layout != "post_ln" else []
    expected = (["hook_embed", "hook_pos_embed"]
                + [f"blocks.{l}.{h}" for l in range(n) for h in per_layer] + final + ["hook_logits"])
    assert scope.hook_names == expected
    assert scope.resolve_names("blocks.*.hook_resid_post") == [f"blocks.{l}.hook_resid_post" for l in range(n)]
    assert scope.resolve_names(["hook_logits", "blocks.1.attn.hook_[qk]"]) == [
        "blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "hook_logits"]


def test_every_hook_equals_the_reference_on_a_padded_batch(layout):
    """All hooks at once (every layer on the eager pattern path) against the from-weights reference;
    padded positions are zeros in the cache; logits equal HF's own forward."""
    model = tiny_model(layout)
    scope = Scope(model)
    ids, mask = padded_batch()
    logits, cache = scope.run_with_cache(ids, attention_mask=mask)
    ref = reference_activations(model, ids, mask)
    assert list(cache) == scope.hook_names
    real = mask.bool()
    for name in scope.hook_names:
        got, want = cache[name], ref[name]
        assert got.shape == want.shape, name
        if name.endswith("hook_pattern"):                       # [b, h, q, k]: query axis is 2
            got, want = got.transpose(1, 2), want.transpose(1, 2)
        torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0, msg=name)
        assert not got[~real].any(), f"{name}: padded positions are not zeroed"
    hf_logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, hf_logits, atol=ATOL, rtol=0)


def test_hooks_match_hf_hidden_states_and_eager_attentions(layout, token_ids):
    model = tiny_model(layout)
    _, cache = Scope(model).run_with_cache(token_ids, names=["blocks.*.hook_resid_pre", "blocks.*.attn.hook_pattern"])
    model.set_attn_implementation("eager")
    out = model(input_ids=token_ids, output_hidden_states=True, output_attentions=True)
    for l in range(model.config.num_hidden_layers):
        torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_pre"], out.hidden_states[l], atol=ATOL, rtol=0)
        torch.testing.assert_close(cache[f"blocks.{l}.attn.hook_pattern"], out.attentions[l], atol=ATOL, rtol=0)


def test_hooks_match_plain_forward_hooks(layout, token_ids):
    """The MLP and attention outputs equal what a plain register_forward_hook on the module sees."""
    model = tiny_model(layout)
    seen = {}
    layer = model.model.decoder.layers[1]
    handles = [layer.fc1.register_forward_hook(lambda m, a, o: seen.__setitem__("pre", o)),
               layer.self_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o[0])),
               layer.register_forward_hook(lambda m, a, o: seen.__setitem__("post", o))]
    try:
        _, cache = Scope(model).run_with_cache(token_ids, names="blocks.1.*")
    finally:
        for h in handles:
            h.remove()
    B, T = token_ids.shape
    assert torch.equal(cache["blocks.1.mlp.hook_pre"], seen["pre"].view(B, T, -1))
    assert torch.equal(cache["blocks.1.hook_attn_out"], seen["attn"])
    assert torch.equal(cache["blocks.1.hook_resid_post"], seen["post"])


def test_padded_batch_equals_each_prompt_alone(layout):
    scope = Scope(tiny_model(layout))
    ids, mask = padded_batch()
    logits, cache = scope.run_with_cache(ids, attention_mask=mask, names=["blocks.*.hook_resid_post",
                                                                          "blocks.0.attn.hook_pattern"])
    for i, n in enumerate(mask.sum(1).tolist()):
        alone_logits, alone = scope.run_with_cache(ids[i:i + 1, :n], names=list(cache))
        torch.testing.assert_close(logits[i:i + 1, :n], alone_logits, atol=ATOL, rtol=0)
        for name in cache:
            got = cache[name][i:i + 1]
            got = got[:, :, :n, :n] if name.endswith("pattern") else got[:, :n]
            torch.testing.assert_close(got, alone[name], atol=ATOL, rtol=0, msg=name)


def test_residual_stream_identities(layout, token_ids):
    scope = Scope(tiny_model(layout))
    _, c = scope.run_with_cache(token_ids)
    n = scope.config.num_hidden_layers
    assert torch.equal(c["blocks.0.hook_resid_pre"], c["hook_embed"] + c["hook_pos_embed"])
    for l in range(n - 1):
        assert torch.equal(c[f"blocks.{l}.hook_resid_post"], c[f"blocks.{l + 1}.hook_resid_pre"])
    for l in range(n):
        b = f"blocks.{l}."
        stream = c[b + "hook_resid_pre"] + c[b + "hook_attn_out"]
        if layout == "post_ln":    # post-LN: resid_mid is after the attention sublayer's LayerNorm
            norm = scope.model.model.decoder.layers[l].self_attn_layer_norm
            stream = norm(stream)
        torch.testing.assert_close(c[b + "hook_resid_mid"], stream, atol=ATOL, rtol=0)
        heads = c.head_results(l)
        assert heads.shape[-2] == scope.config.num_attention_heads
        bias = scope.model.model.decoder.layers[l].self_attn.out_proj.bias
        torch.testing.assert_close(heads.sum(-2) + bias, c[b + "hook_attn_out"], atol=ATOL, rtol=0)


def test_positions_last_and_mask_select_rows(token_ids):
    scope = Scope(tiny_model("pre_ln"))
    ids, mask = padded_batch()
    names = ["blocks.1.hook_resid_post", "blocks.1.attn.hook_pattern"]
    _, full = scope.run_with_cache(ids, attention_mask=mask, names=names)
    _, last = scope.run_with_cache(ids, attention_mask=mask, names=names, positions="last")
    ends = mask.sum(1) - 1
    assert last.rows.tolist() == [[b, int(e)] for b, e in enumerate(ends)]
    torch.testing.assert_close(last[names[0]], full[names[0]][torch.arange(3), ends], atol=ATOL, rtol=0)
    torch.testing.assert_close(last[names[1]], full[names[1]][torch.arange(3), :, ends], atol=ATOL, rtol=0)
    wanted = torch.zeros_like(mask, dtype=torch.bool)
    wanted[:, 6] = True                                 # prompt 1 has only 5 tokens: no row for it
    _, some = scope.run_with_cache(ids, attention_mask=mask, names=names, positions=wanted)
    assert some.rows.tolist() == [[0, 6], [2, 6]]
    torch.testing.assert_close(some[names[0]], full[names[0]][[0, 2], 6], atol=ATOL, rtol=0)


def test_cache_dtype_and_repr(token_ids):
    scope = Scope(tiny_model("odd"))
    _, cache = scope.run_with_cache(token_ids, names="blocks.*.hook_resid_post", cache_dtype=torch.bfloat16)
    assert cache.stack("blocks.*.hook_resid_post").shape == (2, 3, 10, 36)
    assert cache["blocks.0.hook_resid_post"].dtype == torch.bfloat16
    assert "blocks.1.hook_resid_post: [3x10x36] bfloat16" in repr(cache)
    assert "<table>" in cache._repr_html_()
    with pytest.raises(UnknownHookError, match="did you mean blocks.1.hook_resid_post"):
        cache["blocks.1.hook_resid_pos"]


def test_only_layers_with_requested_patterns_take_the_eager_path(monkeypatch, token_ids):
    model = tiny_model("pre_ln")
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    scope = Scope(model)
    scope.run_with_cache(token_ids, names=["blocks.1.attn.hook_pattern"])
    assert len(calls) == model.config.num_hidden_layers - 1
    calls.clear()
    scope.run_with_cache(token_ids, names=["blocks.*.hook_z"])      # z needs no pattern: all sdpa
    assert len(calls) == model.config.num_hidden_layers
    assert all(layer.self_attn.config is model.config for layer in model.model.decoder.layers)


def test_writes_reach_the_models_computation(layout, token_ids):
    """A vector added at resid_mid reaches both the MLP input and the skip residual; the layer's
    output is recomputed here from the edited stream."""
    model = tiny_model(layout)
    scope = Scope(model)
    v = torch.randn(scope.config.hidden_size, generator=torch.Generator().manual_seed(5))
    _, clean = scope.run_with_cache(token_ids, names="blocks.1.*")
    with scope.hooks({"blocks.1.hook_resid_mid": lambda x, hook: x + v}):
        _, edited = scope.run_with_cache(token_ids, names="blocks.1.*")
    layer = model.model.decoder.layers[1]
    mid = clean["blocks.1.hook_resid_mid"] + v
    torch.testing.assert_close(edited["blocks.1.hook_resid_mid"], mid, atol=ATOL, rtol=0)
    with torch.no_grad():
        m_in = layer.final_layer_norm(mid) if layout != "post_ln" else mid
        out = mid + layer.fc2(layer.fc1(m_in).relu())
        if layout == "post_ln":
            out = layer.final_layer_norm(out)
    torch.testing.assert_close(edited["blocks.1.hook_resid_post"], out, atol=ATOL, rtol=0)


def test_hooks_are_removed_even_after_an_exception(token_ids):
    model = tiny_model("pre_ln")
    scope = Scope(model)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with scope.hooks({"blocks.*.hook_resid_post": boom, "blocks.0.attn.hook_pattern": boom}):
            scope.run(token_ids)
    leftovers = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert leftovers == []
    assert model.model.decoder.layers[0].self_attn.config is model.config
    torch.testing.assert_close(scope.run(token_ids), model(input_ids=token_ids).logits, atol=0, rtol=0)


def test_hook_sees_name_and_layer_and_bad_returns_are_refused(token_ids):
    scope = Scope(tiny_model("pre_ln"))
    seen = []
    with scope.hooks({"blocks.*.hook_mlp_out": lambda x, hook: seen.append((hook.name, hook.layer, x.shape))}):
        scope.run(token_ids)
    assert seen == [(f"blocks.{l}.hook_mlp_out", l, (3, 10, 32)) for l in range(3)]
    with pytest.raises(HookError, match="return None or a tensor of shape"):
        with scope.hooks({"blocks.0.hook_resid_pre": lambda x, hook: x[:, :1]}):
            scope.run(token_ids)


def test_unknown_hook_names_suggest_close_matches(layout):
    scope = Scope(tiny_model(layout))
    with pytest.raises(UnknownHookError, match="did you mean blocks.1.hook_resid_post"):
        scope.resolve_names("blocks.1.hook_resid_pots")
    with pytest.raises(UnknownHookError):
        scope.run_with_cache(torch.tensor([[5, 6]]), names=["blocks.9.*"])
    if layout == "post_ln":
        with pytest.raises(UnknownHookError, match="no final LayerNorm"):
            scope.resolve_names("ln_final.hook_normalized")


def test_prompt_errors_are_clear():
    scope = Scope(tiny_model("pre_ln"), word_tokenizer())
    ids, mask = scope.tokenize(["w5 w6 w7", "w8"])
    assert ids.tolist() == [[2, 5, 6, 7], [2, 8, 1, 1]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    with pytest.raises(PromptError, match="no prompts"):
        scope.tokenize([])
    with pytest.raises(PromptError, match="prompt 1 is empty"):
        scope.run_with_cache(["w5", ""])
    long_prompt = " ".join(["w9"] * 70)                 # the tiny context is 64 positions
    with pytest.raises(PromptError, match="71 tokens.*truncation=True"):
        scope.run_with_cache([long_prompt])
    ids, _ = scope.tokenize([long_prompt], truncation=True)
    assert ids.shape == (1, 64)
    with pytest.raises(PromptError, match="longer than the model context"):
        scope.run_with_cache(torch.full((1, 65), 5))
    text_logits, _ = scope.run_with_cache("w5 w6", names=[])
    id_logits, _ = scope.run_with_cache(torch.tensor([[2, 5, 6]]), names=[])
    assert torch.equal(text_logits, id_logits)


def test_lens_path_from_the_last_residual_gives_the_logits(layout, token_ids):
    """docs/hooks.md: pre-LN applies final LN then project_out; post-LN only project_out."""
    scope = Scope(tiny_model(layout))
    dec = scope.model.model.decoder
    logits, cache = scope.run_with_cache(token_ids, names="blocks.*.hook_resid_post")
    x = cache[f"blocks.{scope.config.num_hidden_layers - 1}.hook_resid_post"]
    with torch.no_grad():
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        if dec.project_out is not None:
            x = dec.project_out(x)
        torch.testing.assert_close(scope.model.lm_head(x), logits, atol=ATOL, rtol=0)
    assert (dec.final_layer_norm is None) == (layout == "post_ln")
