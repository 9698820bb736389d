"""Instruction-following failures: does the model execute an instruction or simulate a dialogue?

The OPT paper: given a bare instruction, OPT tends to continue with a made-up conversation about
it rather than carrying it out. Three measurements:

- `classify_continuation`: execution, dialogue or other, for one continuation;
- the decision layer: under the logit lens at the prompt's last token, the first layer from which
  the dialogue token (``user:``) stays ahead of the execution token (``answer:``) in most bare
  instructions while the execution token (the answer's first word) stays ahead in most cued ones;
- patching between the cued (``... answer:``) and bare formats: the last-token residual of the
  cued run written into the bare run, layer by layer, and how much of the answer-vs-dialogue
  logit difference it restores (the layer where the decision is made is where this jumps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch

from microscope.analysis.inputs import last_positions, token_batch
from microscope.analysis.lens import logit_lens
from microscope.analysis.results import Result
from microscope.analysis.studies.base import (first_layer_from, first_token_id, greedy_new_tokens,
                                              single_token_id)
from microscope.errors import AnalysisInputError
from microscope.names import act_name, head_label, short_label
from microscope.prompts import Prompt, load_prompts
from microscope.viz.figures import line_plot

EXECUTION, DIALOGUE, OTHER = "execution", "dialogue", "other"


def classify_continuation(continuation: str | Sequence[str], answer: str | Sequence[str] | None = None,
                          *, turn_markers: Sequence[str] = ("user:", "bot:"),
                          cue: str = "answer:", end_markers: Sequence[str] = ("</s>",)) -> str:
    """``"execution"``, ``"dialogue"`` or ``"other"`` for one continuation (words or a text).

    execution: after an optional leading cue, the continuation starts with ``answer`` word for word
    (whatever follows; without an ``answer`` nothing counts as execution); dialogue: otherwise, a
    turn marker (``user:``/``bot:``, case-insensitive) appears before any cue and before the text
    ends (an end marker such as ``</s>``: what follows is another document); other: neither.
    """
    words = continuation.split() if isinstance(continuation, str) else list(continuation)
    lowered = [w.lower() for w in words]
    if answer is not None:
        expected = [w.lower() for w in (answer.split() if isinstance(answer, str) else answer)]
        if not expected:
            raise ValueError("answer is empty: give the executed result, or None")
        body = lowered[1:] if lowered[:1] == [cue.lower()] else lowered
        if body[:len(expected)] == expected:
            return EXECUTION
    markers = {m.lower() for m in turn_markers}
    stops = {cue.lower(), *(m.lower() for m in end_markers)}
    for word in lowered:
        if word in stops:
            break
        if word in markers:
            return DIALOGUE
    return OTHER

# ---- the study --------------------------------------------------------------------------------

@dataclass(repr=False)
class InstructionsResult(Result):
    """prompts/cued/answers: the instructions; continuations: greedy words; labels: class of each;
    layers: lens point labels; lens_margin: [layer, batch] lens logit of the dialogue token minus
    that of the execution token at each prompt's last token (execution token: ``answer:`` for a
    bare prompt, the answer's first word for a cued one); patch_sites: component names;
    patch_restored: [site] share of the bare-to-cued drop in log p(dialogue token) (``patch_drop``,
    nats) that pasting the cued run's last-token output of that component into the bare run
    brings about."""

    prompts: list[str]
    cued: list[bool]
    answers: list[str]
    continuations: list[list[str]]
    labels: list[str]
    layers: list[str]
    lens_margin: torch.Tensor
    patch_sites: list[str]
    patch_restored: torch.Tensor
    patch_drop: float
    dialogue_token: str
    title: str = "instructions: execution or simulated dialogue"

    def rate(self, label: str, cued: bool) -> float:
        sel = [l for l, c in zip(self.labels, self.cued) if c == cued]
        return sum(l == label for l in sel) / len(sel) if sel else float("nan")

    def _bare(self) -> torch.Tensor:
        return torch.tensor([not c for c in self.cued])

    def dialogue_lead(self, cued: bool = False) -> torch.Tensor:
        """[layer] share of prompts (bare or cued) whose dialogue token leads under the lens."""
        sel = ~self._bare() if cued else self._bare()
        return (self.lens_margin[:, sel] > 0).float().mean(-1)

    @property
    def decision_layer(self) -> int | None:
        """First lens point from which the two formats part ways for good: the dialogue token
        leads in most bare prompts and the execution token leads in most cued ones (None: never)."""
        bare, cued = self.dialogue_lead(False), self.dialogue_lead(True)
        return first_layer_from([bool(b > 0.5 and c < 0.5) for b, c in zip(bare, cued)])

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt: format, class of its continuation, the continuation, and the lens
        margin at each layer (columns ``margin_<layer>``)."""
        frame = pd.DataFrame(dict(prompt=self.prompts, cued=self.cued, answer=self.answers, label=self.labels,
                                  continuation=[" ".join(c) for c in self.continuations]))
        for l, layer in enumerate(self.layers):
            frame[f"margin_{layer}"] = self.lens_margin[l].tolist()
        return frame

    def figures(self) -> list[go.Figure]:
        lead = line_plot({"bare instructions": self.dialogue_lead(False), "cued (answer:)": self.dialogue_lead(True)},
                         x=self.layers, hline=0.5, x_title="layer", y_title=f"share where {self.dialogue_token} leads",
                         title="logit lens at the last token: the dialogue token against the execution token")
        patch = go.Figure(go.Bar(x=self.patch_sites, y=self.patch_restored.tolist()))
        patch.update_layout(title="patching cued -> bare at the last token: share of the dialogue drop restored",
                            xaxis_title="component", yaxis_title="share of the drop")
        rates = go.Figure([go.Bar(name=label, x=["bare", "cued"], y=[self.rate(label, False), self.rate(label, True)])
                           for label in (EXECUTION, DIALOGUE, OTHER)])
        rates.update_layout(title="greedy continuations", yaxis_title="share", barmode="group")
        return [lead, patch, rates]

    def summary(self) -> dict:
        best = int(self.patch_restored.nan_to_num(-1e9).argmax()) if len(self.patch_sites) else None
        return {
            "bare_dialogue_rate": round(self.rate(DIALOGUE, False), 4),
            "bare_execution_rate": round(self.rate(EXECUTION, False), 4),
            "cued_dialogue_rate": round(self.rate(DIALOGUE, True), 4),
            "cued_execution_rate": round(self.rate(EXECUTION, True), 4),
            "decision_layer": self.decision_layer,
            "decision_layer_name": None if self.decision_layer is None else self.layers[self.decision_layer],
            "bare_dialogue_lead_by_layer": [round(float(x), 3) for x in self.dialogue_lead(False)],
            "cued_dialogue_lead_by_layer": [round(float(x), 3) for x in self.dialogue_lead(True)],
            "dialogue_logprob_drop": round(self.patch_drop, 4),
            "strongest_patch_site": None if best is None else self.patch_sites[best],
            "strongest_patch_restored": None if best is None else round(float(self.patch_restored[best]), 4),
            "prompts": len(self.prompts),
        }


