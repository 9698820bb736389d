"""Repetition loops: how often greedy decoding loops, why repeats reinforce themselves, which heads
do it, and whether removing them breaks the loops.

- loops: greedy continuations of the built-in ``repetition`` set, each checked by
  `loops.detect_loop` (onset, period, repeated-n-gram rate);
- self-reinforcement (Xu et al. 2022, "Learning to break the loop"): a random span said
  ``reinforcement_copies`` times; the mean probability the model gives the tokens of copy k, for
  k = 0 (first occurrence) onwards. Rising with k: each repeat makes the next likelier;
- the heads behind it: induction (prefix-matching) and previous-token scores
  (`head_scores.pattern_head_scores`) on spans of distinct tokens said twice, drawn from the
  tokens of the prompts; the found heads are those with an induction score >=
  ``min_induction_score``, best first;
- the ablation: the same greedy decoding with the found heads' outputs (``attn.hook_z``) set to
  zero; ``loops_broken`` is the share of the loops of the clean run that no longer loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch

from microscope.analysis.head_scores import HeadScores, pattern_head_scores
from microscope.analysis.inputs import token_batch
from microscope.analysis.results import Result
from microscope.analysis.studies.base import greedy_new_tokens
from microscope.analysis.studies.loops import Loop, detect_loop
from microscope.errors import AnalysisInputError
from microscope.hooks.interventions import ablate_heads
from microscope.names import head_label
from microscope.prompts import Prompt, load_prompts
from microscope.viz.figures import head_grid, line_plot


@dataclass(repr=False)
class RepetitionResult(Result):
    """prompts: the texts continued; clean/ablated: `Loop` per continuation without / with the
    found heads ablated; reinforcement: [copies] mean probability of the tokens of copy k (k = 0: first occurrence);
    induction/previous_token: head scores; heads: the found (layer, head) pairs, best first."""

    prompts: list[str]
    kinds: list[str]
    clean: list[Loop]
    ablated: list[Loop]
    reinforcement: torch.Tensor
    induction: HeadScores
    previous_token: HeadScores
    heads: list[tuple[int, int]]
    title: str = "repetition"

    @staticmethod
    def _rate(loops: list[Loop]) -> float:
        return sum(l.looping for l in loops) / len(loops) if loops else float("nan")

    @property
    def loop_rate(self) -> float:
        return self._rate(self.clean)

    @property
    def ablated_loop_rate(self) -> float:
        return self._rate(self.ablated)

    @property
    def loops_broken(self) -> float | None:
        """Share of the clean run's loops that do not loop with the heads ablated (None: no loops)."""
        looped = [a for c, a in zip(self.clean, self.ablated) if c.looping]
        return None if not looped else sum(not a.looping for a in looped) / len(looped)

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt: kind, and onset/period/repeated-n-gram rate, clean and ablated."""
        rows = []
        for i, (text, kind, c, a) in enumerate(zip(self.prompts, self.kinds, self.clean, self.ablated)):
            rows.append(dict(prompt=i, kind=kind, looping=c.looping, onset=c.onset, period=c.period,
                             repeated_ngram_rate=c.repeated_ngram_rate, ablated_looping=a.looping,
                             ablated_onset=a.onset, ablated_period=a.period,
                             ablated_repeated_ngram_rate=a.repeated_ngram_rate, text=text))
        return pd.DataFrame(rows)

    def figures(self) -> list[go.Figure]:
        curve = line_plot({"p(token of copy k)": self.reinforcement}, x=list(range(len(self.reinforcement))),
                          title="self-reinforcement: probability of repeating a span after k copies",
                          x_title="copies already seen (k)", y_title="mean token probability")
        frame = self.to_frame()
        rates = go.Figure([go.Bar(name=name, x=frame["kind"].unique().tolist(),
                                  y=[frame[frame["kind"] == k][col].mean() for k in frame["kind"].unique()])
                           for name, col in (("clean", "looping"), ("heads ablated", "ablated_looping"))])
        rates.update_layout(title="greedy loop rate by prompt kind", yaxis_title="share looping", barmode="group")
        return [curve, *self.induction.figures(), *self.previous_token.figures(), rates]

    def summary(self) -> dict:
        return {
            "loop_rate": round(self.loop_rate, 4),
            "ablated_loop_rate": round(self.ablated_loop_rate, 4),
            "loops_broken": None if self.loops_broken is None else round(self.loops_broken, 4),
            "repeated_ngram_rate": round(sum(l.repeated_ngram_rate for l in self.clean) / len(self.clean), 4),
            "ablated_repeated_ngram_rate": round(sum(l.repeated_ngram_rate for l in self.ablated) / len(self.ablated), 4),
            "induction_heads": [head_label(l, h) for l, h in self.heads],
            "top_induction_score": round(float(self.induction.scores.max()), 4),
            "induction_chance": round(self.induction.chance, 4),
            "top_previous_token_score": round(float(self.previous_token.scores.max()), 4),
            "reinforcement": [round(float(p), 4) for p in self.reinforcement],
            "prompts": len(self.prompts),
        }


def repeated_spans(scope, texts: Sequence[str], *, n_prompts: int = 16, span: int = 16, copies: int = 2,
                   seed: int = 0) -> torch.Tensor:
    """LongTensor [n_prompts, 1 + span * copies]: bos, then a span of ``span`` distinct tokens drawn
    at random from the tokens of ``texts`` (the study's own prompts, so the spans look like the text
    the model loops on), said ``copies`` times."""
    ids, mask = token_batch(scope, list(texts))
    special = set(scope.tokenizer.all_special_ids) | {scope.model.config.pad_token_id,
                                                       scope.model.config.bos_token_id}
    pool = torch.tensor(sorted(set(ids[mask.bool()].tolist()) - special))
    if len(pool) < span:
        raise AnalysisInputError(f"the prompts hold only {len(pool)} distinct ordinary tokens; "
                                 f"a span of {span} needs more (give more prompts or a shorter span)")
    g = torch.Generator().manual_seed(seed)
    spans = torch.stack([pool[torch.randperm(len(pool), generator=g)[:span]] for _ in range(n_prompts)])
    bos = torch.full((n_prompts, 1), scope.model.config.bos_token_id)
    return torch.cat([bos, spans.repeat(1, copies)], 1)


@torch.no_grad()
def self_reinforcement(scope, spans: torch.Tensor, copies: int) -> torch.Tensor:
    """[copies] mean probability of the tokens of copy k (k = 0: the first occurrence) of the
    repeated spans ``spans`` [batch, 1 + span * copies] from `repeated_spans`, one forward pass."""
    span = (spans.shape[1] - 1) // copies
    probs = scope.run(spans, attention_mask=torch.ones_like(spans)).float().softmax(-1).cpu()
    p_next = probs[:, :-1].gather(-1, spans[:, 1:, None]).squeeze(-1)  # p(token t+1 | prefix)
    return p_next.reshape(len(spans), copies, span).mean((0, 2))


@torch.no_grad()
def run_repetition(scope, prompts: Sequence[Prompt] | str = "repetition", *, max_new_tokens: int = 64,
                   min_induction_score: float = 0.4, heads: Sequence[tuple[int, int]] | None = None,
                   max_period: int = 16, n_prompts: int | None = None, reinforcement_copies: int = 7,
                   seed: int = 0) -> RepetitionResult:
    """The repetition study (see module docstring).

    prompts: a set name or `Prompt`s (metadata ``kind`` optional); heads: ablate these
    (layer, head) pairs instead of the found ones; n_prompts: use only the first n prompts."""
    rows = load_prompts(prompts) if isinstance(prompts, str) else list(prompts)
    rows = rows[:n_prompts] if n_prompts is not None else rows
    if not rows:
        raise AnalysisInputError("no prompts to continue")
    texts = [p.text for p in rows]
    scores = pattern_head_scores(scope, repeated_spans(scope, texts, seed=seed),
                                 kinds=("previous_token", "induction"))
    induction = scores["induction"]
    if heads is None:
        order = induction.scores.flatten().argsort(descending=True)
        n_heads = induction.scores.shape[1]
        heads = [(int(i) // n_heads, int(i) % n_heads) for i in order
                 if induction.scores.flatten()[i] >= min_induction_score]
    heads = [tuple(h) for h in heads]

    def loops(hooks: dict | None) -> list[Loop]:
        new = greedy_new_tokens(scope, texts, max_new_tokens, hooks=hooks)
        return [detect_loop(row.tolist(), max_period=max_period) for row in new]

    clean = loops(None)
    ablated = loops(ablate_heads(heads)) if heads else clean
    return RepetitionResult(prompts=texts, kinds=[str(p.metadata.get("kind", "")) for p in rows], clean=clean,
                            ablated=ablated,
                            reinforcement=self_reinforcement(scope, repeated_spans(
                                scope, texts, span=8, copies=reinforcement_copies, seed=seed), reinforcement_copies),
                            induction=induction, previous_token=scores["previous_token"], heads=heads)
