"""Every headline claim fails when its answer is wrong. Each test plants a wrong answer into one
claim of one study on organism v3 -- a random head for the cue heads or the induction heads, a
random latent for the hostile latent, shuffled labels or answers -- and asserts that the claim's
verdict turns to "does NOT clear" and that the guard the true answer's tests use (tests/guards.py)
then fails. Where the true answer is measured here too, it passes the same guard in the same run.

Settings that do not enter the claim under test are cut (fewer steering directions, fewer loops)
to keep the file short; the claim's own controls run as the study's defaults.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import guards
import pytest
import torch

import microscope as ms
from microscope.analysis.studies import run_arithmetic, run_instructions, run_repetition, run_toxicity
from microscope.prompts import Prompt, PromptSet, load_prompts

CARD = json.loads((Path(ms.__file__).parent / "models" / "organism_v3" / "ground_truth.json").read_text())
CHEAP_TOXICITY = dict(neutral="neutral", n_random_directions=2, strengths=(0.0, 1.0), n_shuffles=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def organism():
    return ms.load("organism")


def all_heads(scope) -> list[tuple[int, int]]:
    config = scope.model.config
    return [(l, h) for l in range(config.num_hidden_layers) for h in range(config.num_attention_heads)]


def with_metadata(name: str, change) -> PromptSet:
    """The built-in set ``name`` with each prompt's metadata passed through ``change(i, metadata)``."""
    prompts = load_prompts(name)
    return PromptSet([Prompt(p.text, change(i, dict(p.metadata))) for i, p in enumerate(prompts)], task=prompts.task)


def shuffled_field(name: str, field: str, seed: int = 0) -> PromptSet:
    """The set with ``field`` of the metadata permuted across prompts (seeded)."""
    values = [p.metadata[field] for p in load_prompts(name)]
    random.Random(seed).shuffle(values)
    return with_metadata(name, lambda i, m: {**m, field: values[i]})


@pytest.fixture(scope="module")
def toxicity_true(organism):
    return run_toxicity(organism, "toxicity", **CHEAP_TOXICITY).summary()


def test_a_random_head_planted_as_the_cue_head_fails_the_cue_head_claim(organism, toxicity_true):
    guards.cue_heads_carry_the_register(toxicity_true)              # the true answer passes
    found = [tuple(int(x) for x in label[1:].split("H")) for label in toxicity_true["cue_heads"]]
    planted = random.Random(0).choice([h for h in all_heads(organism) if h not in found])
    summary = run_toxicity(organism, "toxicity", heads=[planted], **CHEAP_TOXICITY).summary()
    assert summary["cue_heads_given"] and summary["cue_heads"] == [f"L{planted[0]}H{planted[1]}"]
    assert not summary["cue_heads_log_odds_drop_clears_control"]
    for guard in (guards.cue_heads_carry_the_register, guards.cue_heads_rank_high):
        with pytest.raises(AssertionError):
            guard(summary)


def test_shuffled_hostile_and_friendly_labels_fail_the_register_claim(organism, toxicity_true):
    guards.register_clears(toxicity_true)
    swap = {pair: random.Random(pair).random() < 0.5 for pair in range(1000)}
    flip = {"hostile": "friendly", "friendly": "hostile", "none": "none"}
    prompts = with_metadata("toxicity", lambda i, m: {**m, "label": flip[m["label"]] if swap[m["pair"]] else m["label"]})
    summary = run_toxicity(organism, prompts, **CHEAP_TOXICITY).summary()
    assert not summary["output_log_odds_gap_clears_control"]
    with pytest.raises(AssertionError):
        guards.register_clears(summary)


def test_a_non_induction_head_planted_as_the_induction_heads_fails_the_ablation_claim(organism):
    named = {tuple(int(x) for x in label[1:].split("H"))
             for kind in ("induction_heads", "previous_token_heads") for label in CARD["heads"][kind]}
    planted = random.Random(0).choice([h for h in all_heads(organism) if h not in named])
    summary = run_repetition(organism, "repetition", neutral="neutral", heads=[planted], n_prompts=16,
                             seeds=(0, 1, 2)).summary()
    assert summary["ablated_heads_given"] and summary["ablated_heads"] == [f"L{planted[0]}H{planted[1]}"]
    assert not summary["repeated_half_loss_increase_clears_control"]
    with pytest.raises(AssertionError):
        guards.induction_heads_matter(summary)


def test_shuffled_answers_fail_the_execution_claim(organism):
    summary = run_instructions(organism, shuffled_field("instructions", "answer")).summary()
    assert not summary["cued_execution_rate_clears_control"]
    with pytest.raises(AssertionError):
        guards.cued_instructions_executed(summary)


def test_shuffled_answers_fail_the_arithmetic_claims(organism):
    prompts = shuffled_field("arithmetic", "answer")
    summary = run_arithmetic(organism, prompts).summary()
    assert not summary["addition_accuracy_clears_control"]
    assert summary["answer_layer_name"] is None
    with pytest.raises(AssertionError):
        guards.additions_answered(summary)


def test_a_random_latent_planted_as_the_hostile_latent_fails_the_feature_claims(organism, tmp_path):
    """One dictionary (the embedding-side block output, 150 steps) keeps this short; in the same
    run the latent the selection half picks passes the AUROC bar the planted one fails."""
    from microscope.activations.dump import dump
    from microscope.analysis.features.study import run_features_study

    hook = "blocks.0.hook_resid_post"
    dump(organism, "demo", hook, str(tmp_path / "demo.zarr"))
    store = ms.open_store(str(tmp_path / "demo.zarr"))
    n_latents = 8 * organism.model.config.hidden_size
    planted = random.Random(0).randrange(n_latents)
    result = run_features_study(organism, store, hooks=hook, out=str(tmp_path / "dicts"), control_seeds=[0, 1],
                                steps=150, hostile_latent=planted)
    summary = result.summary()
    assert result.model.best != planted and result.model.auroc_eval[result.model.best] >= 0.95
    assert summary["hostile_latent_named_by_caller"] and summary["auroc_measured_on"] == planted
    assert not summary["hostile_latent_auroc_clears_control"]
    with pytest.raises(AssertionError):
        guards.hostile_latent_found(summary)


def test_the_least_scored_edges_planted_as_the_circuit_fail_the_circuit_claim(organism):
    """The toxicity task's circuit by EAP (one step, no exact patching: the claim is about the
    extraction, not the scores' agreement); the planted circuit keeps the edges of least |score|."""
    from dataclasses import replace

    from microscope.analysis.circuits.discovery import find_circuit
    from microscope.analysis.circuits.tasks import toxicity_task
    from microscope.analysis.circuits.extraction import faithfulness_curve

    task = toxicity_task(organism, "toxicity")
    result = find_circuit(organism, task, steps=1, exact=False, control_seeds=(0, 1, 2))
    guards.circuit_beats_random_edges(result.summary())                  # the true ranking passes
    least_first = 1 / (result.eap_ig.abs() + 1e-9)
    planted = replace(result, curve=faithfulness_curve(organism, result.graph, task, least_first, ks=result.curve.ks))
    summary = planted.summary()
    assert not summary["faithfulness_vs_random_edges_clears_control"]
    assert summary["circuit_heads"] == []
    with pytest.raises(AssertionError):
        guards.circuit_beats_random_edges(summary)