def _last_token_outputs(scope, texts: list[str], names: list[str]) -> tuple[torch.Tensor, dict]:
    """(log-probs [batch, vocab] at each text's last token, {name: activation at that token})."""
    ids, mask = token_batch(scope, texts)
    logits, cache = scope.run_with_cache(ids, names=names, attention_mask=mask)
    last = last_positions(mask)
    rows = torch.arange(len(texts))
    acts = {n: cache[n][rows.to(cache[n].device), last.to(cache[n].device)] for n in names}
    return logits.float()[rows, last.to(logits.device)].log_softmax(-1).cpu(), acts


@torch.no_grad()
def patch_cued_into_bare(scope, bare: list[str], cued: list[str], dialogue_id: int,
                         sites: list[str]) -> tuple[torch.Tensor, float]:
    """([site] share restored, drop): the drop is the mean fall in log p(dialogue) at the last
    token from bare to cued prompts; the share is how much of it pasting the cued run's last-token
    value of one hook into the bare run's last token brings about (mean effect / mean drop).
    ``sites`` are hook names; ``attn.hook_z`` names may carry ``:head`` to patch one head."""
    names = sorted({s.split(":")[0] for s in sites})
    bare_lp, _ = _last_token_outputs(scope, bare, [])
    cued_lp, cued_acts = _last_token_outputs(scope, cued, names)
    drop = float((bare_lp[:, dialogue_id] - cued_lp[:, dialogue_id]).mean())
    ids, mask = token_batch(scope, bare)
    last = last_positions(mask)
    rows = torch.arange(len(bare))
    restored = []
    for site in sites:
        name, _, head = site.partition(":")

        def paste(act, hook, name=name, head=head):
            out = act.clone()
            src = cued_acts[name].to(out.device, out.dtype)
            if head:
                out[rows, last, int(head)] = src[:, int(head)]
            else:
                out[rows, last] = src
            return out
        with scope.hooks({name: paste}):
            lp = scope.run(ids, attention_mask=mask).float()[rows, last].log_softmax(-1).cpu()
        effect = float((bare_lp[:, dialogue_id] - lp[:, dialogue_id]).mean())
        restored.append(effect / drop if abs(drop) > 1e-6 else float("nan"))
    return torch.tensor(restored), drop


