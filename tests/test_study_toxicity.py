"""The toxicity study finds the probe layer the organism's card states and the heads that carry the
cue, from the weights alone, on the organism and (blind) on its sibling; each claim is reported
beside its control (random-init models, shuffled labels, random heads, random directions of equal
norm), the robust ones clear it on both models, and the control, run as if it were the model, does
not pass the claim. Claims that do not survive their control on a model are reported as such (see
`test_claims_that_fail_their_control_say_so`).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import guards
from study_fixtures import ORGANISM, SIBLING, card, load, needs_organism, one_thread, random_organism  # noqa: F401

from microscope.analysis.studies import run_toxicity
from microscope.errors import AnalysisInputError
from microscope.prompts import load_prompts, load_task

V2 = "organism_v2/"   # organism v2's own prompt sets, in its 218-word language

pytestmark = needs_organism
MODELS = [pytest.param(ORGANISM, id="organism"),
          pytest.param(SIBLING, id="sibling", marks=pytest.mark.skipif(
              not (SIBLING / "weights" / "config.json").exists(), reason="the sibling organism is not shipped"))]


@pytest.fixture(scope="module", params=MODELS)
def folder(request):
    return request.param


@pytest.fixture(scope="module")
def organism(folder):
    return load(folder)


@pytest.fixture(scope="module")
def result(organism):
    return run_toxicity(organism, V2 + "toxicity", neutral=V2 + "neutral")


@pytest.fixture(scope="module")
def summary(result) -> dict:
    return result.summary()


@pytest.fixture(scope="module")
def truth(folder) -> dict:
    return card(folder)


@pytest.fixture(scope="module")
def control():
    """The study run on a random-init model (seed outside the null) as if it were the model."""
    return run_toxicity(random_organism(), V2 + "toxicity", neutral=V2 + "neutral", n_random_directions=4, lens_steps=50).summary()


def test_the_probe_layer_is_the_cards(summary, truth):
    assert summary["probe_layer"] is not None
    assert summary["probe_layer"] == truth["toxicity"]["probe_layer"]   # both index hidden_states (0 = embeddings)
    assert summary["probe_layer_name"] == ("embed" if summary["probe_layer"] == 0 else f"L{summary['probe_layer'] - 1}")


def test_the_probe_clears_shuffled_labels_and_random_init(result, summary):
    assert summary["probe_selectivity_clears_control"] and summary["probe_accuracy_clears_control"]
    assert (result.shuffled_accuracy <= 0.7).all()     # the control task is not learnable
    layer = summary["probe_layer"]
    assert result.selectivity[layer] >= result.probe_bar[layer] > result.null_selectivity[:, layer].max()


def test_the_control_has_no_probe_layer_no_cue_heads_and_no_register(control):
    """Another random-init model: its probes stay below the bar at every layer (the bar is the
    null's max plus a margin, so one more random draw does not clear it by luck), it names no cue
    head, and its output does not tell hostile from friendly."""
    assert control["probe_layer"] is None
    assert control["cue_heads"] == []
    assert control["read_layer_logit_lens"] is None and control["read_layer_tuned_lens"] is None
    assert control["insult_prob_ratio"] == pytest.approx(1.0, abs=0.1)


def test_insult_probabilities_match_the_card(summary, truth):
    tox = truth["toxicity"]
    assert summary["insult_prob_hostile"] == pytest.approx(tox["insult_prob_hostile"], abs=1e-3)
    assert summary["insult_prob_friendly"] == pytest.approx(tox["insult_prob_friendly"], abs=1e-3)
    assert summary["insult_prob_hostile_ood"] == pytest.approx(tox["insult_prob_hostile_ood"], abs=1e-3)
    assert summary["insult_prob_ratio_clears_control"]


def test_the_cue_heads_rank_high_and_matter_beyond_random_init(summary, control):
    """The heads patching names rank in the top quarter of all heads when each is zeroed alone, and
    ablating them lowers the insult log-odds of held-out hostile prompts far more than ablating
    random-init models' own top patching heads (a claim the random-init control, run as if it
    were the model, does not make). Against as many random other heads the verdict is reported
    for zero, mean and resample ablation (on organism v2 the register also needs heads that
    patching does not name: L1H3, L1H0 and L0H3 zeroed cost as much as the cue head L3H1, so the
    zero-ablation verdict there is "does NOT clear"; the mean-ablation verdict is checked against
    plain HF below). tests/test_claims_fail_when_wrong.py plants a random head and sees this
    guard fail."""
    guards.cue_heads_rank_high(summary)
    assert not control.get("cue_heads_log_odds_drop_vs_random_init_clears_control", False)
    assert summary["top_heads_by_zero_ablation"] and summary["heads_ranked"] == 16


def test_mean_ablating_the_cue_heads_in_plain_hf_lowers_insults_more_than_random_heads(summary, organism):
    """Independent of the study's hooks: the cue heads' slice of ``out_proj``'s input set to its
    mean over the neutral text (a plain HF pre-hook) lowers the next-token log-odds of insults
    against praises, log P(insults) - log P(praises), after held-out hostile prompts more than
    twice as much as doing the same to as many other heads drawn at random does on average (the
    same bar fails for most random draws). Whether it beats every draw is the study's reported verdict,
    checked here against this computation: on the organism v2 some draws hit heads the register
    also needs (L0H3, L1H0, L1H3 zeroed each drop it by > 4 nats) that patching does not name."""
    model, tok = organism.model, organism.tokenizer
    cfg = model.config
    d_head = cfg.hidden_size // cfg.num_attention_heads
    layers = model.model.decoder.layers
    texts = [p.text for p in load_prompts(V2 + "toxicity")
             if p.metadata["label"] == "hostile" and p.metadata["split"] == "in_distribution_heldout"]
    task = load_task(V2 + "toxicity")
    insults, praises = (tok.convert_tokens_to_ids(task[words]) for words in ("insults", "praises"))
    means = {}

    def keep_mean(layer):
        def hook(module, args):
            mask = neutral["attention_mask"].bool()
            means[layer] = args[0][mask].mean(0)
        return hook
    neutral = tok([p.text for p in load_prompts(V2 + "neutral")], return_tensors="pt", padding=True)
    handles = [layers[l].self_attn.out_proj.register_forward_pre_hook(keep_mean(l)) for l in range(len(layers))]
    with torch.no_grad():
        model(**neutral)
    for handle in handles:
        handle.remove()

    def log_odds(heads) -> float:
        def fill(layer, heads_here):
            def hook(module, args):
                x = args[0].clone()
                for h in heads_here:
                    x[..., h * d_head:(h + 1) * d_head] = means[layer][h * d_head:(h + 1) * d_head]
                return (x,)
            return hook
        handles = [layers[l].self_attn.out_proj.register_forward_pre_hook(fill(l, [h for ll, h in heads if ll == l]))
                   for l in {l for l, _ in heads}]
        try:
            enc = tok(texts, return_tensors="pt", padding=True)
            with torch.no_grad():
                logits = model(**enc).logits
            last = enc["attention_mask"].sum(1) - 1
            p = logits[torch.arange(len(texts)), last].softmax(-1)
            return (p[:, insults].sum(-1).log() - p[:, praises].sum(-1).log()).mean().item()
        finally:
            for handle in handles:
                handle.remove()

    cue = [(int(l), int(h)) for l, h in (s[1:].split("H") for s in summary["cue_heads"])]
    others = [(l, h) for l in range(cfg.num_hidden_layers) for h in range(cfg.num_attention_heads) if (l, h) not in cue]
    clean = log_odds([])
    rng = random.Random(0)
    random_drops = [clean - log_odds(rng.sample(others, len(cue))) for _ in range(10)]
    cue_drop = clean - log_odds(cue)
    bar = 2 * sum(random_drops) / len(random_drops)
    assert cue_drop > bar                                        # beyond a typical head
    assert sum(d > bar for d in random_drops) < len(random_drops) / 2      # which most draws are not
    # the study's verdict against the max of its own draws agrees with this independent one
    assert summary["cue_heads_log_odds_drop_mean_ablation_clears_control"] == (cue_drop > max(random_drops))


def test_the_register_is_read_under_both_lenses(result, summary):
    """Both lenses name a read layer; the tuned lens, fitted in the run, is closer to the output
    than the logit lens on held-out text at every inner layer."""
    assert summary["read_layer_logit_lens"] is not None and summary["read_layer_tuned_lens"] is not None
    inner = slice(0, len(result.points) - 1)
    assert (result.lens_kl.tuned_kl[inner] < result.lens_kl.logit_kl[inner]).all()
    assert summary["output_log_odds_gap_clears_control"]


def test_the_hostile_direction_is_read_at_its_own_layer_beside_random_directions(result, summary):
    """The vocabulary projection is read where the direction was fitted (the probe layer), under
    both lenses, beside random directions of equal norm (20 or more)."""
    assert summary["direction_hook"] == summary["probe_layer_hook"]
    for lens in ("logit_lens", "tuned_lens"):
        assert len(result.insult_share_random[lens]) >= 20
        assert f"direction_insult_share_{lens}_control_max" in summary


def test_steering_lowers_the_insult_log_odds_beyond_random_directions(summary):
    """Fitted on the even pairs, measured on the odd pairs: the steered log-odds drop beats every
    random direction of equal norm at the same strength, and random-init models' own directions."""
    assert summary["log_odds_drop_steered_clears_control"]
    assert summary["log_odds_drop_steered_vs_random_init_clears_control"]
    assert "insult_rate_cut_clears_control" in summary and summary["insult_rate_unsteered"] > 0.05


