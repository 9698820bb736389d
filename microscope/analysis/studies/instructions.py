"""Instruction-following failures: does the model execute an instruction or simulate a dialogue?

The OPT paper: given a bare instruction, OPT tends to continue with a made-up conversation about
it rather than carrying it out. Measurements, each with its control (docs/evidence.md "Controls"):

- rates: every prompt's greedy continuation classified (`classify_continuation`) as execution,
  dialogue or other, per format (bare, cued with the set's answer cue) and split; the claims (bare prompts
  draw dialogue, cued ones execution) against random-init models of the same shape;
- pairs: each cued prompt and its *bare twin* (the same text without the cue, `bare_twins`; the
  two are read at their own last tokens, so their token lengths may differ); the metric is the logit difference
  execution token (the answer's first token) minus dialogue token (the set's first turn marker) at the last token
  (Zhang & Nanda 2023);
- the decision layer: the first lens point from which the lens separates the pairs (execution
  ahead in the cued prompt, dialogue ahead in its twin) in most pairs and more than in any
  random-init model, under the logit lens and a tuned lens (`studies.layers`);
- patching (denoising): each head's and each MLP's last-token output of the cued run written into
  its twin's run, the share of the logit difference it restores, the strongest against every
  other component and its effect against random-init models; ablation of that component in the
  cued run (zero, mean, resample) against ablating each other component. The strongest is chosen
  on the even pairs and every number about it is measured on the odd pairs, which chose nothing
  (``chosen_on``). Only the last token runs per intervention: the prefixes are cached
  (`analysis.last_token`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch

from microscope.analysis.attribution_patching import screened, site_gradients
from microscope.analysis.controls import DEFAULT_SEEDS, RATE_MIN_GAP, Controlled, random_init_scopes, sentence
from microscope.analysis.inputs import (first_token_id, last_positions, task_value, token_batch,
                                        word_class_ids)
from microscope.analysis.last_token import LastToken
from microscope.analysis.progress import Progress, report
from microscope.analysis.results import Result, round_headline, rounded
from microscope.analysis.studies.base import greedy_new_tokens, rows_of, split_of, split_suffix
from microscope.analysis.studies.layers import LENS_STEPS, LENSES, LayerClaim, kl_figure, read_last_token
from microscope.errors import AnalysisInputError
from microscope.hooks.interventions import ABLATIONS
from microscope.names import act_name, head_label, short_label
from microscope.prompts import Prompt
from microscope.viz.figures import line_plot

EXECUTION, DIALOGUE, OTHER = "execution", "dialogue", "other"


def _normal(word: str) -> str:
    """A word as it is compared: lower case, without closing punctuation (``"7."`` -> ``"7"``)."""
    return word.lower().rstrip(".,;!?\"'")


def classify_continuation(continuation: str | Sequence[str], answer: str | Sequence[str] | None = None,
                          *, turn_markers: Sequence[str], cue: str,
                          end_markers: Sequence[str] = ("</s>",)) -> str:
    """``"execution"``, ``"dialogue"`` or ``"other"`` for one continuation (a text or its words).

    execution: after an optional leading cue, the continuation starts with ``answer`` word for word
    (whatever follows; without an ``answer`` nothing counts as execution); dialogue: otherwise, a
    turn marker (e.g. ``User:``/``Bot:``) appears before any cue and before the text ends (an end
    marker such as ``</s>``: what follows is another document); other: neither. Words compare
    case-insensitively and without closing punctuation (``"2, 5, 7."`` is the answer ``2, 5, 7``).
    """
    if isinstance(continuation, str):
        for end in end_markers:
            continuation = continuation.split(end)[0]
        words = continuation.split()
    else:
        words = list(continuation)
    lowered = [_normal(w) for w in words]
    if answer is not None:
        expected = [_normal(w) for w in (answer.split() if isinstance(answer, str) else answer)]
        if not expected:
            raise AnalysisInputError("answer is empty: give the executed result, or None")
        body = lowered[1:] if lowered[:1] == [_normal(cue)] else lowered
        if body[:len(expected)] == expected:
            return EXECUTION
    markers = {_normal(m) for m in turn_markers}
    stops = {_normal(cue), *(_normal(m) for m in end_markers)}
    for word in lowered:
        if word in stops:
            break
        if word in markers:
            return DIALOGUE
    return OTHER

# ---- cued/bare pairs and last-token interventions ---------------------------------------------

def bare_twins(rows: Sequence[Prompt], cue: str) -> list[tuple[Prompt, str]]:
    """(cued prompt, its bare twin) for every cued prompt ending in ``cue``: the twin is the same
    text without the cue (and the space before it), the bare instruction. The two differ in token
    length by the cue's tokens; every pair measurement reads each prompt's own last token."""
    return [(p, p.text[:-len(cue)].rstrip(" ")) for p in rows
            if p.metadata.get("cued") and p.text.endswith(cue) and p.text[:-len(cue)].strip()]


Component = tuple[str, str, int | None]  # (label, hook name, head index or None)
EXACT_COMPONENTS = 24   # components intervened on one by one per measurement; the rest keep their estimate


def components(n_layers: int, n_heads: int) -> list[Component]:
    """Every attention head (``attn.hook_z``, one head) and every MLP (``hook_mlp_out``)."""
    heads = [(head_label(l, h), act_name("z", l), h) for l in range(n_layers) for h in range(n_heads)]
    mlps = [(short_label(act_name("mlp_out", l)), act_name("mlp_out", l), None) for l in range(n_layers)]
    return heads + mlps


@torch.no_grad()
def set_last_token(run: LastToken, component: Component, values: torch.Tensor) -> torch.Tensor:
    """Logits [batch, vocab] at the last token of ``run``'s prompts with ``component``'s output
    there set to ``values`` ([batch, d] or, for a head, [batch, d_head]): patching, zero, mean and
    resample ablation alike. Only the last token runs: the prefixes are cached (`LastToken`)."""
    _, name, head = component

    def put(act, hook):
        out = act.clone()
        index = (slice(None), run.position) if head is None else (slice(None), run.position, head)
        out[index] = values.to(out.device, out.dtype)
        return out
    return run.logits({name: put}).float().cpu()


def _values(acts: dict[str, torch.Tensor], component: Component) -> torch.Tensor:
    _, name, head = component
    return acts[name] if head is None else acts[name][:, head]


ALL = slice(None)
# the strongest component is chosen on the even pairs and measured on the odd ones, which chose nothing
FIT_PAIRS, EVALUATION_PAIRS = slice(0, None, 2), slice(1, None, 2)
CHOSEN_ON = "fit pairs (even): the strongest component; its shares, effect and ablations are measured on the " \
            "evaluation pairs (odd)"


@dataclass
class PairMeasure:
    """Patching and ablation on the (cued, bare twin) pairs of one model, at the last token, in
    logits of execution minus dialogue token: cued/bare [pair]; patched [component, pair] (bare
    run with the component's cued value); ablated {method: [component, pair]} (cued run with the
    component zeroed, mean- or resample-ablated)."""

    cued: torch.Tensor
    bare: torch.Tensor
    patched: torch.Tensor
    ablated: dict[str, torch.Tensor]

    def gap(self, pairs: slice = ALL) -> float:
        """Mean logit difference cued - bare over ``pairs``: what the cue does."""
        return float((self.cued[pairs] - self.bare[pairs]).mean())

    def restored(self, pairs: slice = ALL) -> torch.Tensor:
        """[component] share of the gap that patching the component brings back, over ``pairs``."""
        return (self.patched[:, pairs] - self.bare[None, pairs]).mean(-1) / self.gap(pairs)

    def dropped(self, method: str, pairs: slice = ALL) -> torch.Tensor:
        """[component] share of the gap that ablating the component removes from the cued run."""
        return (self.cued[None, pairs] - self.ablated[method][:, pairs]).mean(-1) / self.gap(pairs)

    def strongest(self) -> int:
        """The component that restores the largest share on the fit pairs (`FIT_PAIRS`)."""
        return int(self.restored(FIT_PAIRS).nan_to_num(-1e9).argmax())

    def strongest_effect(self) -> float:
        """The logits the `strongest` component restores on the evaluation pairs."""
        return float(self.restored(EVALUATION_PAIRS)[self.strongest()]) * self.gap(EVALUATION_PAIRS)


@torch.no_grad()
def measure_pairs(scope, cued: list[str], bare: list[str], execution: torch.Tensor, dialogue: int,
                  parts: list[Component], *, ablate: bool = True, seed: int = 0,
                  exact_components: int = EXACT_COMPONENTS) -> PairMeasure:
    """`PairMeasure` for one model (``ablate=False``: patching only). Mean ablation uses the
    component's mean last-token value over the cued and bare prompts; resample ablation the value
    at the last token of another of them, drawn at random (seeded). Per measurement, the
    ``exact_components`` components of largest attribution estimate (gradient x difference at
    the last token, one backward pass per run) are intervened on one by one; the others keep
    their estimate (`attribution_patching.screened`; every component of a model with this many
    or fewer)."""
    cued_ids, cued_mask = token_batch(scope, cued)
    bare_ids, bare_mask = token_batch(scope, bare)
    names = sorted({name for _, name, _ in parts})
    rows = torch.arange(len(cued))

    def diff(logits: torch.Tensor) -> torch.Tensor:
        return logits[rows, execution] - logits[:, dialogue]

    def last_token_gradients(ids, mask) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(diff [pair], {name: value at the last token}, {name: d diff / d value there})."""
        last = last_positions(mask)
        found = []

        def metric(logits: torch.Tensor) -> torch.Tensor:
            value = diff(logits[rows, last].float().cpu())
            found.append(value.detach())
            return value.sum()
        acts, grads = site_gradients(scope, ids, mask, names, metric)
        at_last = lambda t: {n: t[n][rows, last].float().cpu() for n in names}  # noqa: E731
        return found[0], at_last(acts), at_last(grads)

    cued_diff, cued_acts, cued_grads = last_token_gradients(cued_ids, cued_mask)
    bare_diff, bare_acts, bare_grads = last_token_gradients(bare_ids, bare_mask)
    cued_run, bare_run = LastToken(scope, cued_ids, cued_mask), LastToken(scope, bare_ids, bare_mask)

    def sweep(fills: list[torch.Tensor], on_cued: bool) -> torch.Tensor:
        """[component, pair] diff with each component's last-token value set to its fill."""
        run, base, acts, grads = (cued_run, cued_diff, cued_acts, cued_grads) if on_cued else \
            (bare_run, bare_diff, bare_acts, bare_grads)
        out = torch.stack([base + ((fill - _values(acts, part)) * _values(grads, part)).sum(-1)
                           for part, fill in zip(parts, fills)])

        def exact(index: tuple[int, ...]) -> float:
            out[index[0]] = diff(set_last_token(run, parts[index[0]], fills[index[0]]))
            return float((out[index[0]] - base).mean())
        screened((out - base).mean(-1), exact, exact_components)
        return out

    pool = {n: torch.cat([cued_acts[n], bare_acts[n]]) for n in names}
    g = torch.Generator().manual_seed(seed)
    other = (rows + torch.randint(1, 2 * len(cued), (len(cued),), generator=g)) % (2 * len(cued))
    patched = sweep([_values(cued_acts, part) for part in parts], on_cued=False)
    ablated = {}
    if ablate:
        own = [_values(cued_acts, part) for part in parts]
        everyone = [_values(pool, part) for part in parts]
        ablated = {"zero": sweep([torch.zeros_like(v) for v in own], on_cued=True),
                   "mean": sweep([e.mean(0).expand_as(v) for e, v in zip(everyone, own)], on_cued=True),
                   "resample": sweep([e[other] for e in everyone], on_cued=True)}
    return PairMeasure(cued=cued_diff, bare=bare_diff, patched=patched, ablated=ablated)


