"""Exact edge patching: run the model with chosen edges ablated (path patching of edges).

An ablated edge (s, r) feeds receiver r the ablation value of sender s instead of the value s
has in this run; every other receiver still reads s as it is. Ablation values (`EDGE_ABLATIONS`):

- ``"corrupt"``: s's output on the task's corrupted prompts (resample ablation: the corruption
  is the resample);
- ``"mean"``: s's output averaged over the corrupted prompts, per position.

    logits = run_with_ablated_edges(scope, graph, task, ablated)      # ablated: bool [S, R]
    effects = exact_edge_effects(scope, graph, task)                   # [n_edges] metric change
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from microscope.analysis.circuits.graph import CircuitGraph
from microscope.analysis.circuits.routing import EdgeRouter
from microscope.analysis.circuits.tasks import CircuitTask
from microscope.analysis.inputs import where_present
from microscope.errors import AnalysisInputError

EdgeAblation = Literal["corrupt", "mean"]
EDGE_ABLATIONS: tuple[str, ...] = get_args(EdgeAblation)


@torch.no_grad()
def sender_outputs(scope, graph: CircuitGraph, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[batch, pos, S, d_model]: every sender's output in one plain run of `ids`."""
    router = EdgeRouter(scope.model, graph, lambda kind, layer, senders: None)
    with scope.hooks(router.hooks()):   # one position's logits: the rest would be thrown away
        scope.model(input_ids=ids.to(scope.device), attention_mask=mask.to(scope.device), use_cache=False,
                    logits_to_keep=1)
    return router.senders()


def ablation_values(scope, graph: CircuitGraph, task: CircuitTask, ablation: str = "corrupt") -> torch.Tensor:
    """[batch, pos, S, d_model]: what an ablated edge carries from each sender. Where only the
    clean prompt has a token (a pair of unequal length, aligned at its end) it carries the clean
    value: the corrupted prompt has nothing there to patch in."""
    if ablation not in EDGE_ABLATIONS:
        raise AnalysisInputError(f"ablation must be one of {EDGE_ABLATIONS}, got {ablation!r}")
    values = sender_outputs(scope, graph, task.corrupt, task.corrupt_attention_mask)
    if task.clean_only.any():
        values = where_present(~task.clean_only, values, sender_outputs(scope, graph, task.clean, task.mask))
    return values.mean(0, keepdim=True).expand_as(values) if ablation == "mean" else values


def patch_deltas(graph: CircuitGraph, ablated: torch.Tensor, values: torch.Tensor):
    """A `DeltaFn` feeding (value - current) of each ablated edge's sender to its receiver only.

    ablated: bool [S, R], or [n, S, R] for a batch made of n copies of the prompts (copy i
    ablates ``ablated[i]``); values: [batch, pos, S, d_model] of one copy."""
    ablated = ablated if ablated.dim() == 3 else ablated[None]
    copies = len(ablated)

    def delta(kind: str, layer: int, senders) -> torch.Tensor | None:
        upstream = graph.upstream_senders(kind, layer)
        chosen = ablated[:, :upstream, graph.group(kind, layer)]                 # [n, S', R]
        active = chosen.any(2).any(0).nonzero()[:, 0]
        if len(active) == 0:
            return None
        current = senders()[:, :, active.to(values.device)]
        current = current.view(copies, -1, *current.shape[1:])                  # [n, b, p, s, d]
        diff = values[:, :, active.to(values.device)].to(current) - current
        entry = torch.nn.functional.one_hot(graph.entry[active], graph.n_entries((kind, layer)))
        weights = chosen[:, active, :, None].to(diff) * entry[None, :, None, :].to(diff)   # [n, s, R, E]
        return torch.einsum("nbpsd,nsre->nbpred", diff, weights.to(diff.device)).flatten(0, 1)
    return delta


@torch.no_grad()
def run_with_ablated_edges(scope, graph: CircuitGraph, task: CircuitTask, ablated: torch.Tensor,
                           values: torch.Tensor | None = None, ablation: str = "corrupt", *,
                           logits_to_keep: int = 0) -> torch.Tensor:
    """Logits [batch, pos, vocab] of the clean prompts with the edges marked in `ablated` (bool
    [S, R]) fed their ablation `values` (default: `ablation_values(..., ablation)`); with
    `ablated` [n, S, R], n copies of the batch, one per mask: logits [n * batch, pos, vocab].
    ``logits_to_keep`` k > 0: only the last k positions' (`task.positions_read`: all the metric reads)."""
    if values is None:
        values = ablation_values(scope, graph, task, ablation)
    copies = len(ablated) if ablated.dim() == 3 else 1
    router = EdgeRouter(scope.model, graph, patch_deltas(graph, ablated.bool() & graph.upstream, values))
    with scope.hooks(router.hooks()):
        return scope.run(task.clean.repeat(copies, 1), attention_mask=task.mask.repeat(copies, 1),
                         logits_to_keep=logits_to_keep)


@torch.no_grad()
def ablated_metrics(scope, graph: CircuitGraph, task: CircuitTask, ablated: torch.Tensor, values: torch.Tensor,
                    max_batch: int = 256) -> torch.Tensor:
    """[n] task metric with each mask of `ablated` (bool [n, S, R]), several masks per forward."""
    per_run = max(1, max_batch // len(task))
    out = []
    for chunk in ablated.split(per_run):
        logits = run_with_ablated_edges(scope, graph, task, chunk, values, logits_to_keep=task.positions_read)
        out += [task.metric(part) for part in logits.split(len(task))]
    return torch.stack(out).cpu()


@torch.no_grad()
def exact_edge_effects(scope, graph: CircuitGraph, task: CircuitTask, ablation: str = "corrupt") -> torch.Tensor:
    """[n_edges]: metric(one edge ablated) - metric(clean), every edge of `graph` in turn."""
    values = ablation_values(scope, graph, task, ablation)
    clean = task.metric(scope.run(task.clean, attention_mask=task.mask, logits_to_keep=task.positions_read)).cpu()
    masks = torch.zeros(graph.n_edges, graph.n_senders, graph.n_receivers, dtype=torch.bool)
    masks[torch.arange(graph.n_edges), graph.edges[:, 0], graph.edges[:, 1]] = True
    return ablated_metrics(scope, graph, task, masks, values) - clean
