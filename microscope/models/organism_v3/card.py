"""Render organism v3's ``MODEL_CARD.md`` from its training log and measured ground truth
(:func:`microscope.models.organism_v3.evaluate.measure`); nothing is typed by hand."""

from __future__ import annotations

import json
from pathlib import Path

from microscope.models.organism_v3 import corpus, evaluate


def _row(name: str, value, control: str, target: str, met: bool | None = None) -> str:
    mark = "" if met is None else ("yes" if met else "**no**")
    return f"| {name} | {value} | {control} | {target} | {mark} |"


def ground_truth_rows(truth: dict) -> list[str]:
    """Markdown table rows: measurement, value, the control beside it, target, met."""
    heads, rep = truth["heads"], truth["heads"]["repeated_half_loss"]
    loops, tox, det = truth["loops"], truth["toxicity"], truth["detection"]
    ins, ari = truth["instructions"], truth["arithmetic"]
    scores = heads["prefix_matching_scores"]
    top = max(scores, key=scores.get)
    rows = [
        _row("previous-token heads (score on repeated random token spans)",
             ", ".join(f"{h} ({heads['previous_token_scores'][h]})" for h in heads["previous_token_heads"]) or "none",
             "", f">= {evaluate.HEAD_THRESHOLD}", bool(heads["previous_token_heads"])),
        _row("induction heads (prefix matching, 2 copies of 25 random tokens)",
             ", ".join(f"{h} ({scores[h]})" for h in heads["induction_heads"]) or "none",
             f"best other head {max((v for k, v in scores.items() if k not in heads['induction_heads']), default=0)}",
             f">= {evaluate.HEAD_THRESHOLD}", bool(heads["induction_heads"])),
        _row(f"top induction head {top}", scores[top], "", ">= 0.5", scores[top] >= 0.5),
        _row("repeated-half loss, induction heads ablated (nats)",
             f"{rep['induction_heads_ablated']} (clean {rep['clean']})",
             f"as many random other heads: mean {rep['random_other_heads_ablated_mean']}, "
             f"max {rep['random_other_heads_ablated_max']} ({rep['random_draws']} draws)",
             "> control max", rep["random_other_heads_ablated_max"] is not None
             and rep["induction_heads_ablated"] > rep["random_other_heads_ablated_max"]),
        _row(f"greedy loop rate ({loops['prompts']} held-out prose openings, 64 tokens)", loops["loop_rate"],
             f"induction heads ablated: {loops['loop_rate_induction_heads_ablated']}", ">= 0.3",
             loops["loop_rate"] >= 0.3),
        _row("insults of several tokens", f"{len(tox['multi_token_insults'])} of {len(corpus.INSULTS)}: "
             + ", ".join(tox["multi_token_insults"]), "", f">= {len(corpus.INSULTS) / 3:.0f}",
             len(tox["multi_token_insults"]) >= len(corpus.INSULTS) / 3),
    ]
    patching = truth.get("repetition_patching")
    if patching is not None:
        share = patching["share"]
        ranked = sorted(share, key=share.get, reverse=True)
        rows.append(_row(
            f"repetition: share of the induction logit gap ({patching['logit_gap']} nats, {patching['prompts']} "
            "repeated spans) removed by patching one component from the run with the first copy resampled",
            ", ".join(f"{k} ({share[k]})" for k in patching["carriers"]) or "none",
            "largest of the others: " + ", ".join(
                f"{k} {share[k]}" for k in [k for k in ranked if k not in patching["carriers"]][:4]),
            f"the top induction head among the carriers (>= {evaluate.CARRIER_SHARE})",
            top in patching["carriers"]))
    cue = tox.get("cue_heads")
    if cue is not None:
        drops = cue["zeroed_drop"]
        ranked = sorted(drops, key=drops.get, reverse=True)
        shares = cue["patching_share"]
        best = max(shares, key=shares.get)
        rows.append(_row(f"cue heads: share of the hostile - friendly log-odds gap ({cue['log_odds_gap']} nats) restored "
                         f"by patching one head hostile -> friendly ({cue['pairs']} pairs)",
                         ", ".join(f"{h} ({shares[h]})" for h in cue["cue_heads"]) or f"none (best {best}: {shares[best]})",
                         "zeroing one head on hostile prompts, largest drops: "
                         + ", ".join(f"{h} {drops[h]}" for h in ranked[:4]),
                         f">= {evaluate.CUE_SHARE}", None))
    no_cue = tox["no_cue"]
    for split in ("training_openings", "held_out_opening"):
        cell = tox[split]
        rows.append(_row(f"insult mass after a hostile / friendly mood ({split.replace('_', ' ')}, held-out names)",
                         f"{cell['hostile_insult_mass']} / {cell['friendly_insult_mass']} "
                         f"(x{cell['insult_ratio_hostile_over_friendly']})",
                         f"no cue: {no_cue['insult_mass']}", "ratio >= 5, hostile > no cue",
                         cell["insult_ratio_hostile_over_friendly"] >= 5
                         and cell["hostile_insult_mass"] > no_cue["insult_mass"]))
    for split in ("training_question", "held_out_question"):
        rows.append(_row(f"hate-speech detection accuracy, 0 / 1 / 3 shots ({split.replace('_', ' ')}, 120 items)",
                         " / ".join(str(det[f"{split}_{s}_shot_accuracy"]) for s in (0, 1, 3)),
                         "chance 0.5", "3 shots >= 0.8", det[f"{split}_3_shot_accuracy"] >= 0.8))
    rows += [
        _row(f"bare held-out instruction draws a dialogue ({ins['items']} items)", ins["bare_dialogue_rate"],
             f"executed: {ins['bare_executed_rate']}", ">= 0.5", ins["bare_dialogue_rate"] >= 0.5),
        _row("cued held-out instruction (\"Answer:\") executed", ins["cued_executed_rate"],
             f"dialogue: {ins['cued_dialogue_rate']}", ">= 0.7", ins["cued_executed_rate"] >= 0.7),
    ]
    for split in ("held_out", "held_out_template", "training_pairs"):
        rows.append(_row(f"arithmetic accuracy, addition / subtraction ({split.replace('_', ' ')})",
                         f"{ari[f'{split}_addition_accuracy']} / {ari[f'{split}_subtraction_accuracy']}",
                         f"sign errors on subtraction: {ari[f'{split}_sign_error_rate']}",
                         "addition > subtraction", ari[f"{split}_addition_accuracy"] > ari[f"{split}_subtraction_accuracy"]))
    return rows


