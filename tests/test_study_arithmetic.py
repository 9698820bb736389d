"""The arithmetic study against the organism's card and plain-HF re-measurements, on the
organism v2 and, blind, on its sibling; and every claim against the control that could make it
false (a random-init model runs the whole study and must claim nothing).

Reference numbers come from ``ground_truth.json`` (the organism's ``evaluate.py``: accuracies,
sign errors, mirror-pair answers vs planted wrong signs) or are recomputed here with plain HF code
(`plain_lens`); the study code is never used to check itself.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from plain_lens import first_from, last_token_logit_lens, load_model, point_name, random_init
from study_fixtures import needs_organism, one_thread, random_organism  # noqa: F401

from microscope.analysis.studies.arithmetic import mirror_text, run_arithmetic
from microscope.models.organism.evaluate import training_pairs
from microscope.models.organism.prompt_sets import arithmetic_prompts
from microscope.prompts import Prompt, load_prompts

MODELS = ["organism", "sibling"]
pytestmark = needs_organism
# the card's split names -> the study's key suffix (`studies.base.split_suffix`)
SPLITS = {"held_out": "", "ood": "_ood"}


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    """(name, scope, card, study result) of the organism and of its sibling (same code, blind)."""
    scope, card = load_model(request.param)
    return request.param, scope, card, run_arithmetic(scope, "organism_v2/arithmetic")


@pytest.fixture(scope="module")
def random_result():
    """The whole study on a random-init model of the organism's shape (seed outside the null), as
    if it were the model (its own null: 2 other seeds)."""
    return run_arithmetic(random_organism(), "organism_v2/arithmetic", seeds=(12, 13))


def test_accuracies_and_sign_errors_match_the_card(model):
    name, _, card, result = model
    summary, card = result.summary(), card["arithmetic"]
    for split, suffix in SPLITS.items():
        for key in ("addition_accuracy", "subtraction_accuracy", "subtraction_sign_error_rate"):
            assert summary[key + suffix] == pytest.approx(card[f"{key}_{split}"], abs=1e-3), (name, key + suffix)
    assert summary["addition_accuracy_clears_control"], name
    assert summary["addition_accuracy_control_max"] < 0.5 * summary["addition_accuracy"]


def test_pairs_seen_in_training_match_the_card(model):
    """The card's training pairs (where the planted 30% wrong-sign noise lives), run through the study."""
    name, scope, card, _ = model
    rows = [Prompt(r["text"], {**r, "split": "train"}) for r in arithmetic_prompts(training_pairs())
            if r["split"] == "in_distribution_heldout"]
    summary, card = run_arithmetic(scope, rows, seeds=(0,)).summary(), card["arithmetic"]
    for key in ("addition_accuracy_train", "subtraction_accuracy_train", "subtraction_sign_error_rate_train"):
        assert summary[key] == pytest.approx(card[key], abs=1e-3), (name, key)


def test_wrong_subtraction_answers_are_named_as_the_card_measures_them(model):
    """Mirror-pair answers (b - a, the model's own answer on the swapped sum) vs sign errors the
    mirror does not explain: the study's shares are the card's, and the mechanism it names is
    the one the card's shares say."""
    name, _, card, result = model
    summary, card = result.summary(), card["arithmetic"]
    assert summary["subtraction_wrong"] == card["subtraction_wrong_held_out"]
    for share in ("share_mirror_answer", "share_model_mirror_answer", "share_wrong_sign_not_mirror"):
        key = f"subtraction_wrong_{share}"
        assert summary[key] == pytest.approx(card[f"subtraction_wrong_held_out_{share}"], abs=1e-3), (name, key)
    mechanism = summary["wrong_answer_mechanism"]
    wrong_sign = card["subtraction_wrong_held_out_share_wrong_sign_not_mirror"]
    mirror_pair = summary["subtraction_wrong_share_mirror_pair_answer"]   # b - a, on both prompts
    # the card's shares imply the study's: b - a on the held-out prompt = mirror pair + wrong sign
    assert card["subtraction_wrong_held_out_share_mirror_answer"] == pytest.approx(mirror_pair + wrong_sign, abs=2e-3)
    if mechanism == "mirror":
        assert mirror_pair > 0.5 and summary["subtraction_wrong_share_mirror_pair_answer_clears_control"]
    if mechanism == "wrong_sign":
        assert wrong_sign > 0.5
    if card["subtraction_wrong_held_out_share_mirror_answer"] < 0.5:
        assert mechanism not in ("mirror", "wrong_sign"), name
    # order-blind answers are what untrained models give: their control is high
    order_blind = "subtraction_wrong_share_order_blind"
    assert (mechanism == "order_blind") == (summary[order_blind] > 0.5 and summary[f"{order_blind}_clears_control"])


