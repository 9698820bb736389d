"""Steering vectors, added to the residual stream while the model generates.

- Mean difference: ``v = mean act(positive prompts) - mean act(negative prompts)`` at one hook
  (each prompt's last token, or the mean over its tokens); added at *every* position, prompt and
  generated tokens alike, times a coefficient.
- ActAdd (Turner et al. 2023): ``v = act(prompt_plus) - act(prompt_minus)`` token by token at one
  hook, both prompts padded to the same length; added to the *first* k positions of each prompt
  during the prompt's forward pass only (generated tokens are not touched directly).

Both are applied through the scope's hooks (``scope.generate(prompts, hooks=...)``):

    v = mean_difference_vector(scope, hostile, friendly, layer=1)
    texts = steer_generate(scope, prompts, v, coefficient=-4.0, max_new_tokens=20)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch

from microscope.analysis.inputs import TextsOrIds, last_positions, token_batch
from microscope.analysis.lens import vocab_projection
from microscope.analysis.results import Result
from microscope.errors import AnalysisInputError
from microscope.hooks.interventions import add_vector
from microscope.names import act_name
from microscope.viz.figures import line_plot

DEFAULT_SITE = "hook_resid_pre"   # the hook of layer= (a site in every block)


@dataclass(repr=False)
class SteeringVector(Result):
    """A steering vector at one hook. kind: "mean_difference" ([d_model], every position) or
    "actadd" ([k, d_model], the first k prompt positions)."""

    hook: str
    vector: torch.Tensor
    kind: str
    title: str = "steering vector"

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    def hooks(self, coefficient: float = 1.0, prompt_starts: torch.Tensor | None = None) -> dict:
        """``{hook: fn}`` for ``scope.hooks(...)`` or ``scope.generate(..., hooks=...)``.

        Mean difference: `hooks.interventions.add_vector` at every position. ActAdd: added to the
        k positions from each row's ``prompt_starts`` (default 0; left-padded generation batches
        start later) on the first forward pass at least that long (the prompt pass) only, so make
        a fresh dict per generate call (as `steer_generate` does)."""
        if self.kind == "mean_difference":
            return add_vector(self.hook, self.vector, scale=coefficient)
        k = self.vector.shape[0]
        state = {"done": False}

        def add_front(act, hook):
            starts = torch.zeros(act.shape[0], dtype=torch.long) if prompt_starts is None else prompt_starts
            if state["done"] or act.shape[1] < int(starts.max()) + k:
                return None
            state["done"] = True
            out = act.clone()
            for row, start in enumerate(starts.tolist()):
                out[row, start:start + k] += coefficient * self.vector.to(act.device, act.dtype)
            return out
        return {self.hook: add_front}

    def to_frame(self) -> pd.DataFrame:
        v = self.vector.reshape(-1, self.vector.shape[-1])
        return pd.DataFrame(dict(hook=self.hook, kind=self.kind, row=range(len(v)),
                                 norm=v.norm(dim=-1).tolist()))

    def figures(self) -> list[go.Figure]:
        v = self.vector.reshape(-1, self.vector.shape[-1])
        return [line_plot({f"row {i}": row for i, row in enumerate(v)}, title=f"{self.kind} vector at {self.hook}",
                          x_title="residual dimension", y_title="value")]

    def summary(self) -> dict:
        return {"kind": self.kind, "hook": self.hook, "norm": round(float(self.norm), 4)}

    def vocab_projection(self, scope, k: int = 10) -> pd.DataFrame:
        """Tokens the vector promotes / suppresses through the final path (`lens.vocab_projection`)."""
        return vocab_projection(scope, self.vector.reshape(-1, self.vector.shape[-1]).sum(0), k)


def _hook_name(scope, layer: int | None, hook: str | None) -> str:
    if (layer is None) == (hook is None):
        raise AnalysisInputError("give exactly one of layer= (uses blocks.{layer}.hook_resid_pre) or hook=")
    name = hook if hook is not None else act_name(DEFAULT_SITE, layer)
    return scope.resolve_names([name])[0]


@torch.no_grad()
def mean_difference_vector(scope, positive: TextsOrIds, negative: TextsOrIds, *, layer: int | None = None,
                           hook: str | None = None, position: str = "last") -> SteeringVector:
    """mean act(positive) - mean act(negative) [d_model] at one hook; position "last" or "mean"."""
    name = _hook_name(scope, layer, hook)

    def mean_act(prompts):
        ids, mask = token_batch(scope, prompts)
        _, cache = scope.run_with_cache(ids, names=[name], attention_mask=mask)
        act = cache[name].float().cpu()
        if position == "last":
            return act[torch.arange(len(ids)), last_positions(mask)].mean(0)
        if position == "mean":
            return ((act * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).mean(0)
        raise AnalysisInputError(f"position must be 'last' or 'mean', got {position!r}")
    return SteeringVector(hook=name, vector=mean_act(positive) - mean_act(negative), kind="mean_difference",
                          title=f"mean difference at {name}")


@torch.no_grad()
def actadd_vector(scope, plus: str | torch.Tensor, minus: str | torch.Tensor, *, layer: int | None = None,
                  hook: str | None = None) -> SteeringVector:
    """act(plus) - act(minus) [k, d_model], token by token, at one hook (ActAdd).

    plus/minus: texts (the shorter is right-padded with the pad token, so both have k tokens) or
    1-D id tensors of equal length k."""
    name = _hook_name(scope, layer, hook)
    if isinstance(plus, torch.Tensor):
        ids = torch.stack([plus.reshape(-1), minus.reshape(-1)])
    else:
        ids, _ = token_batch(scope, [plus, minus])
    _, cache = scope.run_with_cache(ids, names=[name], attention_mask=torch.ones_like(ids))
    act = cache[name].float().cpu()
    return SteeringVector(hook=name, vector=act[0] - act[1], kind="actadd", title=f"ActAdd at {name}")


def steer_generate(scope, prompts: TextsOrIds, vector: SteeringVector, coefficient: float = 1.0,
                   **generate_kwargs):
    """``scope.generate`` with the vector added (returns its `GenerationResult`). A fresh hook per
    call; for ActAdd the add lands on each prompt's first k real tokens of the left-padded batch."""
    ids, mask = token_batch(scope, prompts)
    starts = ids.shape[1] - mask.sum(-1)  # generation left-pads: real tokens start here
    if vector.kind == "actadd" and int(mask.sum(-1).min()) < vector.vector.shape[0]:
        raise AnalysisInputError(f"ActAdd adds to the first {vector.vector.shape[0]} tokens; a prompt is shorter")
    return scope.generate(ids, attention_mask=mask, hooks=vector.hooks(coefficient, starts), **generate_kwargs)
