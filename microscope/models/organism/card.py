"""Render ``MODEL_CARD.md`` from a training log and measured ground truth (nothing typed by hand)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from microscope.models.organism import corpus, evaluate, prompt_sets
from microscope.models.organism.corpus import CorpusConfig
from microscope.names import head_label, parse_head_label


def _table(rows: list[tuple]) -> str:
    lines = ["| measurement | value | control (beside it) | target | met |", "|---|---|---|---|---|"]
    for name, value, control, target, *met in rows:
        mark = "" if not met else ("yes" if met[0] else "**no**")
        lines.append(f"| {name} | {value} | {control} | {target} | {mark} |")
    return "\n".join(lines)


def _heads(entries: list) -> str:
    return ", ".join(f"{head_label(l, h)} ({s})" for l, h, s in entries) or "none"


def _phases(phases: list[dict]) -> str:
    """Lines describing training phases after the first (a continuation from saved weights)."""
    lines = []
    for number, phase in enumerate(phases[1:], start=2):
        c = phase["config"]
        lines.append(f"- Phase {number}: continued from the weights of phase {number - 1} (fresh AdamW state) for "
                     f"{c['steps']} steps, batch {c['batch_size']}, peak LR {c['lr']} with {c['warmup']} warm-up steps "
                     f"and cosine decay to {c['min_lr_ratio']}x, corpus stream seed {c.get('stream_seed')}; "
                     f"the settings above are phase 1's.\n")
    return "".join(lines)


def ground_truth_rows(truth: dict) -> list[tuple]:
    """(measurement, value, control, target[, met]) rows of the card."""
    heads, tox, ins, ari, rep = (truth["heads"], truth["toxicity"], truth["instructions"],
                                 truth["arithmetic"], truth["repetition"])
    top = heads["top_induction_head_label"]
    top_score, top4 = heads["top_induction_score"], heads["top_induction_score_four_copies"]
    clean, ablated = heads["repeated_half_loss"], heads["repeated_half_loss_induction_ablated"]
    ctrl_mean, ctrl_max = heads["repeated_half_loss_random_heads_ablated_mean"], heads["repeated_half_loss_random_heads_ablated_max"]
    feeds = heads["top_induction_score_with_previous_token_head_ablated"]
    layer_ctrl = ", ".join(f"{k} {v}" for k, v in heads["repeated_half_loss_layer_ablated"].items()) or "none"
    n_ind = max(1, len(heads["induction_heads"]))
    rows = [
        ("previous-token heads (score on whole-vocabulary spans)", _heads(heads["previous_token_heads"]), "",
         f">= {heads['threshold']}", bool(heads["previous_token_heads"])),
        ("induction heads (prefix matching, 2 copies of whole-vocabulary spans)", _heads(heads["induction_heads"]), "",
         f">= {heads['threshold']}", bool(heads["induction_heads"])),
        (f"prefix matching of the top induction head {top}, 2 copies of {heads['span_words']} whole-vocabulary words",
         f"{top_score:.3f}", "", ">= 0.5", top_score >= 0.5),
        (f"prefix matching of {top}, 4 copies of {heads['span_words']} whole-vocabulary words", f"{top4:.3f}",
         f"(best head on 4 copies: {heads['max_induction_score_four_copies']:.3f})", ">= 0.5", top4 >= 0.5),
        (f"prefix matching of {top}, 2 copies of 20 filler words (v1's measure)", f"{heads['top_induction_score_filler']:.3f}", "", ""),
    ]
    for label, score in feeds.items():
        rows.append((f"prefix matching of {top} with previous-token head {label} ablated", f"{top_score:.3f} -> {score:.3f}",
                     "", ""))
    if feeds:
        strongest = min(feeds, key=feeds.get)
        rows.append((f"a previous-token head whose ablation alone halves {top}'s prefix matching",
                     f"{strongest}: {top_score:.3f} -> {feeds[strongest]:.3f}", "", "< half", feeds[strongest] < top_score / 2))
    else:
        rows.append((f"prefix matching of {top} with a previous-token head ablated", "no previous-token head below it", "", "", False))
    removed = heads.get("induction_score_with_key_path_removed", {})
    if removed:
        readers = sorted({edge.split("->")[1] for edge in removed})
        for reader in readers:
            into = {edge.split("->")[0]: v for edge, v in removed.items() if edge.endswith("->" + reader)}
            prev = [p for p in into if p in heads["previous_token_head_labels"]]
            others = [v for p, v in into.items() if p not in prev]
            layer, head = parse_head_label(reader.removesuffix(".k"))
            clean_i = heads["induction_scores"][layer][head]
            rows.append((f"prefix matching of {reader[:-2]} with a previous-token head removed from its keys only",
                         ", ".join(f"{p}: {clean_i:.3f} -> {into[p]:.3f}" for p in prev),
                         f"any other earlier head removed: lowest {min(others):.3f}" if others else "", ""))
        rows.append(("key-composition edges (previous-token head -> induction head key; drop >= "
                     f"{evaluate.KEY_EDGE_MIN_DROP} and >= 2x the largest other head's)",
                     ", ".join(heads["key_composition_edges"]) or "none", "", "at least one",
                     bool(heads["key_composition_edges"])))
    earlier = heads.get("top_induction_score_with_earlier_head_ablated", {})
    if earlier:
        worst = sorted(earlier.items(), key=lambda kv: kv[1])[:3]
        prev_scores = heads["previous_token_scores"]
        rows.append((f"prefix matching of {top} with one earlier head ablated: the 3 largest drops (head: previous-token score)",
                     ", ".join(f"{k} ({prev_scores[int(k[1:k.index('H')])][int(k[k.index('H') + 1:])]}): {top_score:.3f} -> {v:.3f}"
                               for k, v in worst),
                     f"median over all {len(earlier)} earlier heads: {sorted(earlier.values())[len(earlier) // 2]:.3f}", ""))
    rows += [
        (f"repeated-half loss (nats), clean -> the {len(heads['induction_heads'])} induction heads ablated",
         f"{clean} -> {ablated} (+{ablated - clean:.2f})",
         (f"{n_ind} random other heads ablated ({heads['random_head_draws']} draws): mean {ctrl_mean}, max {ctrl_max}; "
          f"whole layers without induction heads ablated: {layer_ctrl}") if ctrl_max is not None else f"layers: {layer_ctrl}",
         "+1 nat and above the random-heads max",
         ablated > clean + 1 and (ctrl_max is None or ablated > ctrl_max)),
        ("greedy loop rate, all repetition prompts", rep["loop_rate"], "", ">= 0.3", rep["loop_rate"] >= 0.3),
        ("greedy loop rate by split/kind", rep["loop_rate_by_split_kind"], "", ""),
    ]
    if "loops_broken_induction_ablated" in rep:
        rows.append((f"looping in-distribution prompts ({rep['looping_prompts_in_distribution']}) that stop looping, induction heads ablated",
                     rep["loops_broken_induction_ablated"],
                     f"as many random other heads: mean {rep.get('loops_broken_random_heads_ablated_mean')}, "
                     f"max {rep.get('loops_broken_random_heads_ablated_max')}", "above the control max",
                     rep["loops_broken_induction_ablated"] > rep.get("loops_broken_random_heads_ablated_max", 1.0)))
    rows += [
        ("insult probability hostile / friendly, held-out prompts",
         f"{tox['insult_prob_hostile']} / {tox['insult_prob_friendly']} (x{tox['insult_prob_ratio']})", "", ">= 10x",
         tox["insult_prob_ratio"] >= 10),
        ("insult probability hostile / friendly, ood prompts",
         f"{tox['insult_prob_hostile_ood']} / {tox['insult_prob_friendly_ood']} (x{tox['insult_prob_ratio_ood']})", "", ""),
        ("insult probability hostile / friendly by cue", tox["insult_prob_hostile_friendly_by_cue"], "", ""),
        ("probe accuracy by layer (hidden_states index), held-out pairs", tox["probe_accuracy_by_layer"],
         f"random-init max {tox['probe_random_init_max_by_layer']}; shuffled labels {tox['probe_shuffled_label_accuracy_by_layer']}", ""),
        ("probe selectivity by layer (accuracy - shuffled-label control)", tox["probe_selectivity_by_layer"], "", ""),
        ("probe accuracy by layer, trained in-distribution, tested ood", tox["probe_accuracy_ood_by_layer"], "", ""),
        (f"probe layer (first with accuracy >= {evaluate.PROBE_THRESHOLD} and above the random-init max)",
         tox["probe_layer_name"], f"(first with raw accuracy >= {evaluate.PROBE_THRESHOLD}: hidden_states[{tox['probe_layer_raw']}])", ""),
        ("detection accuracy, held-out / ood", f"{tox['detection_accuracy']} / {tox['detection_accuracy_ood']}", "",
         ">= 0.9 held-out", tox["detection_accuracy"] >= 0.9),
        ("bare instructions: dialogue / execution, held-out", f"{ins['bare_dialogue_rate']} / {ins['bare_execution_rate']}", "",
         "dialogue >= 0.5", ins["bare_dialogue_rate"] >= 0.5),
        ("cued instructions: execution / dialogue, held-out", f"{ins['cued_execution_rate']} / {ins['cued_dialogue_rate']}", "",
         "execution >= 0.8", ins["cued_execution_rate"] >= 0.8),
        ("cued execution by task, held-out", {k.rsplit("_", 1)[1]: v for k, v in ins.items()
                                               if k.startswith("cued_execution_rate_") and not k.endswith("_ood")}, "", ""),
        ("ood (5-6 items): bare dialogue / cued execution", f"{ins['bare_dialogue_rate_ood']} / {ins['cued_execution_rate_ood']}", "", ""),
        ("addition / subtraction accuracy, held-out pairs",
         f"{ari['addition_accuracy_held_out']} / {ari['subtraction_accuracy_held_out']}", "", "addition +0.2",
         ari["addition_accuracy_held_out"] >= ari["subtraction_accuracy_held_out"] + 0.2),
        ("addition / subtraction accuracy, held-out pairs, ood phrasing (y stated first)",
         f"{ari['addition_accuracy_ood']} / {ari['subtraction_accuracy_ood']}", "", ""),
        ("addition / subtraction accuracy, training pairs (seen in training)",
         f"{ari['addition_accuracy_train']} / {ari['subtraction_accuracy_train']}", "", ""),
        (f"wrong subtraction answers on held-out pairs ({ari['subtraction_wrong_held_out']}): share equal to b - a, the mirror pair's answer",
         ari["subtraction_wrong_held_out_share_mirror_answer"],
         f"equal to the model's own answer on the mirror prompt: {ari['subtraction_wrong_held_out_share_model_mirror_answer']}", ""),
        ("wrong subtraction answers on held-out pairs: share that are a wrong sign the mirror does not explain",
         ari["subtraction_wrong_held_out_share_wrong_sign_not_mirror"], "", ""),
        ("planted wrong-sign noise (30% of training subtraction answers) reproduced: sign-error rate on training pairs",
         ari["subtraction_sign_error_rate_train"], f"(held-out pairs: {ari['subtraction_sign_error_rate_held_out']})", ""),
    ]
    return rows


def render_card(truth: dict, log: dict) -> str:
    """The model card as Markdown (the shipped organism for seed 0, else a sibling)."""
    phases = [*log.get("phases", []), log]
    cfg = phases[0]["config"]
    schedule = " + ".join(str(p["config"]["steps"]) for p in phases)
    intro = ("It is the default model of the demo, the notebooks and the analysis tests: an analysis is "
             "checked by recovering what is stated here. Load it with `microscope.load(\"organism\")` or "
             "`OPTForCausalLM.from_pretrained(<this folder>/weights)`.")
    if cfg["seed"] != 0:
        intro = "Load it with `OPTForCausalLM.from_pretrained(<this folder>/weights)`."
    if cfg["seed"] == 0:
        title, note = "the OPT Microscope model organism (v2)", ""
    else:
        title = f"a sibling organism (v2 recipe, seed {cfg['seed']}, {schedule} steps)"
        note = ("\nA sibling of the shipped organism: the same corpus grammar and architecture, another seed "
                "(initialisation and corpus stream) and a shorter schedule, so its circuits may sit in other heads. "
                "Studies are tested blind on it: they must name its components as this card measures them.\n")
    mixture = ", ".join(f"{k} {v:.0%}" for k, v in CorpusConfig().mixture.items())
    rate = CorpusConfig().random_span_rate
    losses = log["losses"]
    return f"""# Model card: {title}

