"""Logit lens and direct logit attribution are exact where they must be, in every OPT layout."""

from __future__ import annotations

import pytest
import torch

import microscope
from microscope.analysis.attribution import direct_logit_attribution
from microscope.analysis.lens import logit_lens, residual_points
from microscope.models.anatomy import unembed
from tests.analysis_fixtures import single_thread  # noqa: F401 (autouse)
from tests.conftest import LAYOUTS, tiny_model


@pytest.fixture(params=LAYOUTS)
def scope(request):
    return microscope.load(tiny_model(request.param))


def test_the_lens_at_the_last_block_is_the_models_own_logits(scope, token_ids):
    result = logit_lens(scope, token_ids)
    reference = scope.model(input_ids=token_ids).logits
    assert result.points[-1] == f"blocks.{scope.model.config.num_hidden_layers - 1}.hook_resid_post"
    torch.testing.assert_close(result.logits[-1], reference, atol=1e-5, rtol=1e-5)


def test_the_lens_reads_every_block_through_the_final_path_of_its_layout(scope, token_ids):
    """Reference: HF's own modules applied to the block outputs recorded by forward hooks."""
    outputs = []
    handles = [layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
               for layer in scope.model.model.decoder.layers]
    with torch.no_grad():
        scope.model(input_ids=token_ids)
    for h in handles:
        h.remove()
    dec = scope.model.model.decoder
    assert (dec.final_layer_norm is None) == (not scope.model.config.do_layer_norm_before)
    result = logit_lens(scope, token_ids)
    for l, hidden in enumerate(outputs):
        x = dec.final_layer_norm(hidden) if dec.final_layer_norm is not None else hidden
        x = dec.project_out(x) if dec.project_out is not None else x
        torch.testing.assert_close(result.logits[1 + l], scope.model.lm_head(x), atol=1e-5, rtol=1e-5)


def test_the_lens_at_the_last_token_of_padded_prompts_matches_each_prompts_own_run(scope, token_ids):
    mask = torch.ones_like(token_ids)
    mask[1, 6:] = 0
    result = logit_lens(scope, token_ids, position="last", attention_mask=mask)
    alone = scope.model(input_ids=token_ids[1:2, :6]).logits[0, -1]
    torch.testing.assert_close(result.logits[-1, 1, 0], alone, atol=1e-4, rtol=1e-4)
    assert result.positions[:, 0].tolist() == [9, 5, 9]
    assert len(result.to_frame()) == len(residual_points(scope)) * 3


@pytest.mark.parametrize("baseline", [None, 7])
def test_direct_logit_attribution_components_sum_to_the_logit(scope, token_ids, baseline):
    targets = torch.tensor([5, 11, 40])
    result = direct_logit_attribution(scope, token_ids, targets, baseline=baseline)
    logits = scope.model(input_ids=token_ids).logits[:, -1]
    expected = logits[torch.arange(3), targets] - (logits[:, baseline] if baseline is not None else 0)
    torch.testing.assert_close(result.metric, expected.detach(), atol=1e-5, rtol=1e-5)
    assert (result.total() - expected).abs().max() < 1e-4


def test_attribution_at_an_inner_position_of_a_padded_batch_sums_to_that_logit(scope, token_ids):
    mask = torch.ones_like(token_ids)
    mask[0, 7:] = 0
    result = direct_logit_attribution(scope, token_ids, 3, position=-2, attention_mask=mask)
    logits = scope.model(input_ids=token_ids, attention_mask=mask).logits
    expected = logits[torch.arange(3), torch.tensor([5, 8, 8]), 3]
    assert (result.total() - expected).abs().max() < 1e-4


def test_neurons_heads_and_bias_terms_are_the_parts_of_each_layer(scope, token_ids):
    result = direct_logit_attribution(scope, token_ids, 5)
    cfg = scope.model.config
    for l in range(cfg.num_hidden_layers):
        torch.testing.assert_close(result.neurons[:, l].sum(-1), result.component(f"L{l}.mlp"))
        for h in range(cfg.num_attention_heads):
            torch.testing.assert_close(result.heads[:, l, h], result.component(f"L{l}H{h}"))
    layer_norm_terms = [c for c in result.components if "ln_" in c]
    if cfg.do_layer_norm_before:
        assert layer_norm_terms == ["ln_final.bias"]
    else:  # post-LN: both LayerNorms of every block sit on the residual path
        assert len(layer_norm_terms) == 2 * cfg.num_hidden_layers


def test_attribution_of_an_embedding_only_model_is_all_embedding(token_ids):
    """With every block's writes zeroed, the logit is embeddings + final LN bias only."""
    model = tiny_model("pre_ln")
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.self_attn.out_proj.weight.zero_(); layer.self_attn.out_proj.bias.zero_()
            layer.fc2.weight.zero_(); layer.fc2.bias.zero_()
    result = direct_logit_attribution(microscope.load(model), token_ids, 5)
    blocks = [c for c in result.components if c.startswith("L")]
    assert result.values[:, [result.components.index(c) for c in blocks]].abs().max() < 1e-6
    embed_only = result.component("embed") + result.component("pos_embed") + result.component("ln_final.bias")
    assert (embed_only - result.metric).abs().max() < 1e-4


def test_unembed_rejects_nothing_and_a_bad_token_is_a_clear_error(scope, token_ids):
    from microscope.errors import AnalysisInputError
    with pytest.raises(AnalysisInputError, match="outside the vocabulary"):
        direct_logit_attribution(scope, token_ids, 10_000)
    assert unembed(scope.model, torch.zeros(2, scope.model.config.hidden_size)).shape == (2, scope.model.config.vocab_size)
