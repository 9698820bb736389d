"""The repetition study names the heads the organism's card names, from the weights alone, on the
organism and (blind) on its sibling; each claim clears its control, and the control, run as if it
were the model, does not pass the claim.
"""

from __future__ import annotations

import json

import pytest
import torch
from study_fixtures import SIBLING, card, load, needs_organism, needs_sibling, one_thread, random_organism  # noqa: F401

from microscope.analysis.studies import run_repetition
from microscope.hooks.interventions import ablate_heads_by, resample_heads

pytestmark = needs_organism


@pytest.fixture(scope="module")
def result():
    return run_repetition(load())


@pytest.fixture(scope="module")
def summary(result) -> dict:
    return result.summary()


@pytest.fixture(scope="module")
def truth() -> dict:
    return card()


@pytest.fixture(scope="module")
def control():
    """The study run on a random-init model (seed outside the null) as if it were the model."""
    return run_repetition(random_organism(), n_prompts=48, n_random_half_loss=5).summary()


def test_the_heads_named_are_the_cards(summary, truth):
    heads = truth["heads"]
    assert heads["induction_head_labels"] and heads["previous_token_head_labels"]
    assert sorted(summary["induction_heads"]) == sorted(heads["induction_head_labels"])
    assert sorted(summary["previous_token_heads"]) == sorted(heads["previous_token_head_labels"])


def test_head_scores_clear_the_random_init_null_and_match_the_card(summary, truth):
    for kind in ("induction", "previous_token"):
        assert summary[f"top_{kind}_score_clears_control"], kind
        assert summary[f"top_{kind}_score"] > 3 * summary[f"top_{kind}_score_control_max"], kind
    # general induction: whole-vocabulary spans (other draws than the card's), same definition
    assert summary["top_induction_score"] == pytest.approx(truth["heads"]["top_induction_score"], abs=0.1)


@needs_sibling
def test_blind_recovery_on_the_sibling():
    """The sibling (another seed; its circuits may sit elsewhere): the study, given only its
    weights, names the heads its own card names."""
    sibling, truth = run_repetition(load(SIBLING), n_random_heads=2, n_random_half_loss=5).summary(), card(SIBLING)
    assert sorted(sibling["induction_heads"]) == sorted(truth["heads"]["induction_head_labels"])
    assert sorted(sibling["previous_token_heads"]) == sorted(truth["heads"]["previous_token_head_labels"])


def test_the_control_names_no_heads(control):
    assert control["induction_heads"] == [] and control["previous_token_heads"] == []
    # with nothing named there is nothing to ablate: no "loops broken" claim is made at all
    assert control["loops_broken"] is None and "loops_broken_clears_control" not in control


def test_ablating_the_induction_heads_breaks_loops_beyond_random_heads(result, summary, truth):
    assert summary["looping_prompts_in_distribution"] >= 10
    for key in ("loops_broken", "loops_broken_mean_ablation", "loops_broken_resample_ablation"):
        assert summary[f"{key}_clears_control"], key
    # the card's measurement (plain HF, last 32 tokens periodic) agrees, and so does its control
    assert summary["loops_broken"] == pytest.approx(truth["repetition"]["loops_broken_induction_ablated"], abs=0.15)
    assert summary["loops_broken_control_max"] < summary["loops_broken"]
    assert truth["repetition"]["loops_broken_random_heads_ablated_max"] < summary["loops_broken"]
    # the random-head draws are real draws of other heads: some differ, none is an induction head
    assert len(result.random_broken["zero"]) >= 5


def test_the_repeated_half_is_copied_by_the_induction_heads_only(summary, truth):
    assert summary["repeated_half_loss_increase_clears_control"]
    assert summary["repeated_half_loss_increase_vs_random_init_clears_control"]
    assert summary["repeated_half_loss_increase"] > 1.0 > summary["repeated_half_loss_increase_control_max"]
    heads = truth["heads"]
    card_increase = heads["repeated_half_loss_induction_ablated"] - heads["repeated_half_loss"]
    assert summary["repeated_half_loss_increase"] == pytest.approx(card_increase, rel=0.3)


def test_repeats_reinforce_themselves_and_a_random_model_does_not(summary, control):
    curve = summary["reinforcement"]
    assert curve[1] > 5 * curve[0] and curve[-1] >= 0.8 * curve[1]
    assert summary["reinforcement_ratio_clears_control"]
    assert control["reinforcement_ratio"] < 1.1 < summary["reinforcement_ratio"]


def test_the_loop_rate_matches_the_card(summary, truth):
    # the study's detector counts a final cycle of >= 2 copies and >= 32 tokens; the card counts
    # the last 32 tokens periodic: the same loops up to one period
    assert summary["loop_rate"] == pytest.approx(truth["repetition"]["loop_rate"], abs=0.08)


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


def test_the_result_gives_a_frame_figures_and_a_json_summary(result):
    assert len(result.to_frame()) == len(result.prompts)
    figures = result.figures()
    assert figures and all(fig.data for fig in figures)
    json.dumps(result.summary())