def separation(lens_logits: torch.Tensor, execution: torch.Tensor, dialogue: int) -> torch.Tensor:
    """[point] share of pairs in which the lens prefers the execution token in the cued prompt and
    the dialogue token in its bare twin; ``lens_logits`` [point, 2 * pairs, vocab], cued first."""
    n = len(execution)
    rows = torch.arange(2 * n)
    diff = lens_logits[:, rows, execution.repeat(2)] - lens_logits[:, :, dialogue]
    return ((diff[:, :n] > 0) & (diff[:, n:] < 0)).float().mean(-1)


# ---- the study --------------------------------------------------------------------------------

RATE_CLAIMS = ("bare_dialogue_rate", "cued_execution_rate")  # the rates a random model is held against


@dataclass(repr=False)
class InstructionsResult(Result):
    """prompts/cued/splits/answers: the instructions; continuations: greedy words; labels: class
    of each. Pairs: pair_cued/pair_bare texts (a cued prompt and the same text without its cue);
    layers: lens point labels; claims: {lens: `LayerClaim`} of `separation`; components: labels of
    heads and MLPs; measure: the organism's `PairMeasure`; null_rates: {rate key: [seed]};
    null_gap / null_strongest_effect: [seed] cue effect and strongest patch effect (logits) of
    random-init models."""

    prompts: list[str]
    cued: list[bool]
    splits: list[str]
    answers: list[str]
    continuations: list[list[str]]
    labels: list[str]
    pair_cued: list[str]
    pair_bare: list[str]
    layers: list[str]
    claims: dict[str, LayerClaim]
    components: list[str]
    measure: PairMeasure
    null_rates: dict[str, list[float]]
    null_gap: list[float]
    null_strongest_effect: list[float]
    title: str = "instructions: execution or simulated dialogue"

    def rates(self) -> dict[str, float]:
        """``{bare,cued}_{dialogue,execution,other}_rate`` per split, each key ending in its
        `split_suffix` ("" in-distribution, ``_ood``)."""
        return rates_by_split(self.labels, self.cued, self.splits)

    @property
    def strongest(self) -> int:
        """Index of the strongest patched component, chosen on the fit pairs."""
        return self.measure.strongest()

    def findings(self) -> list[str]:
        """Execution, dialogue and where the cue decides, in words with their verdicts."""
        numbers = self.summary()
        layer = numbers["decision_layer_name"]
        return [sentence(numbers, "cued_execution_rate", "cued instructions (ending in the answer cue) are executed "
                                                         "at a rate of"),
                sentence(numbers, "bare_dialogue_rate", "bare instructions draw a simulated dialogue at a rate of"),
                sentence(numbers, "cue_logit_diff", "the cue moves the execution-vs-dialogue logit difference at the "
                                                    "last token by"),
                sentence(numbers, "decision_separation",
                         f"the decision is read at {layer or 'no layer'} (logit lens): the share of pairs separated "
                         f"there is")]

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt: split, format, class of its continuation, the continuation."""
        return pd.DataFrame(dict(prompt=self.prompts, split=self.splits, cued=self.cued, answer=self.answers,
                                 label=self.labels, continuation=[" ".join(c) for c in self.continuations]))

    def figures(self) -> list[go.Figure]:
        curves = {k: v for claim in self.claims.values() for k, v in claim.curves().items()}
        lead = line_plot(curves, x=self.layers, hline=0.5, x_title="layer",
                         y_title="share of pairs separated",
                         title="the cue decides: execution token ahead in the cued prompt, dialogue token in its twin")
        others = [i for i in range(len(self.components)) if i != self.strongest]
        patch = go.Figure(go.Bar(x=self.components, y=self.measure.restored(EVALUATION_PAIRS).tolist()))
        patch.update_layout(title="patching cued -> bare twin at the last token: share of the logit difference "
                                  "restored (evaluation pairs)", xaxis_title="component", yaxis_title="share restored")
        ablate = go.Figure([go.Bar(name=m, x=[self.components[self.strongest], "others (mean)"],
                                   y=[float(self.measure.dropped(m, EVALUATION_PAIRS)[self.strongest]),
                                      float(self.measure.dropped(m, EVALUATION_PAIRS)[others].mean())])
                           for m in ABLATIONS])
        ablate.update_layout(title="ablating the strongest component vs the others (cued prompts)",
                             yaxis_title="share of the logit difference removed", barmode="group")
        shown = [(f, split) for split in dict.fromkeys(self.splits) for f in ("bare", "cued")]
        rates = go.Figure([go.Bar(name=label, x=[f"{f} ({split})" for f, split in shown],
                                  y=[self.rates()[f"{f}_{label}_rate{split_suffix(split)}"] for f, split in shown])
                           for label in (EXECUTION, DIALOGUE, OTHER)])
        rates.update_layout(title="greedy continuations by format and split", yaxis_title="share", barmode="group")
        return [lead, patch, ablate, rates, kl_figure(self.claims)]

    def summary(self) -> dict:
        """Rates (per split, `split_suffix`; the claims with a random-init control) and the
        dialogue contrast (bare minus cued dialogue rate: the cue switches dialogue off); the
        decision layer under both lenses (``decision_layer_name``: 'embed' or 'Lk', the residual
        stream after block k, see `studies.layers`) with the separation there and its control;
        the cue's logit difference; the strongest patched component (``strongest_patch_component``)
        with its share restored against the other components and its effect against random-init
        models; the share of the cue's effect that zero, mean and resample ablation of it remove,
        against the others. The layer and component claims rest on the cue's logit difference
        clearing its control; ``strongest_patch_site`` names the component only when its share
        and its effect both clear."""
        rates = self.rates()
        out: dict = {}
        for key, value in rates.items():
            if key.rsplit("_rate", 1)[0] + "_rate" in RATE_CLAIMS:
                out.update(round_headline(Controlled(value, self.null_rates[key], "random init",
                                                     min_gap=RATE_MIN_GAP).headline(key)))
            else:
                out[key] = value
        for suffix in dict.fromkeys(k[len("bare_dialogue_rate"):] for k in rates if k.startswith("bare_dialogue_rate")):
            contrast = rates[f"bare_dialogue_rate{suffix}"] - rates[f"cued_dialogue_rate{suffix}"]
            null = [b - c for b, c in zip(self.null_rates[f"bare_dialogue_rate{suffix}"],
                                          self.null_rates[f"cued_dialogue_rate{suffix}"])]
            out.update(round_headline(Controlled(contrast, null, "random init", min_gap=RATE_MIN_GAP
                                                 ).headline(f"dialogue_contrast{suffix}")))
        # which layer decides and which component carries the cue rest on the cue having an effect
        cue = Controlled(self.measure.gap(), self.null_gap, "random init")
        for claim in self.claims.values():
            out.update(claim.resting_on("cue_logit_diff", cue.clears).headline("decision_layer", "decision_separation"))
        out["decision_separation_by_layer"] = [rounded(v, 3) for v in self.claims["logit_lens"].values.tolist()]
        out["decision_separation_by_layer_tuned_lens"] = [rounded(v, 3) for v in
                                                          self.claims["tuned_lens"].values.tolist()]
        out.update(round_headline(cue.headline("cue_logit_diff")))
        best = self.strongest
        others = [i for i in range(len(self.components)) if i != best]
        restored = self.measure.restored(EVALUATION_PAIRS)
        carried = {"strongest_patch_restored": Controlled(float(restored[best]), restored[others].tolist(),
                                                          "each other head and MLP"),
                   "strongest_patch_effect": Controlled(self.measure.strongest_effect(), self.null_strongest_effect,
                                                        "strongest component of random init"),
                   **{f"strongest_ablation_drop_{method}": Controlled(
                       float(self.measure.dropped(method, EVALUATION_PAIRS)[best]),
                       self.measure.dropped(method, EVALUATION_PAIRS)[others].tolist(),
                       "each other head and MLP") for method in ABLATIONS}}
        carried = {k: c.resting_on("cue_logit_diff", cue.clears) for k, c in carried.items()}
        out["strongest_patch_component"] = self.components[best]     # what the strongest_* numbers are about
        named = carried["strongest_patch_restored"].clears and carried["strongest_patch_effect"].clears
        out["strongest_patch_site"] = self.components[best] if named else None
        for key, claim in carried.items():
            out.update(round_headline(claim.headline(key)))
        out["pairs"] = len(self.pair_cued)
        out["chosen_on"] = CHOSEN_ON
        out["prompts"] = len(self.prompts)
        return out


def rates_by_split(labels: Sequence[str], cued: Sequence[bool], splits: Sequence[str]) -> dict[str, float]:
    """Share of each class per format and split: ``bare_dialogue_rate{split_suffix(split)}``, ..."""
    out = {}
    for split in dict.fromkeys(splits):
        for fmt, flag in (("bare", False), ("cued", True)):
            sel = [l for l, c, s in zip(labels, cued, splits) if c == flag and s == split]
            for label in (DIALOGUE, EXECUTION, OTHER):
                out[f"{fmt}_{label}_rate{split_suffix(split)}"] = \
                    rounded(sum(l == label for l in sel) / len(sel)) if sel else float("nan")
    return out


def _classify(scope, texts: list[str], answers: list[str], max_new_tokens: int, turn_markers, cue
              ) -> tuple[list[list[str]], list[str]]:
    new = greedy_new_tokens(scope, texts, max_new_tokens)
    words = [scope.tokenizer.decode(row.tolist()).split("</s>")[0].split() for row in new]
    return words, [classify_continuation(w, a, turn_markers=turn_markers, cue=cue) for w, a in zip(words, answers)]


@torch.no_grad()
def run_instructions(scope, prompts: Sequence[Prompt] | str = "instructions", *, max_new_tokens: int = 12,
                     dialogue_token: str | None = None, cue_token: str | None = None,
                     turn_markers: Sequence[str] | None = None, n_prompts: int | None = None,
                     seeds: Sequence[int] = DEFAULT_SEEDS, lens_steps: int = LENS_STEPS,
                     exact_components: int = EXACT_COMPONENTS, progress: Progress | None = None) -> InstructionsResult:
    """The instructions study (see module docstring), with its controls: every measurement again
    on random-init models of the same shape (``seeds``).

    prompts: a set name or `Prompt`s with metadata ``cued`` (bool), ``answer`` (the executed
    result, words), ``items`` (the list) and ``split``; cue_token (the answer cue a cued prompt
    ends in), dialogue_token (the turn marker whose logit the pairs compare) and turn_markers
    (every marker of a dialogue): the format, by default the prompt set's task
    (``<set>.task.json``); n_prompts: keep the first n; lens_steps: Adam steps of each
    tuned lens; exact_components: heads and MLPs patched and ablated one by one per measurement,
    those of largest attribution estimate (every component of a model with this many or fewer:
    the organism's 20; 24 of opt-125m's 156); progress: hears each piece of work as it finishes
    (`analysis.progress`)."""
    dialogue_token = task_value(prompts, "dialogue_token", dialogue_token, parameter="dialogue_token")
    cue_token = task_value(prompts, "cue_token", cue_token, parameter="cue_token")
    turn_markers = list(task_value(prompts, "turn_markers", turn_markers, parameter="turn_markers"))
    rows = rows_of(prompts)[:n_prompts]
    bad = [i for i, p in enumerate(rows) if "cued" not in p.metadata or "answer" not in p.metadata]
    if not rows or bad:
        raise AnalysisInputError(f"instruction prompts need metadata 'cued' and 'answer'; bad ones: {bad[:5]}")
    texts = [p.text for p in rows]
    cued = [bool(p.metadata["cued"]) for p in rows]
    splits = [split_of(p) for p in rows]
    answers = [str(p.metadata["answer"]) for p in rows]
    pairs = bare_twins(rows, cue_token)
    if not pairs:
        raise AnalysisInputError(f"no cued prompt ends in {cue_token!r}: nothing to pair")
    pair_cued, pair_bare = [p.text for p, _ in pairs], [twin for _, twin in pairs]
    execution = torch.tensor([first_token_id(scope, str(p.metadata["answer"])) for p, _ in pairs])
    dialogue = int(word_class_ids(scope, [dialogue_token], parameter="dialogue_token", prompts=prompts)[0])
    config = scope.model.config
    parts = components(config.num_hidden_layers, config.num_attention_heads)

    def measure(model_scope, ablate: bool = False):
        words, labels = _classify(model_scope, texts, answers, max_new_tokens, turn_markers, cue_token)
        readings = read_last_token(model_scope, pair_cued + pair_bare, lens_steps=lens_steps)
        pair = measure_pairs(model_scope, pair_cued, pair_bare, execution, dialogue, parts, ablate=ablate,
                             exact_components=exact_components)
        stats = {lens: separation(readings.logits[lens], execution, dialogue) for lens in LENSES}
        return words, labels, readings, pair, stats

    words, labels, readings, pair, stats = measure(scope, ablate=True)
    report(progress, "continuations, lenses, patching")
    null = [measure(s) for s in random_init_scopes(scope, seeds, progress=progress)]
    claims = {lens: LayerClaim(lens=lens, layers=readings.layers, values=stats[lens],
                               null=torch.stack([n[4][lens] for n in null]), kl=readings.kl[lens], floor=0.5,
                               statistic="separation", control=f"random init x{len(null)}") for lens in LENSES}
    null_rates = [rates_by_split(n[1], cued, splits) for n in null]
    return InstructionsResult(
        prompts=texts, cued=cued, splits=splits, answers=answers, continuations=words, labels=labels,
        pair_cued=pair_cued, pair_bare=pair_bare, layers=readings.layers, claims=claims,
        components=[label for label, _, _ in parts], measure=pair,
        null_rates={k: [r[k] for r in null_rates] for k in null_rates[0]},
        null_gap=[n[3].gap() for n in null],
        null_strongest_effect=[n[3].strongest_effect() for n in null])
