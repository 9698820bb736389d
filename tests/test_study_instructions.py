"""The instructions study against the organism's card and plain-HF re-measurements, on the
organism v2 and, blind, on its sibling; and every claim against the control that could make it
false (a random-init model runs the whole study and must claim nothing).

Reference numbers come from ``ground_truth.json`` (the organism's ``evaluate.py``) or are
recomputed here with plain HF code (`plain_lens`); the study code is never used to check itself.
"""

from __future__ import annotations

import json

import pytest
import torch
from plain_lens import first_from, last_token_logit_lens, load_model, point_name, random_init
from study_fixtures import needs_organism, one_thread, random_organism  # noqa: F401

from microscope.analysis.studies.instructions import ABLATIONS, run_instructions
from microscope.analysis.studies.layers import model_samples

MODELS = ["organism", "sibling"]
pytestmark = needs_organism


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    """(name, scope, card, study result) of the organism and of its sibling (same code, blind)."""
    scope, card = load_model(request.param)
    return request.param, scope, card, run_instructions(scope, "organism_v2/instructions")


@pytest.fixture(scope="module")
def random_result():
    """The whole study on a random-init model of the organism's shape (seed outside the null), as
    if it were the model (its own null: 2 other seeds)."""
    return run_instructions(random_organism(), "organism_v2/instructions", seeds=(12, 13))


def test_rates_match_the_card(model):
    _, _, card, result = model
    summary, card = result.summary(), card["instructions"]
    for suffix in ("", "_ood"):
        for fmt in ("bare", "cued"):
            key = f"{fmt}_execution_rate{suffix}"
            assert summary[key] == pytest.approx(card[key], abs=1e-3), key
            # the card may count a continuation that executes and then opens a turn as both; the
            # study calls it execution, so its dialogue rate lies between card - execution and card
            d = f"{fmt}_dialogue_rate{suffix}"
            assert card[d] - card[key] - 1e-3 <= summary[d] <= card[d] + 1e-3, d


def test_the_study_claims_what_the_card_measures_and_the_control_does_not_pass(model):
    """Bare prompts draw dialogue and cued ones execution where the card says so (rate >= 0.5),
    and the study claims it (>= 0.5 and above every random-init model) exactly there; no
    random-init model executes or tells the two formats apart."""
    name, _, card, result = model
    summary, card = result.summary(), card["instructions"]
    card_says = {"dialogue_contrast": card["bare_dialogue_rate"] - card["cued_dialogue_rate"] >= 0.5,
                 "cued_execution_rate": card["cued_execution_rate"] >= 0.5}
    for key, expected in card_says.items():
        assert (summary[key] >= 0.5 and summary[f"{key}_clears_control"]) == expected, (name, key)
        assert summary[f"{key}_control_max"] < 0.5, (name, key)


def test_each_pair_is_a_cued_prompt_and_the_same_instruction_bare(model):
    _, scope, _, result = model
    tok = scope.tokenizer
    bare_prompts = {p for p, c in zip(result.prompts, result.cued) if not c}
    for cued, bare in zip(result.pair_cued, result.pair_bare):
        a, b = tok(cued)["input_ids"], tok(bare)["input_ids"]
        assert a[:-1] == b and tok.convert_ids_to_tokens(a[-1]) == "answer:"
        assert bare in bare_prompts
    assert len(result.pair_cued) == sum(result.cued)


def _separation(model, tok, cued: list[str], bare: list[str], answers: list[str]) -> torch.Tensor:
    """[point] plain-HF logit lens: share of pairs with logit(answer's first word) > logit(user:)
    in the cued prompt and < in its twin."""
    lens = last_token_logit_lens(model, tok, cued + bare)
    n = len(cued)
    execution = torch.tensor(tok.convert_tokens_to_ids([a.split()[0] for a in answers])).repeat(2)
    diff = lens[:, torch.arange(2 * n), execution] - lens[:, :, tok.convert_tokens_to_ids("user:")]
    return ((diff[:, :n] > 0) & (diff[:, n:] < 0)).float().mean(-1)


def test_the_decision_layer_is_where_plain_hf_finds_it(model):
    """The logit-lens decision layer, re-measured with HF hidden states and lm_head against five
    random-init models, on the organism and blind on its sibling."""
    name, scope, _, result = model
    answers = [a for a, c in zip(result.answers, result.cued) if c]
    values = _separation(scope.model, scope.tokenizer, result.pair_cued, result.pair_bare, answers)
    null = torch.stack([_separation(random_init(scope.model, s), scope.tokenizer, result.pair_cued,
                                    result.pair_bare, answers) for s in range(5)])
    expected = point_name(first_from(values, null.max(0).values, 0.5))
    assert expected is not None, f"{name}: plain HF finds no decision layer"
    summary = result.summary()
    assert summary["decision_layer_name"] == expected
    assert summary["decision_separation_by_layer"] == pytest.approx(values.tolist(), abs=1e-3)


def test_both_lenses_name_a_layer_and_say_how_far_from_the_output_they_read(model):
    name, _, _, result = model
    summary = result.summary()
    for lens in ("logit_lens", "tuned_lens"):
        suffix = "" if lens == "logit_lens" else "_tuned_lens"
        assert summary[f"decision_layer_name{suffix}"] is not None, (name, lens)
        assert summary[f"decision_separation{suffix}_clears_control"], (name, lens)
        assert summary[f"decision_separation{suffix}_control_max"] < 0.5, (name, lens)
        assert summary[f"decision_layer_kl_{lens}"] >= 0.0
    # the tuned lens, fitted on the model's own samples, is nearer the output at every inner point
    logit, tuned = result.claims["logit_lens"].kl, result.claims["tuned_lens"].kl
    assert (tuned[:-1] < logit[:-1]).all(), (name, logit.tolist(), tuned.tolist())
    assert float(logit[-1]) == pytest.approx(0.0, abs=1e-4) and float(tuned[-1]) == pytest.approx(0.0, abs=1e-4)


