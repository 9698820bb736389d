"""The attention patterns of the top induction heads, read back from an activation store.

    result = induction_patterns(scope, store, n_heads=2)   # store: holds those layers' patterns
    result.figures()                                       # one heatmap per head
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from microscope.analysis.head_scores import induction_scores
from microscope.analysis.results import Result
from microscope.errors import AnalysisInputError
from microscope.names import act_name, head_label
from microscope.viz.figures import attention_pattern


@dataclass(repr=False)
class InductionPatterns(Result):
    """The attention patterns of the top induction heads on one prompt, read back from a store.

    heads: the (layer, head) pairs, best induction score first; scores: their scores;
    patterns: [len(heads), query, key] attention probabilities; tokens: the prompt's tokens;
    named: the labels of every head `head_scores` names an induction head (`HeadScores.named_heads`)."""

    heads: list[tuple[int, int]]
    scores: list[float]
    chance: float
    prompt: int
    tokens: list[str]
    patterns: np.ndarray
    store: str
    named: list[str]
    title: str = "attention patterns of the induction heads"

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([dict(layer=l, head=h, induction_score=s, prompt=self.prompt, store=self.store)
                             for (l, h), s in zip(self.heads, self.scores)])

    def figures(self) -> list[go.Figure]:
        return [attention_pattern(p, tokens=self.tokens,
                                  title=f"{head_label(l, h)} (induction score {s:.2f}) on stored prompt {self.prompt}")
                for (l, h), s, p in zip(self.heads, self.scores, self.patterns)]

    def summary(self) -> dict:
        """The heads whose patterns are shown (the best induction scores, whatever they are) and, of
        those, the ones `head_scores` names induction heads (`HeadScores.named_heads`)."""
        return {"patterns_shown": [head_label(l, h) for l, h in self.heads], "scores": [round(s, 4) for s in self.scores],
                "chance": round(self.chance, 4), "prompt": self.prompt,
                "induction_heads": [head_label(l, h) for l, h in self.heads if head_label(l, h) in self.named]}


def induction_patterns(scope, store, *, n_heads: int = 2, where: dict | None = None) -> InductionPatterns:
    """Rank heads by `head_scores.induction_scores`, then read the `n_heads` best heads' patterns
    for the first stored prompt whose metadata match `where` (default: a repetition prompt) from
    `store` (it must hold those layers' ``attn.hook_pattern``)."""
    where = {"set": "repetition"} if where is None else where
    matches = [p for p in range(store.n_prompts)
               if all(store.prompt_metadata(p).get(k) == v for k, v in where.items())]
    if not matches:
        raise AnalysisInputError(f"no stored prompt has metadata {where}")
    prompt = matches[0]
    scores = induction_scores(scope)
    top = scores.top(n_heads)
    heads, values, patterns = [], [], []
    for row in top.itertuples():
        layer, head = int(row.layer), int(row.head)
        name = act_name("pattern", layer)
        if name not in store or head not in store[name].heads:
            raise AnalysisInputError(f"the store holds no pattern of {head_label(layer, head)}; dump {name}")
        heads.append((layer, head))
        values.append(float(row.score))
        patterns.append(store[name].prompt(prompt)[store[name].heads.index(head)].astype(np.float32))
    return InductionPatterns(heads, values, scores.chance, prompt, store.tokens(prompt), np.stack(patterns),
                             str(getattr(store, "path", "")), scores.named_heads())
