"""Controls: a claim clears its control only when it beats every control draw; the nulls are what
they say (fresh weights of the same shape, equal-norm directions, heads other than the claimed)."""

from __future__ import annotations

import pytest
import torch

import microscope
from microscope.analysis.controls import (Controlled, random_directions, random_heads, random_init_null,
                                          random_init_scopes, shuffled)
from tests.analysis_fixtures import single_thread  # noqa: F401 (autouse)
from tests.conftest import tiny_model


def test_a_claim_clears_only_above_the_controls_maximum():
    assert Controlled(3.0, (0.1, 0.5, 0.3), "null").clears
    assert not Controlled(0.4, (0.1, 0.5, 0.3), "null").clears      # beats the mean, not the max
    lower = Controlled(0.01, (0.2, 0.3, 0.25, 0.22, 0.28), "random directions", higher_is_claim=False)
    assert lower.clears and lower.headline("cost")["cost_control_min"] == 0.2
    head = Controlled(0.9, (0.1, 0.3, 0.2, 0.25, 0.15), "random init").headline("score")
    assert head == {"score": 0.9, "score_control": "random init", "score_control_draws": 5,
                    "score_control_mean": pytest.approx(0.2), "score_control_sd": pytest.approx(0.0791, abs=1e-4),
                    "score_control_max": 0.3, "score_control_gap_needed": pytest.approx(0.2249, abs=1e-3),
                    "score_clears_control": True}


def test_a_claim_needs_its_stated_margin_not_a_bare_greater_than():
    # the gap that used to clear: 0.0287 against a null whose maximum is 0.0279
    assert not Controlled(0.0287, (0.0251, 0.0279), "random init").clears
    assert Controlled(0.032, (0.0251, 0.0279, 0.0262, 0.0255, 0.0270), "random init", margin=0.0).clears
    assert Controlled(0.5, (0.0251, 0.0279), "random init").clears
    # near zero a relative margin means nothing: the claim states an absolute one in its units
    tiny = Controlled(1e-5, (0.0, 0.0), "random init", min_gap=0.01)
    assert not tiny.clears and tiny.gap_needed == 0.01
    lower = Controlled(0.28, (0.3, 0.4), "random heads", higher_is_claim=False)
    assert not lower.clears                                          # 0.02 below, needs 0.03


def test_a_claim_must_lie_where_one_more_draw_of_the_null_rarely_lands():
    # past the max of two draws by the margin, but two draws say little about where a third lands
    few = Controlled(1.0, (-0.5, 0.8), "random init")
    assert few.value - few.extreme > few.margin * 1.0 and not few.clears
    assert few.prediction_bound > 10                  # t(1 dof, 99%) = 31.8 times the spread
    many = Controlled(1.0, (-0.5, 0.8, 0.1, 0.0, -0.2, 0.3, 0.2, -0.1, 0.05, 0.15), "random init")
    assert many.prediction_bound < 1.1 and Controlled(1.2, many.null, "random init").clears
    # an outlying draw past the bound: the max is the bar, the bound adds nothing past it
    outlier = Controlled(150.0, (0.0,) * 19 + (100.0,), "random heads")
    assert outlier.prediction_bound < 100.0 and outlier.gap_needed == pytest.approx(15.0) and outlier.clears
    # a null of one value is a fixed reference (a chance level): the margins alone apply
    assert Controlled(0.5, (0.25,), "chance").clears and Controlled(0.5, (0.25,), "chance").spread == 0.0
    # false positives on exchangeable normal draws: about `level`, whatever the number of draws
    rng = torch.Generator().manual_seed(0)
    for n in (2, 5):
        draws = torch.randn(4000, n + 1, generator=rng).tolist()
        rate = sum(Controlled(d[0], d[1:], "null", margin=0.0).clears for d in draws) / len(draws)
        assert rate < 0.02


def test_random_init_models_share_the_shape_but_not_the_weights():
    scope = microscope.load(tiny_model("post_ln", seed=7))
    nulls = list(random_init_scopes(scope, seeds=(0, 1)))
    for null in nulls:
        assert null.model.config.to_dict() == scope.model.config.to_dict()
        assert null.tokenizer is scope.tokenizer
    w = [s.model.lm_head.weight for s in (scope, *nulls)]
    assert not torch.equal(w[1], w[2]) and not torch.equal(w[0], w[1])
    again = random_init_null(scope, lambda s: float(s.model.lm_head.weight.sum()), seeds=(0, 1))
    assert again == [float(w[1].sum()), float(w[2].sum())]     # seeded: reproducible


def test_random_heads_avoid_the_claimed_ones_and_directions_keep_the_norm():
    heads = random_heads(3, 4, 5, exclude=[(0, 0), (2, 3)], seed=1)
    assert len(set(heads)) == 5 and not {(0, 0), (2, 3)} & set(heads)
    with pytest.raises(microscope.errors.AnalysisInputError):
        random_heads(1, 2, 2, exclude=[(0, 0)])
    v = torch.tensor([3.0, 4.0, 0.0])
    d = random_directions(v, 20, seed=0)
    torch.testing.assert_close(d.norm(dim=-1), torch.full((20,), 5.0))
    assert sorted(shuffled([0, 0, 1, 1, 1], seed=3)) == [0, 0, 1, 1, 1]
