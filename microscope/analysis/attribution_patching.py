"""Attribution patching: the first-order (gradient x difference) estimate of activation patching,
for every site at once from one forward and one backward pass (Nanda 2023; Syed et al. 2023).

For a site with activation ``a``: ``effect ~ (a_source - a_base) . d metric / d a |_base``, where the
base run is the corrupted prompt when denoising and the clean prompt when noising (same
conventions, metric and corruption as `microscope.analysis.patching`). Per-position sites sum the
product over the feature axis; ``site="heads"`` sums over positions and d_head.

The estimate is linear: it is good where the metric is smooth along the patch, and poor across
saturated softmaxes (attention, the final softmax). `patching_agreement` says how far to trust it on
a given model by comparing against real activation patching.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from microscope.analysis.inputs import TextsOrIds, Tokens, decode_token
from microscope.analysis.patching import PatchingResult, logit_diff, patching_inputs
from microscope.analysis.results import Result
from microscope.errors import AnalysisInputError


def attribution_patching(scope, clean: TextsOrIds, corrupted: TextsOrIds | None = None, *, answer: Tokens,
                         wrong: Tokens, site: str = "resid_pre", mode: str = "denoising",
                         attention_mask: torch.Tensor | None = None) -> PatchingResult:
    """Gradient x difference estimate of `activation_patching` with the same arguments; returns a
    `PatchingResult` with ``method="attribution"`` (same shapes, comparable cell by cell)."""
    clean_ids, corrupt_ids, base, source, mask, ans, wr, names, last = patching_inputs(
        scope, clean, corrupted, answer, wrong, attention_mask, mode=mode, site=site)
    with torch.no_grad():
        source_logits, source_cache = scope.run_with_cache(source, names=names, attention_mask=mask)
    source_metric = logit_diff(source_logits, last, ans, wr).detach().cpu()

    metrics = []

    def metric(logits: torch.Tensor) -> torch.Tensor:
        metrics.append(logit_diff(logits, last, ans, wr))
        return metrics[-1].sum()

    acts, grads = site_gradients(scope, base, mask, names, metric)
    base_metric = metrics[0]
    effects = []
    for name, grad in grads.items():
        diff = source_cache[name].to(grad.device, grad.dtype) - acts[name]
        product = (diff * grad).float()
        if site == "heads":  # [batch, pos, head, d_head] -> [batch, head]
            effects.append(product.sum((1, 3)).cpu())
        else:  # [batch, pos, d] -> [batch, pos]
            effects.append(product.sum(-1).cpu())
    tokens = [decode_token(scope.tokenizer, t) for t in clean_ids[0]]
    return PatchingResult(site=site, mode=mode, method="attribution", effects=torch.stack(effects, 1),
                          base_metric=base_metric.detach().cpu(), source_metric=source_metric,
                          clean_ids=clean_ids, corrupted_ids=corrupt_ids, tokens=tokens,
                          title=f"attribution patching ({mode}, {site})")


def site_gradients(scope, ids: torch.Tensor, mask: torch.Tensor, names: list[str],
                   metric: Callable[[torch.Tensor], torch.Tensor], hooks: dict | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({name: activation}, {name: d metric / d activation}) at the hook sites `names`, from one
    forward and one backward pass of ``ids`` [batch, pos] (``hooks`` in force, applied before the
    taps). ``metric`` maps the logits [batch, pos, vocab] to a scalar. The model's weights get no
    gradient."""
    acts: dict[str, torch.Tensor] = {}
    probes: dict[str, torch.Tensor] = {}

    def tap(act, hook):  # add a zero leaf so d metric / d act is its gradient, graph intact
        acts[hook.name] = act.detach()
        probes[hook.name] = torch.zeros_like(act, requires_grad=True)
        return act + probes[hook.name]

    params = list(scope.model.parameters())
    was_trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), scope.hooks(hooks), scope.hooks({name: tap for name in names}):
            value = metric(scope.run(ids, attention_mask=mask))
            grads = torch.autograd.grad(value, [probes[n] for n in names])
    finally:
        for p, flag in zip(params, was_trainable):
            p.requires_grad_(flag)
    return acts, dict(zip(names, grads))


