"""MIB's circuit-track metrics (Mueller et al. 2025; hannamw/MIB-circuit-track,
`evaluate_area_under_curve`): the faithfulness curve at ten circuit sizes, integrated.

    f(C) = (m(C) - m(empty)) / (m(full) - m(empty))             (`extraction.faithfulness_curve`)
    CPR  = area under f,        edges ranked by signed score     (higher is better)
    CMD  = area under |1 - f|,  edges ranked by |score|          (0 is best)

Sizes are the fractions 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1 of all edges. As in
MIB, the x-axis is the fraction itself (linear), integrated by the trapezoid rule over [0.001, 1]
with no rescaling (f = 1 everywhere gives CPR 0.999), and a fraction keeps ``int(fraction *
n_edges)`` edges, floored: a graph of fewer than 1000 edges keeps none at 0.1% (the empty circuit,
f = 0), one of fewer than 500 none at 0.2% either (the organism's 479 edges: 0, 0, 2, 4, 9, 23, 47,
95, 239, 479). Eight tenths of the area lie between 20% and 100% of the edges, so both numbers read
mostly how circuits of a fifth to all of the model do. "Signed" ranks the edges whose ablation
lowers the metric most first (`extraction.edge_order`): MIB's scores are the metric lost, ours the
metric change.

    curves = mib_curves(scope, graph, task, scores)       # scores: [n_edges] metric changes
    curves.cpr, curves.cmd
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from microscope.analysis.circuits.extraction import FaithfulnessCurve, faithfulness_curve
from microscope.analysis.circuits.graph import CircuitGraph
from microscope.analysis.circuits.tasks import CircuitTask
from microscope.errors import AnalysisInputError

MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def mib_edge_counts(n_edges: int, fractions: Sequence[float] = MIB_FRACTIONS) -> list[int]:
    """Edges kept at each fraction of `n_edges`: ``int(fraction * n_edges)`` (MIB's floor; 0 where
    a fraction of the graph is less than one edge)."""
    return [int(fraction * n_edges) for fraction in fractions]


def area_under(values: Sequence[float], fractions: Sequence[float] = MIB_FRACTIONS) -> float:
    """Trapezoid area of `values` (one per fraction) over the fractions of edges kept."""
    if len(values) != len(fractions):
        raise AnalysisInputError(f"{len(values)} values for {len(fractions)} circuit sizes")
    return float(sum((x2 - x1) * (y1 + y2) / 2
                     for x1, x2, y1, y2 in zip(fractions, fractions[1:], values, values[1:])))


def circuit_performance_ratio(faithfulness: Sequence[float], fractions: Sequence[float] = MIB_FRACTIONS) -> float:
    """CPR: the area under the faithfulness curve (one value per fraction; higher is better)."""
    return area_under(faithfulness, fractions)


def circuit_model_difference(faithfulness: Sequence[float], fractions: Sequence[float] = MIB_FRACTIONS) -> float:
    """CMD: the area under |1 - faithfulness| (one value per fraction; 0 is best)."""
    return area_under([abs(1.0 - f) for f in faithfulness], fractions)


@dataclass(frozen=True)
class MibCurves:
    """Faithfulness at MIB's sizes (`mib_edge_counts`) of one set of edge scores, with the edges
    ranked by signed score (`signed`, for CPR) and by |score| (`absolute`, for CMD)."""

    signed: FaithfulnessCurve
    absolute: FaithfulnessCurve

    @property
    def cpr(self) -> float:
        return circuit_performance_ratio(self.signed.faithfulness)

    @property
    def cmd(self) -> float:
        return circuit_model_difference(self.absolute.faithfulness)


@torch.no_grad()
def mib_curves(scope, graph: CircuitGraph, task: CircuitTask, scores: torch.Tensor,
               ablation: str = "corrupt") -> MibCurves:
    """The two faithfulness curves of `scores` ([n_edges] metric changes) at MIB's circuit sizes."""
    ks = mib_edge_counts(graph.n_edges)
    return MibCurves(*(faithfulness_curve(scope, graph, task, scores, ks=ks, ablation=ablation, order=order)
                       for order in ("signed", "absolute")))