def test_mirror_prompts_swap_the_operands():
    rows = [p for p in load_prompts("organism_v2/arithmetic") if p.metadata["op"] == "-"]
    for p in rows:
        a, b = p.metadata["a"], p.metadata["b"]
        mirrored = mirror_text(p)
        assert mirrored is not None and mirrored != p.text
        assert mirrored.split().index(str(b)) == p.text.split().index(str(a))
        assert mirror_text(Prompt(mirrored, {**p.metadata, "a": b, "b": a})) == p.text


def _top1(model, tok, texts: list[str], answer_ids: torch.Tensor) -> torch.Tensor:
    return (last_token_logit_lens(model, tok, texts).argmax(-1) == answer_ids[None]).float().mean(-1)


def _answers(card: dict) -> bool:
    """Whether the card says the model answers >= 0.1 of the prompts (20 per operation and split)
    right: the least an answer layer needs."""
    ari = card["arithmetic"]
    return sum(ari[f"{op}_accuracy_{split}"] for op in ("addition", "subtraction")
               for split in ("held_out", "ood")) / 4 >= 0.1 - 1e-9


def test_the_answer_layer_is_where_plain_hf_finds_it(model):
    """The logit-lens answer layer re-measured with HF hidden states and lm_head: the first point
    from which the true answer is top-1 for at least half as many prompts as the output gets
    right (and >= 0.1 of all), and for more than on five random-init models and twenty answer
    shuffles (drawn here, not the study's)."""
    name, scope, card, result = model
    tok = scope.tokenizer
    rows = load_prompts("organism_v2/arithmetic")
    texts = [p.text for p in rows]
    ids = torch.tensor(tok.convert_tokens_to_ids([str(p.metadata["answer"]) for p in rows]))
    values = _top1(scope.model, tok, texts, ids)
    null = [_top1(random_init(scope.model, s), tok, texts, ids) for s in range(5)]
    rng = random.Random(1)
    null += [_top1(scope.model, tok, texts, ids[torch.tensor(rng.sample(range(len(ids)), len(ids)))])
             for _ in range(20)]
    expected = point_name(first_from(values, torch.stack(null).max(0).values, max(0.5 * float(values[-1]), 0.1)))
    assert (expected is not None) == _answers(card), f"{name}: plain HF answer layer {expected}"
    summary = result.summary()
    assert summary["answer_layer_name"] == expected
    assert summary["answer_top1_rate_by_layer"] == pytest.approx(values.tolist(), abs=1e-3)


def test_both_lenses_name_an_answer_layer_where_the_card_says_the_model_answers(model):
    """A model that answers gets an answer layer under both lenses, each above its control; one
    the card says does not gets none (the control, random init and shuffled answers, would pass)."""
    name, _, card, result = model
    summary = result.summary()
    for lens in ("logit_lens", "tuned_lens"):
        suffix = "" if lens == "logit_lens" else "_tuned_lens"
        claimed = summary[f"answer_layer_name{suffix}"] is not None
        assert claimed == _answers(card), (name, lens)
        if claimed:
            assert summary[f"answer_top1_rate{suffix}_clears_control"], (name, lens)
            assert summary[f"answer_layer_kl_{lens}"] >= 0.0
    logit, tuned = result.claims["logit_lens"].kl, result.claims["tuned_lens"].kl
    assert (tuned[:-1] < logit[:-1]).all(), (name, logit.tolist(), tuned.tolist())


def test_a_random_model_claims_nothing(random_result):
    summary = random_result.summary()
    assert summary["answer_layer_name"] is None and summary["answer_layer_name_tuned_lens"] is None
    assert summary["addition_accuracy"] <= 0.2
    assert summary["wrong_answer_mechanism"] in ("other", None)


def test_the_result_gives_a_frame_figures_and_a_json_summary(model):
    result = model[3]
    assert len(result.to_frame()) == len(result.ops)
    figures = result.figures()
    assert figures and all(fig.data for fig in figures)
    kl = figures[-1]      # each lens's KL to the output by layer: the context of the layer claims
    assert [t.name for t in kl.data] == ["logit lens", "tuned lens"]
    assert kl.data[0].y[-1] < 1e-4 and kl.data[0].y[0] > kl.data[0].y[-1]
    json.dumps(result.summary())
    assert "ArithmeticResult" in repr(result) and "<div>" in result._repr_html_()