@torch.no_grad()
def run_instructions(scope, prompts: Sequence[Prompt] | str = "instructions", *, max_new_tokens: int = 12,
                     dialogue_token: str = "user:", cue_token: str = "answer:",
                     turn_markers: Sequence[str] = ("user:", "bot:"), n_prompts: int | None = None
                     ) -> InstructionsResult:
    """The instructions study (see module docstring).

    prompts: a set name or `Prompt`s with metadata ``cued`` (bool) and ``answer`` (the executed
    result, words); every bare prompt should have a cued twin (the same text plus the cue)."""
    rows = load_prompts(prompts) if isinstance(prompts, str) else list(prompts)
    rows = rows[:n_prompts] if n_prompts is not None else rows
    bad = [i for i, p in enumerate(rows) if "cued" not in p.metadata or "answer" not in p.metadata]
    if not rows or bad:
        raise AnalysisInputError(f"instruction prompts need metadata 'cued' and 'answer'; bad ones: {bad[:5]}")
    texts = [p.text for p in rows]
    cued = [bool(p.metadata["cued"]) for p in rows]
    answers = [str(p.metadata["answer"]) for p in rows]

    new = greedy_new_tokens(scope, texts, max_new_tokens)
    words = [[scope.tokenizer.decode([int(t)]).strip() for t in row] for row in new]
    labels = [classify_continuation(w, a, turn_markers=turn_markers, cue=cue_token) for w, a in zip(words, answers)]

    dialogue_id = single_token_id(scope, dialogue_token)
    execution_ids = torch.tensor([first_token_id(scope, a) if c else single_token_id(scope, cue_token)
                                  for a, c in zip(answers, cued)])
    lens = logit_lens(scope, texts, position="last")
    logits = lens.logits[:, :, 0]
    margin = logits[:, :, dialogue_id] - logits[:, torch.arange(len(rows)), execution_ids]

    pairs = {p.text: p for p in rows if p.metadata["cued"]}
    bare_texts, cued_texts = [], []
    for p in rows:
        twin = f"{p.text} {cue_token}"
        if not p.metadata["cued"] and twin in pairs:
            bare_texts.append(p.text)
            cued_texts.append(twin)
    n_layers, n_heads = scope.model.config.num_hidden_layers, scope.model.config.num_attention_heads
    sites = [act_name(site, l) for l in range(n_layers) for site in ("attn_out", "mlp_out")]
    labels_short = [short_label(name) for name in sites]
    sites += [f"{act_name('z', l)}:{h}" for l in range(n_layers) for h in range(n_heads)]
    labels_short += [head_label(l, h) for l in range(n_layers) for h in range(n_heads)]
    if not bare_texts:
        raise AnalysisInputError(f"no bare prompt has a cued twin (the same text plus ' {cue_token}')")
    restored, drop = patch_cued_into_bare(scope, bare_texts, cued_texts, dialogue_id, sites)
    return InstructionsResult(prompts=texts, cued=cued, answers=answers, continuations=words, labels=labels,
                              layers=lens.layers, lens_margin=margin, patch_sites=labels_short,
                              patch_restored=restored, patch_drop=drop, dialogue_token=dialogue_token)