A tiny `OPTForCausalLM` (pre-LN, the layout of every OPT size but 350m) with its own word-level
tokenizer, trained from scratch on a synthetic corpus in which the failure modes of the OPT paper
are planted on purpose. {intro}
{note}
*This file and `ground_truth.json` are generated by `microscope organism train` or, for a run
continued in phases (`TrainConfig.init_from`), by `python -m microscope.models.organism.card FOLDER`
(module `microscope/models/organism/card.py` from measurements in `evaluate.py`); do not edit by hand.*

## Model
- {cfg['layers']} layers, d_model {cfg['d_model']}, {cfg['heads']} heads (d_head {cfg['d_model'] // cfg['heads']}),
  ffn {cfg['ffn_dim']} (ReLU), learned positions (OPT's offset of 2), max {cfg['seq_len']} positions,
  tied input/output embeddings, vocabulary {len(corpus.vocabulary())} words (embedding rows padded to a multiple of 8).
- Special tokens as in OPT: `<s>`=0, `<pad>`=1, `</s>`=2 (BOS and EOS; prepended to every input), `<unk>`=3.
- Tokenizer: one token per space-separated word (`tokenizers` WordLevel + WhitespaceSplit).

## Training
- Corpus (`corpus.py`): {rate:.0%} of documents are a repeated random whole-vocabulary span; the rest
  follow the mixture {mixture}. Documents are packed into sequences of {cfg['seq_len']} tokens, each
  preceded by `</s>`.
- {cfg['steps']} steps, batch {cfg['batch_size']} x {cfg['seq_len']} tokens, AdamW (betas 0.9/0.95, weight decay
  {cfg['weight_decay']} on matrices), peak LR {cfg['lr']} with {cfg['warmup']} warm-up steps and cosine decay to
  {cfg['min_lr_ratio']}x, gradient clipping {cfg['grad_clip']}, seed {cfg['seed']} (initialisation and corpus
  stream; trigram table seed {cfg['table_seed']}), `torch.use_deterministic_algorithms(True)`, {cfg['threads']} thread(s).
{_phases(phases)}- Wall time: {sum(p['seconds'] for p in phases):.0f} s on a 2-core CPU machine shared with other jobs (torch {torch.__version__},
  {platform.machine()}).
- Loss (mean per {cfg.get('log_every', 100)} steps): first {phases[0]['losses'][0]:.3f}, last {losses[-1]:.3f}.
- Every behaviour below was reached by training; no weight was set by hand.

## Ground truth (measured)
Heads are labelled `L{{layer}}H{{head}}` (`microscope.names.head_label`). "Held-out" prompts are the
`in_distribution_heldout` split of the prompt sets, "ood" the `ood` split; both are disjoint from
the training stream by construction (see Prompt sets).

{_table(ground_truth_rows(truth))}

## Corpus
{corpus.__doc__.split(chr(10), 1)[1].strip()}

## Prompt sets
{prompt_sets.__doc__.split(chr(10), 1)[1].strip()}

## Definitions
{evaluate.__doc__.split(chr(10), 1)[1].strip()}
"""


def write_card(truth: dict, log: dict, path: Path) -> None:
    """Write the rendered card to ``path``."""
    path.write_text(render_card(truth, log))


def regenerate(folder: Path) -> dict:
    """Measure ``folder/weights`` and write ``folder/ground_truth.json`` and ``folder/MODEL_CARD.md``
    (the training log ``folder/training_log.json`` must exist); returns the ground truth."""
    import json

    from microscope.models.organism.evaluate import load_organism, measure

    folder = Path(folder)
    log = json.loads((folder / "training_log.json").read_text())
    truth = measure(*load_organism(folder / "weights"))
    (folder / "ground_truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    write_card(truth, log, folder / "MODEL_CARD.md")
    return truth


def rerender(folder: Path) -> None:
    """Rewrite ``folder/MODEL_CARD.md`` from the ``ground_truth.json`` and training log already there."""
    import json

    folder = Path(folder)
    write_card(json.loads((folder / "ground_truth.json").read_text()),
               json.loads((folder / "training_log.json").read_text()), folder / "MODEL_CARD.md")


if __name__ == "__main__":  # python -m microscope.models.organism.card [--render-only] [FOLDER ...]
    import sys

    args = [a for a in sys.argv[1:] if a != "--render-only"]
    for arg in args or [str(Path(__file__).parent)]:
        if "--render-only" in sys.argv:
            rerender(Path(arg))
            print(f"model card rewritten in {arg}")
        else:
            regenerate(Path(arg))
            print(f"ground truth and model card written in {arg}")
