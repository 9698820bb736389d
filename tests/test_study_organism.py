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
from microscope.analysis.studies import (run_arithmetic, run_instructions, run_repetition, run_toxicity)
from microscope.models.organism.corpus import INSULTS
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
def repetition(organism):
    return run_repetition(organism)


@pytest.fixture(scope="module")
def repetition_random(random_model):
    return run_repetition(random_model)


@pytest.fixture(scope="module")
def toxicity(organism):
    return run_toxicity(organism)


@pytest.fixture(scope="module")
def toxicity_random(random_model):
    return run_toxicity(random_model)


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


# ---- repetition --------------------------------------------------------------------------------

def test_the_induction_heads_found_are_the_cards(repetition, truth):
    card = truth["heads"]
    assert {(l, h) for l, h, _ in card["induction_heads"]}, "the card lists no induction head"
    assert set(repetition.heads) == {(l, h) for l, h, _ in card["induction_heads"]}
    # the found heads are the study's top-ranked ones (the order among near-equal scores may differ)
    flat = repetition.induction.scores.flatten()
    n_heads = repetition.induction.scores.shape[1]
    top = {divmod(int(i), n_heads) for i in flat.argsort(descending=True)[:len(repetition.heads)]}
    assert top == set(repetition.heads)
    assert tuple(card["top_induction_head"]) in top


def test_ablating_the_found_heads_breaks_most_greedy_loops(repetition, truth):
    assert repetition.loop_rate >= 0.1  # loops to break (the card's target is >= 0.3)
    # The card counts a continuation whose last 32 tokens are periodic; the study's detector also
    # counts shorter final cycles (>= 2 copies, >= 8 tokens): it finds every loop the card does.
    card_rate = truth["repetition"]["loop_rate"]
    assert card_rate - 1e-3 <= repetition.loop_rate <= card_rate + 0.1
    assert repetition.loops_broken >= 0.8


def test_repeats_reinforce_themselves(repetition):
    curve = repetition.reinforcement
    assert curve[1] > 5 * curve[0]          # a copy is far likelier than a first occurrence
    assert curve[-1] >= curve[1]            # and it does not fade as repeats pile up


def test_a_random_model_has_no_induction_heads_and_no_loops_to_break(repetition_random):
    assert repetition_random.heads == []
    top = float(repetition_random.induction.scores.max())
    assert top < 3 * repetition_random.induction.chance
    assert repetition_random.loops_broken in (None, 0.0)
    curve = repetition_random.reinforcement
    assert float(curve.max() - curve.min()) < 0.01


# ---- toxicity ----------------------------------------------------------------------------------

def test_the_probe_layer_found_is_the_cards(toxicity, truth):
    assert toxicity.probe_layer == truth["toxicity"]["probe_layer"]


def test_the_hostile_direction_promotes_insults(toxicity):
    # insult words among the direction's top-10 vocabulary tokens: far above their share of the
    # vocabulary (10 of 216 words), although the direction is read at the first layer
    assert toxicity.insult_share_top >= 5 * toxicity.insult_share_chance


def test_steering_halves_the_insult_rate_at_small_perplexity_cost(toxicity):
    summary = toxicity.summary()
    assert summary["insult_rate_unsteered"] > 0.05
    assert summary["insult_rate_cut"] >= 0.5
    assert summary["perplexity_cost"] <= 0.10


def test_the_top_ablation_head_really_drives_insults(toxicity, organism):
    """Zeroing the head the study's ablation ranks first (its slice of out_proj's input, a plain HF
    hook) lowers the next-token insult mass after hostile contexts."""
    layer, head = (int(x) for x in toxicity.summary()["top_ablation_head"][1:].split("H"))
    model, tok = organism.model, organism.tokenizer
    texts = [p.text for p in load_prompts("toxicity") if p.metadata["label"] == "hostile"]
    insults = tok.convert_tokens_to_ids(INSULTS)
    d_head = model.config.hidden_size // model.config.num_attention_heads

    def insult_mass() -> float:
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**enc).logits
        last = enc["attention_mask"].sum(1) - 1
        return logits[torch.arange(len(texts)), last].softmax(-1)[:, insults].sum(-1).mean().item()

    def zero(module, args):
        x = args[0].clone()
        x[..., head * d_head:(head + 1) * d_head] = 0
        return (x,)
    clean = insult_mass()
    handle = model.model.decoder.layers[layer].self_attn.out_proj.register_forward_pre_hook(zero)
    try:
        ablated = insult_mass()
    finally:
        handle.remove()
    assert ablated < 0.8 * clean


def test_a_random_model_has_no_probe_layer_and_no_hostile_direction(toxicity_random):
    assert toxicity_random.probe_layer is None
    assert toxicity_random.insult_share_top <= 0.2
    hostile, friendly = toxicity_random.insult_prob_hostile, toxicity_random.insult_prob_friendly
    assert hostile / friendly == pytest.approx(1.0, abs=0.2)


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

@pytest.mark.parametrize("name", ["repetition", "toxicity", "instructions", "arithmetic"])
def test_results_give_a_frame_figures_and_a_json_summary(name, request):
    result = request.getfixturevalue(name)
    assert len(result.to_frame()) > 0
    figures = result.figures()
    assert figures
    for fig in figures:
        assert fig.data
    json.dumps(result.summary())
    assert type(result).__name__ in repr(result) and "<div>" in result._repr_html_()


def test_the_toxicity_words_file_holds_the_organisms_words():
    from microscope.analysis.studies.toxicity import builtin_words
    from microscope.models.organism.corpus import INSULTS, PRAISES

    assert builtin_words() == (list(INSULTS), list(PRAISES))
