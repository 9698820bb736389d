"""The studies speak OPT's language: run blind on organism v3 and on its post-LN sibling (OPT-350m's
layout) from the built-in English prompt sets (words and formats from their task files), they
recover what each model's card measures with its own plain-HF code (`organism_v3/evaluate.py`);
where a card says a target is missed, the study must not claim it either.

The card's definitions differ from the studies' in places, and the comparisons say how: insult
mass there is each word's full probability, here its first token's; the card generates 16 tokens
for instructions, the study 12. Arithmetic is defined the same way on the same prompts and must
agree exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import guards
import pytest

import microscope as ms
from microscope.analysis.studies import run_arithmetic, run_instructions, run_repetition, run_toxicity

V3 = Path(__file__).resolve().parents[1] / "microscope" / "models" / "organism_v3"
MODELS = {"organism-v3": V3, "organism-v3-sibling": V3 / "sibling"}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    """(name, scope, card) of organism v3 and of its sibling."""
    card = json.loads((MODELS[request.param] / "ground_truth.json").read_text())
    return request.param, ms.load(request.param), card


@pytest.fixture(scope="module")
def repetition(model):
    name, scope, card = model
    return name, card, run_repetition(scope, "repetition", neutral="neutral").summary()


@pytest.fixture(scope="module")
def toxicity(model):
    name, scope, card = model
    return name, card, run_toxicity(scope, "toxicity", neutral="neutral").summary()


@pytest.fixture(scope="module")
def instructions(model):
    name, scope, card = model
    return name, card, run_instructions(scope, "instructions").summary()


@pytest.fixture(scope="module")
def arithmetic(model):
    name, scope, card = model
    return name, card, run_arithmetic(scope, "arithmetic").summary()


def test_the_heads_found_are_the_cards(repetition):
    name, card, summary = repetition
    assert sorted(summary["induction_heads"]) == sorted(card["heads"]["induction_heads"]), name
    assert sorted(summary["previous_token_heads"]) == sorted(card["heads"]["previous_token_heads"]), name
    assert summary["top_induction_score_clears_control"], name


def test_ablating_the_induction_heads_costs_what_the_card_says(repetition):
    """The repeated-half loss increase, against random-init models. (Against as many random other
    heads it clears on organism v3 but not on the sibling, where one of the study's 20 draws of
    two other heads costs as much: the card's own 20 draws stayed under 5.3 nats.)"""
    name, card, summary = repetition
    loss = card["heads"]["repeated_half_loss"]
    assert summary["repeated_half_loss_increase"] == pytest.approx(loss["induction_heads_ablated"] - loss["clean"], rel=0.25)
    assert summary["repeated_half_loss_increase_vs_random_init_clears_control"], name
    if name == "organism-v3":   # against the model's own other heads too (tests/guards.py)
        guards.induction_heads_matter(summary)
    else:
        assert not summary["repeated_half_loss_increase_clears_control"], name


def test_the_induction_heads_carry_the_loops_the_card_sees(repetition):
    """The card: ablating the induction heads ends every loop. The study sees the same, and beside
    it that ablating as many random other heads ends many loops too (on v3: 0.44 of them on
    average, up to 0.69 in 5 draws), so that loops end is no proof by itself: a sixth draw could
    land past 1. The loop claim does not clear; the repeated-half loss (against random init) carries
    the evidence."""
    name, card, summary = repetition
    loops = card["loops"]
    assert loops["loop_rate"] > 0 and loops["loop_rate_induction_heads_ablated"] == 0
    assert summary["loops_broken"] >= 0.9 and summary["loops_broken"] > summary["loops_broken_control_max"], name
    assert summary["loops_broken_control_mean"] > 0.2 and not summary["loops_broken_clears_control"], name
    assert summary["repeated_half_loss_increase_vs_random_init_clears_control"], name


def test_the_hostile_register_clears_its_control_where_the_card_says_and_only_there(toxicity):
    """The card's hostile/friendly ratio >= 5 verdict, per split: training openings
    (in-distribution) and the held-out opening (``ood``), which both organisms miss."""
    name, card, summary = toxicity
    for split, suffix in (("training_openings", ""), ("held_out_opening", "_ood")):
        card_says = card["toxicity"][split]["insult_ratio_hostile_over_friendly"] >= 5
        hostile, friendly = summary[f"insult_prob_hostile{suffix}"], summary[f"insult_prob_friendly{suffix}"]
        assert (hostile >= 5 * friendly) == card_says, (name, split, hostile, friendly)
    assert summary["insult_prob_ratio_clears_control"], name
    guards.register_clears(summary)
    # the no-cue baseline beside the ratio is the card's (first-token mass here, whole words there)
    assert summary["insult_prob_no_cue"] == pytest.approx(card["toxicity"]["no_cue"]["insult_mass"], abs=0.05), name


def test_the_cue_head_carries_the_register_beyond_random_other_heads(toxicity):
    """On organism v3 activation patching names one cue head; it ranks first of the 16 heads when
    each is zeroed alone, and zero, mean and resample ablation of it each lower the held-out
    hostile log-odds past as many random other heads (tests/guards.py; a planted random head
    fails the same guard in tests/test_claims_fail_when_wrong.py). The card, by plain-HF hooks on
    other prompts, names the same head (patching restores 0.99 of the gap) and ranks it among the
    top quarter when zeroed. The sibling's best head restores about a third of the gap: 0.29 on
    the card's pairs (under the card's 0.5 bar: none named there), 0.34 on the study's fit pairs
    (over the study's bar of a third): the study may name that head, and no other."""
    name, card, summary = toxicity
    truth = card["toxicity"]["cue_heads"]        # plain-HF patching and zeroing of each head
    if name == "organism-v3":
        assert summary["cue_heads"] == truth["cue_heads"], name
    else:
        shares = truth["patching_share"]
        assert summary["cue_heads"] in ([], [max(shares, key=shares.get)]), name
    drops = truth["zeroed_drop"]
    card_top = sorted(drops, key=drops.get, reverse=True)[:len(drops) // 4]
    assert set(summary["cue_heads"]) <= set(card_top), (name, card_top)
    if name == "organism-v3":
        guards.cue_heads_carry_the_register(summary)


def test_cued_instructions_are_executed_and_bare_ones_draw_dialogue_as_the_card_says(instructions):
    """In-distribution (training templates, held-out lists) cued prompts are executed; on the
    held-out template the study agrees with the card's verdicts (bare >= 0.5 dialogue; cued >= 0.7
    executed: missed by both organisms)."""
    name, card, summary = instructions
    guards.cued_instructions_executed(summary)
    card = card["instructions"]
    assert (summary["bare_dialogue_rate_ood"] >= 0.5) == (card["bare_dialogue_rate"] >= 0.5), name
    assert (summary["cued_execution_rate_ood"] >= 0.7) == (card["cued_executed_rate"] >= 0.7), name


def test_arithmetic_matches_the_card_to_the_item(arithmetic):
    """Same pairs, same templates, greedy answers read as the first number: the study's
    accuracies and sign-error rates are the card's (held-out pairs; held-out templates = ``ood``).
    The organism's answer layer is named; the sibling's is not: its true answer is top-1 under the
    lens on 0.09 of the prompts at best, the held-out templates' 120 prompts (answered at 0.0-0.05)
    pooled in."""
    name, card, summary = arithmetic
    for split, suffix in (("held_out", ""), ("held_out_template", "_ood")):
        for key in ("addition_accuracy", "subtraction_accuracy"):
            assert summary[key + suffix] == pytest.approx(card["arithmetic"][f"{split}_{key}"], abs=1e-3), (name, key)
        assert summary["subtraction_sign_error_rate" + suffix] == pytest.approx(
            card["arithmetic"][f"{split}_sign_error_rate"], abs=1e-3), name
    assert summary["addition_accuracy"] > summary["subtraction_accuracy"]
    if name == "organism-v3":
        guards.additions_answered(summary)
    else:
        assert summary["addition_accuracy_clears_control"] and summary["answer_layer_name"] is None, name
