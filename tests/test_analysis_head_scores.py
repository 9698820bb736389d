"""Head scores find heads planted by construction and stay near chance on random models."""

from __future__ import annotations

import pytest
import torch

import microscope
from microscope.analysis.head_scores import (copying_scores, pattern_head_scores, pattern_targets,
                                             repeated_random_tokens)
from tests.analysis_fixtures import single_thread  # noqa: F401 (autouse)
from tests.conftest import LAYOUTS, tiny_model


def previous_token_model():
    """post-LN (no LayerNorm before layer 0's attention): positions are one-hot in residual dims
    0..31, tokens write nothing there, and head 0 of layer 0 has q(p) = 30 e_{p-1}, k(p) = e_p."""
    model = tiny_model("post_ln", hidden_size=64, num_attention_heads=2)
    d_head = 32
    with torch.no_grad():
        dec = model.model.decoder
        dec.embed_positions.weight.zero_()
        for p in range(d_head):
            dec.embed_positions.weight[p + 2, p] = 1.0  # OPT's learned positions are offset by 2
        dec.project_in.weight[:d_head].zero_()
        attn = dec.layers[0].self_attn
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight[:d_head].zero_()
            proj.bias[:d_head].zero_()
        attn.k_proj.weight[:d_head, :d_head] = torch.eye(d_head)
        attn.q_proj.weight[:d_head - 1, 1:d_head] = 30.0 * d_head ** 0.5 * torch.eye(d_head - 1)  # undo 1/sqrt(d)
    return model


def test_targets_of_each_score_on_a_hand_made_sequence():
    ids = torch.tensor([[9, 4, 5, 4, 5]])
    mask = torch.ones_like(ids)
    prev = pattern_targets(ids, mask, "previous_token")[0]
    dup = pattern_targets(ids, mask, "duplicate_token")[0]
    ind = pattern_targets(ids, mask, "induction")[0]
    assert prev.nonzero().tolist() == [[1, 0], [2, 1], [3, 2], [4, 3]]
    assert dup.nonzero().tolist() == [[3, 1], [4, 2]]
    assert ind.nonzero().tolist() == [[3, 2], [4, 3]]  # token 4 at q=3 was at 1: look at 2; 5 at q=4: look at 3


def test_a_planted_previous_token_head_scores_one_and_only_it():
    scope = microscope.load(previous_token_model())
    scores = pattern_head_scores(scope, repeated_random_tokens(scope, span=12))
    prev = scores["previous_token"]
    assert prev.scores[0, 0] > 0.99
    others = torch.cat([prev.scores[0, 1:], prev.scores[1:].flatten()])
    assert others.max() < 3 * prev.chance
    assert prev.top(1).iloc[0][["layer", "head"]].tolist() == [0, 0]
    assert scores["induction"].scores[0, 0] < scores["induction"].chance  # it attends elsewhere
    summary = prev.summary()
    assert summary["named_heads"] == "L0H0" and summary["top_score_clears_control"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_random_models_name_no_head_and_their_top_head_does_not_clear_chance(layout):
    scope = microscope.load(tiny_model(layout))
    for kind, result in pattern_head_scores(scope).items():
        summary = result.summary()
        assert summary["named_heads"] == "none", kind
        assert summary["top_score_clears_control"] is False, kind
        assert summary["top_score_control"] == "uniform attention (chance)"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_random_models_score_near_chance(layout):
    scope = microscope.load(tiny_model(layout))
    for kind, result in pattern_head_scores(scope).items():
        assert result.scores.max() < 2 * result.chance, kind
        assert result.scores.mean() == pytest.approx(result.chance, rel=0.5), kind
    copying = copying_scores(scope)
    assert copying.scores.max() < 4 * copying.chance


def test_an_identity_ov_circuit_is_a_copying_head():
    """pre-LN, one 32-wide head with W_V = W_O = I and unit LayerNorms: the head writes the
    normalised token embedding, whose own (tied) unembedding is its top logit."""
    model = tiny_model("pre_ln", num_attention_heads=1)
    with torch.no_grad():
        layer = model.model.decoder.layers[1]
        layer.self_attn.v_proj.weight.copy_(torch.eye(32))
        layer.self_attn.out_proj.weight.copy_(torch.eye(32))
        for ln in (layer.self_attn_layer_norm, model.model.decoder.final_layer_norm):
            ln.weight.fill_(1.0)
            ln.bias.zero_()
    result = copying_scores(microscope.load(model), top_k=1)
    assert result.scores[1, 0] > 0.9
    assert result.scores[[0, 2], 0].max() < 0.2
