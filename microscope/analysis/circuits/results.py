"""`CircuitResult`: the edges' scores, the extracted circuit, its faithfulness, MIB's CPR and CMD,
the edges and components that exact patching says carry the effect, and the control."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from microscope.analysis.circuits.extraction import FaithfulnessCurve, minimal_circuit
from microscope.analysis.circuits.graph import CircuitGraph
from microscope.analysis.circuits.mib import MibCurves, mib_edge_counts
from microscope.analysis.controls import Controlled, sentence
from microscope.analysis.results import Result, round_headline
from microscope.errors import AnalysisInputError
from microscope.names import head_label
from microscope.viz.figures import circuit_graph, line_plot


@dataclass(frozen=True)
class Agreement:
    """An estimate against exact patching over `compared` edges (see `discovery.agreement`)."""

    spearman: float
    spearman_signed: float
    top_overlap: float
    top: int
    compared: int


@dataclass(repr=False)
class CircuitResult(Result):
    """eap_ig / eap / exact: [n_edges] scores in `graph.edges` order (exact: metric change when the
    edge alone is ablated; eap_ig along the `interpolate` path, and eap_ig_inputs the same on the
    inputs' path when that is another, reported beside it); rank_by: the scores the circuit is
    extracted by ("eap_ig" or "exact"); curve: faithfulness of that ranking; other_curves: {scores: curve} of the other
    rankings computed; controls / control_scores: the extraction on random-init models;
    head_ablation: {"zeroed" | "patched": [layer, head]} metric drop when the head's output is
    zeroed or patched from the corrupted run; budget: share of edges the headline circuit keeps;
    minimal: the fewest edges reaching `target` (None: not reached); mib: {scores: MIB's curves
    (`mib.py`)} of every ranking computed, control_mib: those of the controls' `rank_by` scores;
    random_edge_faithfulness: [draw] faithfulness of as many random edges of this model."""

    task: str
    graph: CircuitGraph
    eap_ig: torch.Tensor
    curve: FaithfulnessCurve
    controls: list[FaithfulnessCurve]
    control_scores: list[torch.Tensor]
    head_ablation: dict[str, torch.Tensor]
    target: float
    budget: float
    minimal: int | None
    steps: int
    rank_by: str = "eap_ig"
    interpolate: str = "inputs"
    other_curves: dict[str, FaithfulnessCurve] = field(default_factory=dict)
    exact: torch.Tensor | None = None
    eap: torch.Tensor | None = None
    eap_ig_inputs: torch.Tensor | None = None
    agreement_eap_ig: Agreement | None = None
    agreement_eap: Agreement | None = None
    agreement_eap_ig_inputs: Agreement | None = None
    mib: dict[str, MibCurves] = field(default_factory=dict)
    control_mib: list[MibCurves] = field(default_factory=list)
    random_edge_faithfulness: list[float] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.task} circuit"

    @property
    def kept(self) -> int:
        """Edges in the headline circuit: `budget` of all edges."""
        return budget_edges(self.graph.n_edges, self.budget)

    @property
    def scores(self) -> torch.Tensor:
        """[n_edges] the scores the circuit is extracted by (`rank_by`)."""
        return self.exact if self.rank_by == "exact" else self.eap_ig

    def circuit(self, k: int | None = None) -> list[str]:
        """Labels of the top-`k` edges by |score| (default: the headline circuit)."""
        return [self.graph.edge_labels[i] for i in self.curve.order[: k or self.kept]]

    def circuit_heads(self, k: int | None = None) -> list[str]:
        """Heads that send or receive along an edge of the circuit, sorted."""
        nodes = {part.split(".")[0] for edge in self.circuit(k) for part in edge.split("->")}
        return sorted(n for n in nodes if n.startswith("L"))

    def ablation_heads(self, method: str = "patched", share: float = 0.1) -> list[str]:
        """Heads whose output, zeroed or patched from the corrupted run (`method`), moves the metric
        by more than `share` of the clean-vs-corrupt gap."""
        gap = abs(self.curve.clean - self.curve.corrupt)
        return [head_label(l, h) for l, h in (self.head_ablation[method].abs() > share * gap).nonzero().tolist()]

    def recovered(self) -> Controlled:
        """Metric recovered by the headline circuit (faithfulness x gap), against random init."""
        def recovered(curve: FaithfulnessCurve) -> float:
            return curve.at(self.kept) * (curve.clean - curve.corrupt)
        return Controlled(recovered(self.curve), [recovered(c) for c in self.controls],
                          control=f"random init x{len(self.controls)}")

    def beats_random_edges(self) -> Controlled:
        """The headline circuit's faithfulness against as many random edges of the same model. It rests
        on the recovered metric clearing random init: on a model with no behaviour, the edges of
        largest attribution still keep more of its (noise) gap than random edges do."""
        claim = Controlled(self.curve.at(self.kept), self.random_edge_faithfulness,
                           control=f"as many random edges of this model x{len(self.random_edge_faithfulness)}")
        return claim.resting_on("recovered_metric", self.recovered().clears) if self.controls else claim

    def cpr(self) -> Controlled:
        """MIB's CPR of the extraction's ranking (`rank_by`) against random init; it rests on the
        circuit's recovered metric clearing random init (a random model has no behaviour to recover)."""
        return Controlled(self.mib[self.rank_by].cpr, [m.cpr for m in self.control_mib],
                          control=f"random init x{len(self.control_mib)}").resting_on(
                              "recovered_metric", self.recovered().clears)

    def cmd(self) -> Controlled:
        """MIB's CMD of the extraction's ranking against random init (lower is the claim); rests as `cpr`."""
        return Controlled(self.mib[self.rank_by].cmd, [m.cmd for m in self.control_mib],
                          control=f"random init x{len(self.control_mib)}", higher_is_claim=False).resting_on(
                              "recovered_metric", self.recovered().clears)

    def gap_shares(self) -> torch.Tensor:
        """[n_edges] share of the clean-vs-corrupt gap that ablating each edge alone removes (exact
        patching): -exact / (clean - corrupt); 1 the whole gap, negative where it widens the gap."""
        if self.exact is None:
            raise AnalysisInputError("gap shares need exact edge effects: find_circuit(..., exact=True)")
        return -self.exact / (self.curve.clean - self.curve.corrupt)

    def exact_top_edges(self, top: int = 10, share: float = 0.1) -> list[dict]:
        """[{"edge", "share"}]: the edges whose ablation alone removes at least `share` of the gap
        (`gap_shares`), largest share first, at most `top`."""
        shares = self.gap_shares()
        ranked = [i for i in shares.argsort(descending=True).tolist() if shares[i] >= share][:top]
        return [{"edge": self.graph.edge_labels[i], "share": round(float(shares[i]), 4)} for i in ranked]

    def exact_top_components(self, top: int = 10, share: float = 0.1) -> list[dict]:
        """[{"component", "share", "edge"}]: heads and MLPs ranked by the largest gap share of any edge
        they send or receive (that edge beside it), those reaching `share`, at most `top`."""
        best: dict[str, tuple[float, str]] = {}
        for label, value in zip(self.graph.edge_labels, self.gap_shares().tolist()):
            for node in {part.split(".")[0] for part in label.split("->")} - {"embed", "logits"}:
                if value > best.get(node, (-math.inf, ""))[0]:
                    best[node] = (value, label)
        ranked = sorted(((v, node, edge) for node, (v, edge) in best.items() if v >= share), reverse=True)[:top]
        return [{"component": node, "share": round(v, 4), "edge": edge} for v, node, edge in ranked]

    def summary(self) -> dict:
        out = {"task": self.task, "edges": self.graph.n_edges, "eap_ig_steps": self.steps,
               "eap_ig_interpolate": self.interpolate,
               "metric_clean": round(self.curve.clean, 4), "metric_corrupt": round(self.curve.corrupt, 4)}
        for name, agreement in (("eap_ig", self.agreement_eap_ig), ("eap", self.agreement_eap),
                                ("eap_ig_inputs", self.agreement_eap_ig_inputs)):
            if agreement is not None:
                out[f"spearman_{name}"] = round(agreement.spearman, 4)
                out[f"spearman_{name}_signed"] = round(agreement.spearman_signed, 4)
                out[f"top{agreement.top}_overlap_{name}"] = agreement.top_overlap
                out["edges_compared"] = agreement.compared
        control_f = [c.at(self.kept) for c in self.controls]
        out.update({
            "rank_by": self.rank_by, "faithfulness": round(self.curve.at(self.kept), 4),
            **{f"faithfulness_{name}_ranking": round(c.at(self.kept), 4) for name, c in self.other_curves.items()},
            "edges_kept": self.kept,
            "edge_share": round(self.kept / self.graph.n_edges, 4), "target": self.target,
            "minimal_edges": self.minimal,
            "minimal_edge_share": None if self.minimal is None else round(self.minimal / self.graph.n_edges, 4),
            "faithfulness_random_init_max": round(max(control_f), 4) if control_f else None,
            "minimal_edges_random_init": [minimal_circuit(c, self.target) for c in self.controls],
            "metric_gap_random_init_max": round(max(abs(c.clean - c.corrupt) for c in self.controls), 4)
            if self.controls else None,
        })
        # heads are named only for an effect beyond random init: the circuit's recovered metric
        found = (self.recovered().clears if self.controls else True) and \
            (self.beats_random_edges().clears if self.random_edge_faithfulness else True)
        out["circuit_heads"] = self.circuit_heads() if found else []
        for method in ("patched", "zeroed"):
            heads = self.ablation_heads(method) if found else []
            out[f"{method}_heads"] = heads
            out[f"{method}_heads_in_circuit"] = set(heads) <= set(out["circuit_heads"])
        if self.exact is not None:     # what single-edge patching says carries the effect
            out["exact_top_edges"] = self.exact_top_edges() if found else []
            out["exact_top_components"] = self.exact_top_components() if found else []
        if self.controls:
            out.update(round_headline(self.recovered().headline("recovered_metric")))
        if self.random_edge_faithfulness:
            out.update(round_headline(self.beats_random_edges().headline("faithfulness_vs_random_edges")))
        if self.mib:
            out["mib_edges_kept"] = mib_edge_counts(self.graph.n_edges)
            curves = self.mib[self.rank_by]
            out["mib_faithfulness_signed"] = [round(f, 4) for f in curves.signed.faithfulness]
            out["mib_faithfulness_absolute"] = [round(f, 4) for f in curves.absolute.faithfulness]
            for key, claim in (("cpr", self.cpr), ("cmd", self.cmd)):
                out.update(round_headline(claim().headline(key)) if self.control_mib
                           else {key: round(getattr(curves, key), 4)})
            out.update({f"{key}_{name}_ranking": round(getattr(c, key), 4)
                        for name, c in self.mib.items() if name != self.rank_by for key in ("cpr", "cmd")})
        return out

    def findings(self) -> list[str]:
        """The circuit's recovered metric, MIB's CPR and CMD with their verdicts, and the edges that
        exact patching says carry the effect, in words."""
        numbers = self.summary()
        out = []
        if "recovered_metric_control" in numbers:
            out.append(sentence(numbers, "recovered_metric",
                                f"the circuit of the top {self.kept} edges ({self.budget:.0%} of {self.graph.n_edges}, "
                                f"ranked by {self.rank_by}; faithfulness {numbers['faithfulness']}) recovers a metric of"))
        if "faithfulness_vs_random_edges_control" in numbers:
            out.append(sentence(numbers, "faithfulness_vs_random_edges",
                                f"those {self.kept} edges keep a share of the gap (faithfulness) of"))
        for key, what in (("cpr", "MIB's CPR (area under faithfulness, signed ranking) is"),
                          ("cmd", "MIB's CMD (area of |1 - faithfulness|, absolute ranking) is")):
            if f"{key}_control" in numbers:
                out.append(sentence(numbers, key, what))
        if numbers.get("exact_top_edges"):
            out.append("exact patching, the share of the gap each edge alone removes: " + ", ".join(
                f"{e['edge']} {e['share']:.2f}" for e in numbers["exact_top_edges"][:6]))
        return out

    def to_frame(self) -> pd.DataFrame:
        g = self.graph
        rank = np.empty(g.n_edges, dtype=int)
        rank[self.curve.order] = np.arange(g.n_edges)
        frame = pd.DataFrame({"edge": g.edge_labels, "sender": [g.senders[s] for s in g.edges[:, 0].tolist()],
                              "receiver": [g.receivers[r] for r in g.edges[:, 1].tolist()],
                              "eap_ig": self.eap_ig.tolist(), "rank": rank, "in_circuit": rank < self.kept})
        if self.exact is not None:
            frame["exact"] = self.exact.tolist()
            frame["gap_share"] = self.gap_shares().tolist()
            frame["eap"] = self.eap.tolist()
        if self.eap_ig_inputs is not None:
            frame["eap_ig_inputs"] = self.eap_ig_inputs.tolist()
        return frame.sort_values("rank").reset_index(drop=True)

    def figures(self) -> list[go.Figure]:
        by = {"eap_ig": "|EAP-IG|", "exact": "|exact effect|"}
        curves = {f"model, top by {by[self.rank_by]}": self.curve.faithfulness}
        curves.update({f"model, top by {by[name]}": c.faithfulness for name, c in self.other_curves.items()})
        curves.update({f"random init {i}": c.faithfulness for i, c in enumerate(self.controls)})
        figures = [self._graph_figure(self.scores, self.curve.order, f"{self.title}: top {self.kept} edges "
                                      f"by {by[self.rank_by]} (faithfulness {self.curve.at(self.kept):.2f})"),
                   line_plot(curves, x=self.curve.ks, title=f"{self.title}: faithfulness by edges kept",
                             x_title="edges kept", y_title="faithfulness", hline=self.target)]
        if self.controls:
            figures.append(self._graph_figure(self.control_scores[0], self.controls[0].order,
                                              f"control (random init 0): top {self.kept} edges "
                                              f"(faithfulness {self.controls[0].at(self.kept):.2f})"))
        if self.exact is not None:
            figures.append(self._agreement_figure())
        return figures

    def _graph_figure(self, scores: torch.Tensor, order: list[int], title: str) -> go.Figure:
        g = self.graph
        edges = []
        for i in order[: self.kept]:
            s, r = g.edges[i].tolist()
            receiver, _, port = g.receivers[r].partition(".")
            edges.append((g.senders[s], receiver, float(scores[i]), port or "in"))
        return circuit_graph(node_positions(g), edges, title=title)

    def _agreement_figure(self) -> go.Figure:
        fig = go.Figure(go.Scatter(x=self.exact.numpy(), y=self.eap_ig.numpy(), mode="markers",
                                   text=self.graph.edge_labels, name=f"EAP-IG ({self.interpolate})"))
        if self.eap_ig_inputs is not None:
            fig.add_trace(go.Scatter(x=self.exact.numpy(), y=self.eap_ig_inputs.numpy(), mode="markers",
                                     text=self.graph.edge_labels, name="EAP-IG (inputs)", marker=dict(symbol="diamond")))
        fig.add_trace(go.Scatter(x=self.exact.numpy(), y=self.eap.numpy(), mode="markers",
                                 text=self.graph.edge_labels, name="EAP", marker=dict(symbol="x")))
        a = self.agreement_eap_ig
        fig.update_layout(title=f"{self.title}: EAP-IG ({self.interpolate}) vs exact edge patching "
                                f"(Spearman |.| {a.spearman:.2f}, top-{a.top} overlap {a.top_overlap:.0%})",
                          xaxis_title="exact effect of ablating the edge", yaxis_title="estimate")
        return fig


def budget_edges(n_edges: int, budget: float) -> int:
    """Edges kept for a `budget` share of `n_edges` (at least one)."""
    return max(1, math.floor(budget * n_edges))


def node_positions(graph: CircuitGraph) -> dict[str, tuple[float, float]]:
    """(x, y) of each component for drawing: embed at the bottom, then per layer its heads in a
    row and its MLP above them, logits on top."""
    middle = (graph.n_heads - 1) / 2
    out = {"embed": (middle, 0.0)}
    for l in range(graph.n_layers):
        for h in range(graph.n_heads):
            out[graph.senders[graph.head_sender(l, h)]] = (float(h), 2.0 * l + 1)
        out[graph.senders[graph.mlp_sender(l)]] = (middle, 2.0 * l + 2)
    out["logits"] = (middle, 2.0 * graph.n_layers + 1)
    return out
