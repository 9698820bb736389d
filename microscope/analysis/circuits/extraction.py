"""Circuit extraction: keep the top edges by score, ablate every other edge, measure faithfulness.

    faithfulness(k) = (metric(top k edges kept) - metric(corrupt)) / (metric(clean) - metric(corrupt))

the share of the clean-vs-corrupt metric the circuit recovers (1: all of it; 0: none). Edges are
ranked by |score| (``"absolute"``) or by signed score (``"signed"``: most negative first, the
edges whose ablation lowers the metric most; scores are metric changes, `edge_patching`). The
minimal circuit is the smallest k on the curve reaching a target.

    curve = faithfulness_curve(scope, graph, task, scores, ks=[1, 2, 5, 10, 20])
    k = minimal_circuit(curve, target=0.8)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from microscope.analysis.circuits.edge_patching import ablated_metrics, ablation_values, run_with_ablated_edges
from microscope.analysis.circuits.graph import CircuitGraph
from microscope.analysis.circuits.tasks import CircuitTask
from microscope.errors import AnalysisInputError

EdgeOrder = Literal["absolute", "signed"]
EDGE_ORDERS: tuple[str, ...] = get_args(EdgeOrder)


@dataclass(frozen=True)
class FaithfulnessCurve:
    """ks: edges kept; faithfulness: one value per k; clean / corrupt: the metric's two ends;
    order: edge indices, strongest first by the curve's `edge_order` (the circuit of k edges is
    ``order[:k]``)."""

    ks: list[int]
    faithfulness: list[float]
    clean: float
    corrupt: float
    order: list[int]

    def at(self, k: int) -> float:
        """Faithfulness at the largest k on the curve not above `k`."""
        i = max(j for j, kk in enumerate(self.ks) if kk <= k) if k >= self.ks[0] else None
        return float("nan") if i is None else self.faithfulness[i]


def edge_grid(n_edges: int, points: int = 40) -> list[int]:
    """Edge counts for a curve: every k up to 20, then `points` geometric steps to n_edges."""
    geometric = np.geomspace(1, n_edges, points).round().astype(int).tolist()
    return sorted({k for k in [*range(1, min(20, n_edges) + 1), *geometric] if 1 <= k <= n_edges})


def edge_order(scores: torch.Tensor, order: EdgeOrder = "absolute") -> torch.Tensor:
    """LongTensor [n_edges]: edge indices, strongest first, of `scores` [n_edges] (metric change when
    the edge is ablated): by |score| (``"absolute"``), or ``"signed"``, most negative first (the
    edges that carry the metric; MIB's signed ranking, whose scores are the metric lost)."""
    if order not in EDGE_ORDERS:
        raise AnalysisInputError(f"order must be one of {EDGE_ORDERS}, got {order!r}")
    return scores.abs().argsort(descending=True) if order == "absolute" else scores.argsort()


@torch.no_grad()
def faithfulness_curve(scope, graph: CircuitGraph, task: CircuitTask, scores: torch.Tensor,
                       ks: list[int] | None = None, ablation: str = "corrupt",
                       order: EdgeOrder = "absolute") -> FaithfulnessCurve:
    """Faithfulness of the top-k edges of `scores` ([n_edges]) by `order` (`edge_order`) for each k
    in `ks` (`edge_grid`; k = 0 is the empty circuit)."""
    values = ablation_values(scope, graph, task, ablation)
    clean = float(task.metric(scope.run(task.clean, attention_mask=task.mask, logits_to_keep=task.positions_read)))
    corrupt = float(task.metric(run_with_ablated_edges(scope, graph, task, graph.upstream, values,
                                                       logits_to_keep=task.positions_read)))
    ranked = edge_order(scores, order)
    ks = ks or edge_grid(graph.n_edges)
    rank = torch.empty(graph.n_edges, dtype=torch.long)
    rank[ranked] = torch.arange(graph.n_edges)
    masks = torch.stack([graph.mask(rank >= k) for k in ks])                  # [len(ks), S, R]
    metrics = ablated_metrics(scope, graph, task, masks, values)
    return FaithfulnessCurve(list(ks), ((metrics - corrupt) / (clean - corrupt)).tolist(), clean, corrupt,
                             ranked.tolist())


def minimal_circuit(curve: FaithfulnessCurve, target: float = 0.8) -> int | None:
    """The smallest k on the curve whose faithfulness reaches `target` (None: none does)."""
    return next((k for k, f in zip(curve.ks, curve.faithfulness) if f >= target), None)
