"""The main job (`microscope demo`, the README's `make demo`): run the shipped demo experiment.

It dumps the organism's activations for the built-in demo prompt set into `activations/`, runs the
four failure-mode studies, and writes one self-contained HTML report plus a JSON of the headline
numbers. Its report also shows the attention patterns of the induction heads read back from the
store it dumped (`induction_patterns`). Everything it does is declared in ``experiments/demo.toml``, so `microscope run
experiments/demo.toml` is the same job and the demo is one entry of the experiment library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from microscope.analysis.studies.base import StudyResult
from microscope.experiments import ExperimentRun, run_experiment, spec_dir
from microscope.viz.figures import attention_pattern

DEMO_SPEC = "demo.toml"


def demo_spec_path() -> Path:
    """experiments/demo.toml of the working directory, else the one beside the package."""
    return spec_dir() / DEMO_SPEC


def run_demo(out_dir: str | Path | None = None, command: str | None = None,
             progress: bool = True) -> ExperimentRun:
    """Run the demo experiment; the run's `files` hold "report" and "results" (the JSON)."""
    return run_experiment(demo_spec_path(), out_dir=out_dir, command=command, progress=progress)


@dataclass(repr=False)
class InductionPatterns(StudyResult):
    """The attention patterns of the top induction heads on one prompt, read back from a store.

    heads: the (layer, head) pairs, best induction score first; scores: their scores;
    patterns: [len(heads), query, key] attention probabilities; tokens: the prompt's tokens."""

    heads: list[tuple[int, int]]
    scores: list[float]
    chance: float
    prompt: int
    tokens: list[str]
    patterns: np.ndarray
    store: str
    title: str = "attention patterns of the induction heads"

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([dict(layer=l, head=h, induction_score=s, prompt=self.prompt, store=self.store)
                             for (l, h), s in zip(self.heads, self.scores)])

    def figures(self) -> list[go.Figure]:
        return [attention_pattern(p, tokens=self.tokens,
                                  title=f"L{l}H{h} (induction score {s:.2f}) on stored prompt {self.prompt}")
                for (l, h), s, p in zip(self.heads, self.scores, self.patterns)]

    def summary(self) -> dict:
        return {"heads": [f"L{l}H{h}" for l, h in self.heads], "scores": [round(s, 4) for s in self.scores],
                "chance": round(self.chance, 4), "prompt": self.prompt}


def induction_patterns(scope, store, *, n_heads: int = 2, where: dict | None = None) -> InductionPatterns:
    """Rank heads by `head_scores.induction_scores`, then read the `n_heads` best heads' patterns
    for the first stored prompt whose metadata match `where` (default: a repetition prompt) from
    `store` (it must hold those layers' ``attn.hook_pattern``)."""
    from microscope.analysis.head_scores import induction_scores
    from microscope.errors import AnalysisInputError

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
        name = f"blocks.{layer}.attn.hook_pattern"
        if name not in store or head not in store[name].heads:
            raise AnalysisInputError(f"the store holds no pattern of L{layer}H{head}; dump {name}")
        heads.append((layer, head))
        values.append(float(row.score))
        patterns.append(store[name].prompt(prompt)[store[name].heads.index(head)].astype(np.float32))
    return InductionPatterns(heads, values, scores.chance, prompt, store.tokens(prompt), np.stack(patterns),
                             str(getattr(store, "path", "")))
