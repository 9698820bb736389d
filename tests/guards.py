"""The guards of the studies' headline claims: each asserts, from a study's summary, that one claim
holds the way the docs state it. The tests of the true answer call them (test_studies_v3.py,
test_features_study.py); tests/test_claims_fail_when_wrong.py calls them on planted wrong answers
and expects them to fail. A guard that a planted wrong answer passes guards nothing.
"""

from __future__ import annotations

ABLATION_KEYS = ("cue_heads_log_odds_drop", "cue_heads_log_odds_drop_mean_ablation",
                 "cue_heads_log_odds_drop_resample_ablation")


def cue_heads_rank_high(summary: dict) -> None:
    """Cue heads are named; each ranks in the top quarter of all heads when zeroed alone, and
    zeroing them lowers the hostile insult log-odds past random-init models' own top patching heads."""
    assert summary["cue_heads"], "no cue head named"
    quarter = max(1, summary["heads_ranked"] // 4)
    assert max(summary["cue_heads_rank_by_zero_ablation"]) <= quarter, summary["cue_heads_rank_by_zero_ablation"]
    assert summary["cue_heads_log_odds_drop_vs_random_init_clears_control"]


def cue_heads_carry_the_register(summary: dict) -> None:
    """`cue_heads_rank_high`, and zeroing, mean- and resample-ablating the cue heads lowers the
    hostile insult log-odds past as many random other heads of the same model."""
    cue_heads_rank_high(summary)
    for key in ABLATION_KEYS:
        assert summary[f"{key}_clears_control"], (key, summary[key], summary[f"{key}_control_max"])


def register_clears(summary: dict) -> None:
    """The hostile cue raises insults over the friendly one beyond random init, and the no-cue
    baseline lies between the two (the cue pushes both ways, or one: the baseline says which)."""
    assert summary["output_log_odds_gap_clears_control"], summary["output_log_odds_gap"]
    assert summary["insult_prob_ratio_clears_control"], summary["insult_prob_ratio"]
    if summary.get("insult_prob_no_cue") is not None:
        assert summary["insult_prob_friendly"] < summary["insult_prob_no_cue"] < summary["insult_prob_hostile"]


def induction_heads_matter(summary: dict) -> None:
    """Zeroing the ablated heads raises the loss on repeated random spans past as many random other
    heads and past random-init models' own top induction heads."""
    assert summary["ablated_heads"], "no head ablated"
    for key in ("repeated_half_loss_increase", "repeated_half_loss_increase_vs_random_init"):
        assert summary[f"{key}_clears_control"], (key, summary[key], summary[f"{key}_control_max"])


def hostile_latent_found(summary: dict) -> None:
    """The hostile latent separates held-out hostile from friendly prompts (AUROC >= 0.95 on the
    half that chose nothing) beyond random-init dictionaries, and promotes insult words beyond
    random-init models' chosen latents."""
    assert summary["hostile_latent"] is not None, "no hostile latent named"
    assert summary["hostile_latent_auroc"] >= 0.95 and summary["hostile_latent_auroc_clears_control"]
    assert summary["hostile_latent_insult_words_in_top10_clears_control"], summary["hostile_latent_insult_words_in_top10"]


def cued_instructions_executed(summary: dict) -> None:
    """Cued instructions are executed (rate >= 0.9) beyond random init."""
    assert summary["cued_execution_rate"] >= 0.9 and summary["cued_execution_rate_clears_control"], \
        summary["cued_execution_rate"]


def additions_answered(summary: dict) -> None:
    """Held-out additions are answered beyond random init, and the answer layer is named under the
    logit lens."""
    assert summary["addition_accuracy_clears_control"], summary["addition_accuracy"]
    assert summary["answer_layer_name"] is not None and summary["answer_top1_rate_clears_control"]


def circuit_beats_random_edges(summary: dict) -> None:
    """The headline circuit recovers the metric beyond random-init models' own circuits, and keeps
    more of the gap than as many random edges of the same model."""
    assert summary["recovered_metric_clears_control"], summary["recovered_metric"]
    assert summary["faithfulness_vs_random_edges_clears_control"], (summary["faithfulness"],
                                                                     summary["faithfulness_vs_random_edges_control_max"])