def screened(estimates: torch.Tensor, exact: Callable[[tuple[int, ...]], float], keep: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact values where they matter: ``exact(index)`` for the ``keep`` entries of ``estimates``
    (any shape) of largest |estimate|, the estimate elsewhere. Returns (values, is_exact), both
    of ``estimates``' shape. With ``keep`` >= its size every value is exact (a small model)."""
    values = estimates.clone().float()
    is_exact = torch.zeros_like(values, dtype=torch.bool)
    for flat in estimates.abs().flatten().argsort(descending=True)[:keep].tolist():
        index = tuple(int(i) for i in np.unravel_index(flat, tuple(estimates.shape)))
        values[index] = exact(index)
        is_exact[index] = True
    return values, is_exact


@dataclass(repr=False)
class PatchingAgreement(Result):
    """How well attribution patching matches activation patching cell by cell.

    pearson: correlation of the mean effects over all cells; top_k: the strongest cells by
    |activation effect|; sign_agreement: fraction of those where both have the same sign;
    labels / activation / attribution: every cell's label and mean effects."""

    pearson: float
    top_k: int
    sign_agreement: float
    labels: list[str]
    activation: torch.Tensor
    attribution: torch.Tensor
    title: str = "attribution vs activation patching"

    def to_frame(self) -> pd.DataFrame:
        strongest = set(self.activation.abs().argsort(descending=True)[: self.top_k].tolist())
        return pd.DataFrame(dict(cell=self.labels, activation=self.activation.tolist(),
                                 attribution=self.attribution.tolist(),
                                 top_k=[i in strongest for i in range(len(self.labels))]))

    def figures(self) -> list[go.Figure]:
        frame = self.to_frame()
        fig = go.Figure(go.Scatter(x=frame.activation, y=frame.attribution, mode="markers", text=frame.cell,
                                   marker=dict(color=np.where(frame.top_k, "crimson", "steelblue"))))
        lo = float(min(frame.activation.min(), frame.attribution.min()))
        hi = float(max(frame.activation.max(), frame.attribution.max()))
        fig.add_shape(type="line", x0=lo, y0=lo, x1=hi, y1=hi, line=dict(dash="dot", color="grey"))
        fig.update_layout(title=f"{self.title}: r = {self.pearson:.3f}",
                          xaxis_title="activation patching effect", yaxis_title="attribution patching estimate")
        return [fig]

    def summary(self) -> dict:
        return {"pearson": round(float(self.pearson), 4), "top_k": self.top_k,
                "sign_agreement": round(float(self.sign_agreement), 4)}


def patching_agreement(activation: PatchingResult, attribution: PatchingResult, top_k: int = 5
                       ) -> PatchingAgreement:
    """Compare an activation-patching result with its attribution-patching estimate (same site,
    mode and prompts): correlation over all cells and sign agreement on the top_k strongest."""
    if (activation.site, activation.mode) != (attribution.site, attribution.mode) or \
            activation.effect.shape != attribution.effect.shape:
        raise AnalysisInputError("compare results of the same site, mode and prompts: got "
                                 f"{activation.site}/{activation.mode} {tuple(activation.effect.shape)} and "
                                 f"{attribution.site}/{attribution.mode} {tuple(attribution.effect.shape)}")
    act, att = activation.effect.flatten(), attribution.effect.flatten()
    top_k = min(top_k, act.numel())
    strongest = act.abs().argsort(descending=True)[:top_k]
    agree = (torch.sign(act[strongest]) == torch.sign(att[strongest])).float().mean().item()
    pearson = float(torch.corrcoef(torch.stack([act, att]))[0, 1]) if act.std() > 0 and att.std() > 0 \
        else float("nan")
    n_cols = activation.effect.shape[1]
    labels = [f"L{i // n_cols} {activation.columns} {i % n_cols}" for i in range(act.numel())]
    return PatchingAgreement(pearson=pearson, top_k=top_k, sign_agreement=agree, labels=labels,
                             activation=act, attribution=att)
