"""Exact edge patching: run the model with chosen edges ablated (path patching of edges).

An ablated edge (s, r) feeds receiver r the ablation value of sender s instead of the value s
has in this run; every other receiver still reads s as it is. Ablation values (`ABLATIONS`):

- ``"corrupt"``: s's output on the task's corrupted prompts (resample ablation: the corruption
  is the resample);
- ``"mean"``: s's output averaged over the corrupted prompts, per position.

    logits = run_with_ablated_edges(scope, graph, task, ablated)      # ablated: bool [S, R]
    effects = exact_edge_effects(scope, graph, task)                   # [n_edges] metric change
"""

from __future__ import annotations

import torch

from microscope.analysis.circuits.graph import CircuitGraph
from microscope.analysis.circuits.routing import EdgeRouter
from microscope.analysis.circuits.tasks import CircuitTask
from microscope.errors import AnalysisInputError

ABLATIONS = ("corrupt", "mean")


@torch.no_grad()
def sender_outputs(scope, graph: CircuitGraph, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [batch, pos, vocab], sender outputs [batch, pos, S, d_model]) of one plain run."""
    router = EdgeRouter(scope.model, graph, lambda kind, layer, senders: None)
    with scope.hooks(router.hooks()):
        logits = scope.run(ids, attention_mask=mask)
    return logits, router.senders()


def ablation_values(scope, graph: CircuitGraph, task: CircuitTask, ablation: str = "corrupt") -> torch.Tensor:
    """[batch, pos, S, d_model]: what an ablated edge carries from each sender."""
    if ablation not in ABLATIONS:
        raise AnalysisInputError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    values = sender_outputs(scope, graph, task.corrupt, task.mask)[1]
    return values.mean(0, keepdim=True).expand_as(values) if ablation == "mean" else values


def patch_deltas(graph: CircuitGraph, ablated: torch.Tensor, values: torch.Tensor):
    """A `DeltaFn` feeding (value - current) of each ablated edge's sender to its receiver only."""
    def delta(kind: str, layer: int, senders) -> torch.Tensor | None:
        cols = graph.group(kind, layer)
        upstream = graph.upstream_senders(kind, layer)
        chosen = ablated[:upstream, cols]                                  # [S', R]
        active = chosen.any(1).nonzero()[:, 0]
        if len(active) == 0:
            return None
        current = senders()[:, :, active]
        diff = values[:, :, active].to(current) - current                 # [b, p, n, d]
        n_entries = graph.n_entries((kind, layer))
        entry = torch.nn.functional.one_hot(graph.entry[active], n_entries).to(diff)    # [n, E]
        weights = chosen[active].to(diff)[:, :, None] * entry[:, None, :]            # [n, R, E]
        return torch.einsum("bpnd,nre->bpred", diff, weights.to(diff.device))
    return delta


@torch.no_grad()
def run_with_ablated_edges(scope, graph: CircuitGraph, task: CircuitTask, ablated: torch.Tensor,
                           values: torch.Tensor | None = None, ablation: str = "corrupt") -> torch.Tensor:
    """Logits [batch, pos, vocab] of the clean prompts with the edges marked in `ablated` (bool
    [S, R]) fed their ablation `values` (default: `ablation_values(..., ablation)`)."""
    if values is None:
        values = ablation_values(scope, graph, task, ablation)
    router = EdgeRouter(scope.model, graph, patch_deltas(graph, ablated.bool() & graph.upstream, values))
    with scope.hooks(router.hooks()):
        return scope.run(task.clean, attention_mask=task.mask)


@torch.no_grad()
def exact_edge_effects(scope, graph: CircuitGraph, task: CircuitTask, ablation: str = "corrupt") -> torch.Tensor:
    """[n_edges]: metric(one edge ablated) - metric(clean), every edge of `graph` in turn."""
    values = ablation_values(scope, graph, task, ablation)
    clean = task.metric(scope.run(task.clean, attention_mask=task.mask))
    effects = torch.empty(graph.n_edges)
    for i, (s, r) in enumerate(graph.edges.tolist()):
        ablated = torch.zeros_like(graph.upstream)
        ablated[s, r] = True
        effects[i] = task.metric(run_with_ablated_edges(scope, graph, task, ablated, values)) - clean
    return effects