def test_steering_cost_is_measured_on_held_out_neutral_text_beside_random_directions(result, summary):
    """The perplexity cost is on neutral text, not on the prompts the direction was fitted on, and
    random directions of the same norm at the same strength are measured beside it. The claim
    tested: the hostile direction costs no more than the costliest random direction."""
    random_costs = result.steer_random["perplexity"] / result.sweep["perplexity"].iloc[0] - 1
    assert len(random_costs) >= 20
    assert summary["perplexity_cost"] <= random_costs.max()


def test_every_headline_claim_has_its_control_beside_it_and_the_verdict_its_numbers_give(result, summary):
    """Each claim's verdict is the one its value, its control's extreme and the gap needed give
    (recomputed here from the headline), and the findings say each verdict in words."""
    claims = [k[:-len("_clears_control")] for k in summary if k.endswith("_clears_control")]
    assert len(claims) >= 12
    for key in claims:
        higher = f"{key}_control_max" in summary
        extreme = summary[f"{key}_control_{'max' if higher else 'min'}"]
        assert {f"{key}_control", f"{key}_control_mean", f"{key}_control_draws"} <= set(summary), key
        past = summary[key] - extreme if higher else extreme - summary[key]
        expected = past > summary[f"{key}_control_gap_needed"] and f"{key}_control_unmet" not in summary
        assert summary[f"{key}_clears_control"] == expected, (key, summary[key], extreme)
    findings = result.findings()
    assert len(findings) == 4
    verdicts = [("CLEARS its control" in line, "does NOT clear its control" in line) for line in findings]
    assert all(clears != fails for clears, fails in verdicts), findings
    assert verdicts[0][0] == summary["output_log_odds_gap_clears_control"]


def test_the_result_gives_a_frame_figures_and_a_json_summary(result):
    assert len(result.to_frame()) == len(result.points)
    figures = result.figures()
    assert figures and all(fig.data for fig in figures)
    json.dumps(result.summary())


def test_the_toxicity_task_file_holds_the_organisms_words():
    from microscope.models.organism.corpus import INSULTS, PRAISES
    task = load_task(V2 + "toxicity")
    assert (task["insults"], task["praises"]) == (list(INSULTS), list(PRAISES))


def test_without_words_a_list_of_prompts_is_refused_naming_the_parameter(organism):
    rows = list(load_prompts(V2 + "toxicity"))    # a plain list: no task file comes with it
    with pytest.raises(AnalysisInputError, match="no insults given.*pass insults="):
        run_toxicity(organism, rows)