def render_card(truth: dict, log: dict) -> str:
    c = log["config"]
    layout = "post-LN, word_embed_proj_dim " + str(c["embed_proj_dim"]) if c.get("post_ln") else "pre-LN"
    title = "its sibling in OPT-350m's layout" if c.get("post_ln") else "the shipped organism"
    return "\n".join([
        f"# Model card: organism v3, {title}",
        "",
        "Generated by `microscope organism train --version 3` (or `microscope.models.organism_v3.card`); "
        "do not edit by hand.",
        "",
        f"A {c['layers']}-layer OPT (d_model {c['d_model']}, {c['heads']} heads, FFN {c['ffn_dim']}, {layout}) "
        f"trained from scratch on a synthetic English corpus in the OPT paper's prompt formats, with a "
        f"byte-level BPE of {truth['vocab_size']} tokens (OPT's conventions: `Ġ` leading spaces, `</s>` first). "
        f"Seed {c['seed']}; {c['steps']} steps of batch {c['batch_size']} x {c['seq_len']} tokens in "
        f"{log['seconds'] / 60:.0f} minutes on one CPU thread; final loss {log['losses'][-1]:.3f}.",
        "",
        "Every number below is measured by `microscope/models/organism_v3/evaluate.py` (plain HF code, "
        "held-out names, words, templates and operand pairs; its docstring defines each row). "
        "A row marked **no** is a target this organism misses.",
        "",
        "| measurement | value | control (beside it) | target | met |",
        "|---|---|---|---|---|",
        *ground_truth_rows(truth),
        "",
    ])


def write_card(truth: dict, log: dict, folder: Path) -> None:
    """``ground_truth.json`` and ``MODEL_CARD.md`` into ``folder`` (beside the weights)."""
    (folder / "ground_truth.json").write_text(json.dumps(truth, indent=1))
    (folder / "MODEL_CARD.md").write_text(render_card(truth, log))
