"""Ground truth: each study recovers what the organism's model card states, and finds nothing in a
randomly initialised model of the same shape (same config and tokenizer, random weights).

The reference numbers come from ``ground_truth.json`` (measured by the organism's own code on the
plain HF model) or are recomputed here with a few lines of torch on HF outputs; nothing below
reuses the study code to check the study code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

import microscope as ms
from microscope.analysis.studies import run_arithmetic, run_instructions
from microscope.prompts import load_prompts
from microscope.scope import Scope

ORGANISM = Path(ms.__file__).parent / "models" / "organism"
pytestmark = pytest.mark.skipif(not (ORGANISM / "weights" / "config.json").exists(),
                                reason="the organism is not built (microscope organism train)")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: the organism's matrices are tiny, and on a shared 2-core
    machine a second spinning thread made these tests 8x slower (106 s against 13 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def truth() -> dict:
    return json.loads((ORGANISM / "ground_truth.json").read_text())


@pytest.fixture(scope="module")
def organism():
    return ms.load("organism")


@pytest.fixture(scope="module")
def random_model():
    """The organism's shape and tokenizer with random (HF-initialised) weights."""
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig.from_pretrained(ORGANISM / "weights")).eval()
    return Scope(model, AutoTokenizer.from_pretrained(ORGANISM / "weights"), source="random organism")


# ---- one run of each study per model, shared by the tests of this module -----------------------

@pytest.fixture(scope="module")
def instructions(organism):
    return run_instructions(organism)


@pytest.fixture(scope="module")
def instructions_random(random_model):
    return run_instructions(random_model)


@pytest.fixture(scope="module")
def arithmetic(organism):
    return run_arithmetic(organism)


@pytest.fixture(scope="module")
def arithmetic_random(random_model):
    return run_arithmetic(random_model)


# ---- instructions ------------------------------------------------------------------------------

def _lens_decision_layer(scope: Scope) -> int | None:
    """The decision layer, recomputed on HF outputs: last-token hidden states through the final
    LayerNorm (the last entry already has it) and lm_head; margin = logit(user:) - logit(execution
    token) with execution token answer: (bare) or the answer's first word (cued)."""
    model, tok = scope.model, scope.tokenizer
    rows = [p for p in load_prompts("instructions")]
    enc = tok([p.text for p in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    last = enc["attention_mask"].sum(1) - 1
    index = torch.arange(len(rows))
    user = tok.convert_tokens_to_ids("user:")
    execution = torch.tensor([tok.convert_tokens_to_ids(p.metadata["answer"].split()[0] if p.metadata["cued"]
                                                        else "answer:") for p in rows])
    cued = torch.tensor([bool(p.metadata["cued"]) for p in rows])
    ln = model.model.decoder.final_layer_norm
    separates = []
    for i, h in enumerate(hidden):
        x = h[index, last]
        logits = model.lm_head(x if i == len(hidden) - 1 else ln(x))
        lead = logits[:, user] > logits[index, execution]
        separates.append(lead[~cued].float().mean() > 0.5 and lead[cued].float().mean() < 0.5)
    if not separates[-1]:
        return None
    first = len(separates) - 1
    while first > 0 and separates[first - 1]:
        first -= 1
    return first


def test_continuation_rates_match_the_card(instructions, truth):
    card = truth["instructions"]
    summary = instructions.summary()
    for key in ("bare_execution_rate", "cued_execution_rate"):
        assert summary[key] == pytest.approx(card[key], abs=1e-3), key
    # the card may count a continuation that executes and then opens a turn as both; the study
    # calls it execution, so its dialogue rate sits between card - execution and card
    for fmt in ("bare", "cued"):
        dialogue = summary[f"{fmt}_dialogue_rate"]
        assert card[f"{fmt}_dialogue_rate"] - card[f"{fmt}_execution_rate"] - 1e-3 <= dialogue \
            <= card[f"{fmt}_dialogue_rate"] + 1e-3, fmt
    assert summary["bare_dialogue_rate"] >= 0.5 and summary["cued_execution_rate"] >= 0.8


def test_the_decision_layer_found_is_the_cards(instructions, truth, organism):
    expected = truth["instructions"].get("decision_layer", _lens_decision_layer(organism))
    assert expected is not None
    assert instructions.decision_layer == expected


def test_the_cue_decides_and_patching_finds_where(instructions):
    summary = instructions.summary()
    assert summary["dialogue_logprob_drop"] > 1.0      # the cue makes a dialogue turn much less likely
    assert summary["strongest_patch_restored"] >= 0.5  # one component carries most of it


def test_a_random_model_neither_executes_nor_decides(instructions_random):
    summary = instructions_random.summary()
    assert summary["cued_execution_rate"] == 0.0
    assert summary["decision_layer"] is None
    assert abs(summary["dialogue_logprob_drop"]) < 0.5


# ---- arithmetic --------------------------------------------------------------------------------

def test_arithmetic_accuracy_matches_the_card(truth, organism):
    card = truth["arithmetic"]
    for split in ("held_out", "train"):
        summary = run_arithmetic(organism, split=split).summary()
        assert summary["addition_accuracy"] == pytest.approx(card[f"addition_accuracy_{split}"], abs=1e-3)
        assert summary["subtraction_accuracy"] == pytest.approx(card[f"subtraction_accuracy_{split}"], abs=1e-3)
        assert summary["subtraction_sign_error_rate"] == pytest.approx(
            card[f"subtraction_sign_error_rate_{split}"], abs=1e-3)


def test_addition_is_learned_better_than_subtraction(arithmetic):
    summary = arithmetic.summary()
    assert summary["addition_accuracy"] > summary["subtraction_accuracy"] + 0.1
    assert summary["addition_answer_layer"] is not None


def test_a_random_model_does_no_arithmetic(arithmetic_random):
    summary = arithmetic_random.summary()
    assert summary["addition_accuracy"] <= 0.1 and summary["subtraction_accuracy"] <= 0.1
    assert summary["addition_answer_layer"] is None


# ---- every result's shape ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["instructions", "arithmetic"])
def test_results_give_a_frame_figures_and_a_json_summary(name, request):
    result = request.getfixturevalue(name)
    assert len(result.to_frame()) > 0
    figures = result.figures()
    assert figures
    for fig in figures:
        assert fig.data
    json.dumps(result.summary())
    assert type(result).__name__ in repr(result) and "<div>" in result._repr_html_()