def test_the_tuned_lens_never_sees_an_evaluation_prompt():
    scope = load_model("organism")[0]
    kept = model_samples(scope, n=16, length=31)
    texts = [scope.tokenizer.decode(row) for row in kept]
    common = "x is"
    assert any(common in t for t in texts), "the samples should hold arithmetic prompts to exclude"
    dropped = model_samples(scope, n=16, length=31, exclude=[common])
    assert len(dropped) == sum(common not in t for t in texts)
    assert not any(common in scope.tokenizer.decode(row) for row in dropped)


def _plain_patch_share(scope, result, component: str) -> float:
    """Share of the logit difference (answer's first word - user:) restored by writing the cued
    run's last-token output of ``component`` ('L1H2' or 'L0.mlp_out') into its twin's run, with
    plain HF hooks (a head: its slice of out_proj's input; an MLP: fc2's output), over the
    evaluation pairs (the odd ones: the even ones chose the component)."""
    model, tok = scope.model, scope.tokenizer
    layer = int(component[1:].split("H")[0].split(".")[0])
    block = model.model.decoder.layers[layer]
    d_head = model.config.hidden_size // model.config.num_attention_heads
    head = int(component.split("H")[1]) if "H" in component else None
    answers = [a for a, c in zip(result.answers, result.cued) if c][1::2]
    execution = torch.tensor(tok.convert_tokens_to_ids([a.split()[0] for a in answers]))
    user = tok.convert_tokens_to_ids("user:")
    stored = {}

    def run(texts, patch: bool) -> torch.Tensor:
        enc = tok(texts, return_tensors="pt", padding=True)
        rows, last = torch.arange(len(texts)), enc["attention_mask"].sum(1) - 1

        def pre(module, args):
            x = args[0].clone()
            if patch:
                x[rows, last, head * d_head:(head + 1) * d_head] = stored["v"]
            else:
                stored["v"] = x[rows, last, head * d_head:(head + 1) * d_head].clone()
            return (x,)

        def post(module, args, out):
            out = out.clone()
            grid = out.view(len(texts), -1, out.shape[-1])  # OPT runs its MLP on [batch * pos, d]
            if patch:
                grid[rows, last] = stored["v"]
            else:
                stored["v"] = grid[rows, last].clone()
            return out
        handle = (block.self_attn.out_proj.register_forward_pre_hook(pre) if head is not None
                  else block.fc2.register_forward_hook(post))
        try:
            with torch.no_grad():
                logits = model(**enc).logits[rows, last]
        finally:
            handle.remove()
        return logits[rows, execution] - logits[:, user]

    cued, bare = result.pair_cued[1::2], result.pair_bare[1::2]
    clean = run(cued, patch=False)        # stores the cued values
    patched = run(bare, patch=True)
    with torch.no_grad():
        enc = tok(bare, return_tensors="pt", padding=True)
        rows, last = torch.arange(len(bare)), enc["attention_mask"].sum(1) - 1
        logits = model(**enc).logits[rows, last]
    bare = logits[rows, execution] - logits[:, user]
    return float((patched - bare).mean() / (clean - bare).mean())


def test_the_strongest_component_restores_what_plain_hf_says_and_more_than_any_other(model):
    name, scope, _, result = model
    summary = result.summary()
    site = summary["strongest_patch_site"]
    assert summary["strongest_patch_restored"] == pytest.approx(_plain_patch_share(scope, result, site), abs=2e-3)
    # "restores most": more than every other head and MLP, and far above random-init models
    assert summary["strongest_patch_restored_clears_control"], name
    assert summary["strongest_patch_restored"] > summary["strongest_patch_restored_control_max"]
    assert summary["strongest_patch_effect"] > 10 * summary["strongest_patch_effect_control_max"]
    assert summary["cue_logit_diff"] > 10 * max(abs(summary["cue_logit_diff_control_max"]), 0.1)


def test_ablating_the_strongest_component_matters_more_than_ablating_any_other(model):
    name, _, _, result = model
    summary = result.summary()
    for method in ABLATIONS:
        key = f"strongest_ablation_drop_{method}"
        assert summary[f"{key}_control_mean"] < summary[key], (name, method)
    assert any(summary[f"strongest_ablation_drop_{m}_clears_control"] for m in ABLATIONS), name


def test_a_random_model_claims_nothing(random_result):
    summary = random_result.summary()
    assert summary["cued_execution_rate"] == 0.0
    assert not summary["dialogue_contrast_clears_control"] or summary["dialogue_contrast"] < 0.5
    assert summary["decision_layer_name"] is None and summary["decision_layer_name_tuned_lens"] is None
    assert abs(summary["cue_logit_diff"]) < 0.5
    assert abs(summary["strongest_patch_effect"]) < 0.5


def test_the_result_gives_a_frame_figures_and_a_json_summary(model):
    result = model[3]
    assert len(result.to_frame()) == len(result.prompts)
    figures = result.figures()
    assert figures and all(fig.data for fig in figures)
    kl = figures[-1]      # each lens's KL to the output by layer: the context of the layer claims
    assert [t.name for t in kl.data] == ["logit lens", "tuned lens"]
    assert kl.data[0].y[-1] < 1e-4 and kl.data[0].y[0] > kl.data[0].y[-1]
    json.dumps(result.summary())
    assert "InstructionsResult" in repr(result) and "<div>" in result._repr_html_()
