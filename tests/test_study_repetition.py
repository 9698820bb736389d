"""The repetition study names the heads the organism's card names, from the weights alone, on the
organism and (blind) on its sibling; each claim is reported beside its control, reaches the
verdict the card's own control reaches, and the control, run as if it were the model, does not
pass the claim.
"""

from __future__ import annotations

import json

import pytest
import torch
from study_fixtures import ORGANISM, SIBLING, card, load, needs_organism, one_thread, random_organism  # noqa: F401

from microscope.analysis.studies import run_repetition
from microscope.hooks.interventions import ablate_heads_by, resample_heads

pytestmark = needs_organism
MODELS = [pytest.param(ORGANISM, id="organism"),
          pytest.param(SIBLING, id="sibling", marks=pytest.mark.skipif(
              not (SIBLING / "weights" / "config.json").exists(), reason="the sibling organism is not shipped"))]


@pytest.fixture(scope="module", params=MODELS)
def run(request) -> tuple:
    """(result, summary, card) of one model: the organism, then blind, its sibling."""
    result = run_repetition(load(request.param), "organism_v2/repetition", neutral="organism_v2/neutral")
    return result, result.summary(), card(request.param)


@pytest.fixture(scope="module")
def control() -> dict:
    """The study run on a random-init model (seed outside the null) as if it were the model."""
    return run_repetition(random_organism(), "organism_v2/repetition", neutral="organism_v2/neutral", n_prompts=48, n_random_half_loss=5).summary()


def _verdict_agrees(study_clears: bool, value: float, control_max: float, margin: float = 0.1) -> None:
    """The study never claims what the card's own rule rejects (value above its random-head
    control's max, by ``margin`` relative). The study's rule is the stricter one (past the max by a
    margin and past the bound of one more draw, `Controlled`), so a card's pass may be its miss."""
    if value <= control_max * (1 + margin):
        assert not study_clears, (value, control_max)


def test_the_heads_named_are_the_cards(run):
    _, summary, truth = run
    heads = truth["heads"]
    assert sorted(summary["induction_heads"]) == sorted(heads["induction_head_labels"])
    assert sorted(summary["previous_token_heads"]) == sorted(heads["previous_token_head_labels"])


def test_head_scores_match_the_card_and_stand_beside_the_random_init_null(run):
    _, summary, truth = run
    # general induction: whole-vocabulary spans (other draws than the card's), same definition
    assert summary["top_induction_score"] == pytest.approx(truth["heads"]["top_induction_score"], abs=0.1)
    for kind in ("induction", "previous_token"):
        assert summary[f"top_{kind}_score_control"].startswith("random init x5")
        assert summary[f"{kind}_threshold"] > summary[f"top_{kind}_score_control_max"]
    if summary["induction_heads"]:
        assert summary["top_induction_score_clears_control"]


def test_the_organism_has_induction_heads_to_find(run):
    _, summary, truth = run
    if not truth["heads"]["induction_head_labels"]:
        pytest.skip("a model whose card names no induction head")
    assert summary["induction_heads"] and summary["reinforcement_ratio"] > 5


def test_the_control_names_no_heads(control):
    assert control["induction_heads"] == [] and control["previous_token_heads"] == []
    assert control["reinforcement_ratio"] < 1.1
    # with nothing named there is nothing to ablate: no "loops broken" claim is made at all
    assert control["loops_broken"] is None and "loops_broken_clears_control" not in control


def test_loops_broken_beside_random_heads_as_the_card_measures_them(run):
    """Zero, mean and resample ablation are each reported beside as many random other heads; the
    zero-ablation number and its verdict agree with the card's (plain HF, its own random draws)."""
    result, summary, truth = run
    if not summary["induction_heads"]:
        assert summary["loops_broken"] is None
        return
    rep = truth["repetition"]
    for method, key in (("zero", "loops_broken"), ("mean", "loops_broken_mean_ablation"),
                        ("resample", "loops_broken_resample_ablation")):
        assert len(result.random_broken[method]) >= 5 and f"{key}_control_max" in summary
    assert summary["loops_broken"] == pytest.approx(rep["loops_broken_induction_ablated"], abs=0.15)
    _verdict_agrees(summary["loops_broken_clears_control"], rep["loops_broken_induction_ablated"],
                    rep["loops_broken_random_heads_ablated_max"])


def test_the_repeated_half_loss_beside_random_heads_as_the_card_measures_it(run):
    _, summary, truth = run
    heads = truth["heads"]
    if not summary["induction_heads"]:
        return
    card_increase = heads["repeated_half_loss_induction_ablated"] - heads["repeated_half_loss"]
    assert summary["repeated_half_loss_increase"] == pytest.approx(card_increase, rel=0.3)
    assert summary["repeated_half_loss_increase_vs_random_init_clears_control"]
    _verdict_agrees(summary["repeated_half_loss_increase_clears_control"], heads["repeated_half_loss_induction_ablated"],
                    heads["repeated_half_loss_random_heads_ablated_max"])


def test_the_loop_rate_matches_the_card(run):
    # the same definition (the last 32 tokens periodic with a period <= 16), measured apart
    _, summary, truth = run
    assert summary["loop_rate"] == pytest.approx(truth["repetition"]["loop_rate"], abs=0.02)


def test_resample_ablation_draws_from_the_reference_tokens():
    """Each resampled head output is one of the reference's outputs of that head (never a mix),
    fresh draws on every call; other heads are untouched."""
    scope = random_organism()
    ref_ids = torch.randint(4, 200, (2, 6))
    _, ref = scope.run_with_cache(ref_ids, names=["blocks.1.attn.hook_z"])
    pool = ref["blocks.1.attn.hook_z"].flatten(0, 1)[:, 2]        # [tokens, d_head]
    seen = []

    def grab(x, hook):
        seen.append(x.clone())
    ids = torch.randint(4, 200, (3, 5))
    hooks = resample_heads({1: [2]}, ref, seed=0)
    for _ in range(2):
        with scope.hooks(hooks), scope.hooks({"blocks.1.attn.hook_z": grab}):
            scope.run(ids)
    z = seen[0]
    assert not torch.equal(seen[0], seen[1])
    for row in z[:, :, 2].flatten(0, 1):
        assert (row[None] == pool).all(-1).any()
    _, clean = scope.run_with_cache(ids, names=["blocks.1.attn.hook_z"])
    torch.testing.assert_close(z[:, :, [0, 1, 3]], clean["blocks.1.attn.hook_z"][:, :, [0, 1, 3]])
    with pytest.raises(Exception, match="reference"):
        ablate_heads_by([(1, 2)], "mean")


def test_the_result_gives_a_frame_figures_and_a_json_summary(run):
    result, summary, _ = run
    assert len(result.to_frame()) == len(result.prompts)
    figures = result.figures()
    assert figures and all(fig.data for fig in figures)
    json.dumps(summary)
