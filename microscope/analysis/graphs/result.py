"""`GraphResult`: an attribution graph with its scores, interventions and controls, as a `Result`.

    result.summary()    # replacement_score, completeness (+ random-init controls), intervention_spearman, ...
    result.figures()    # the pruned graph; predicted against measured ablation effects
    result.to_frame()   # one row per kept node
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from microscope.analysis.controls import Controlled, sentence
from microscope.analysis.graphs.attribution import Graph
from microscope.analysis.graphs.copying import Copying
from microscope.analysis.graphs.interventions import InterventionCheck
from microscope.analysis.graphs.paths import node_layers
from microscope.analysis.graphs.pruning import Pruned
from microscope.analysis.results import Result
from microscope.names import head_label
from microscope.viz.figures import attribution_graph

MAX_DRAWN_EDGES = 400   # the graph figure draws the strongest kept edges only
PREMISE = "target_probability"


@dataclass(frozen=True)
class ControlGraph:
    """A random-init model's own graph of the same prompt and targets (its own salient targets when
    they were chosen by salience): its scores and the probability it gives those targets."""

    replacement_score: float
    completeness: float
    target_probability: float


@dataclass
class GraphResult(Result):
    """One prompt's attribution graph (see `graphs.study.run_attribution_graph`). controls: each
    random-init model's own graph of the same prompt and targets; cue_path: the strongest kept path
    from the cue token to a logit and its strength.

    Every claim rests on the premise that the model predicts the targets beyond random init
    (``target_probability`` clears its control): a graph of a behaviour the model lacks explains
    nothing, however well its top features predict their own ablations. The replacement and
    completeness scores are shown beside the random-init models' own (the scores say how much of
    the computation the transcoders carry, on any model)."""

    graph: Graph
    pruned: Pruned
    replacement_score: float
    completeness: float
    labels: dict[tuple[int, int], str] = field(default_factory=dict)
    interventions: InterventionCheck | None = None
    controls: list[ControlGraph] = field(default_factory=list)
    control_name: str = "random init"
    cue_path: tuple[list[int], float] | None = None
    copy: Copying | None = None
    json_path: str | None = None

    title = "attribution graph: transcoders, frozen attention and norms, pruned as circuit-tracer"

    def label(self, i: int) -> str:
        """A node's short name, with its dashboard label for a feature."""
        text = self.graph.describe(i)
        if self.graph.kind(i) == "feature":
            layer, _, latent = self.graph.features[i].tolist()
            extra = self.labels.get((layer, latent))
            return f"{text}: {extra}" if extra else text
        return text

    def _controlled(self, key: str, value: float, null: list[float], control: str = "") -> Controlled | None:
        if not null:
            return None
        claim = Controlled(value, null, control=control or self.control_name)
        return claim if key == PREMISE else claim.resting_on(PREMISE, self.premise_clears)

    @property
    def premise_clears(self) -> bool:
        """Whether the model gives the targets more probability than every random-init model (and
        by the margin); False without controls."""
        premise = self._controlled(PREMISE, float(self.graph.logit_probabilities.sum()),
                                   [c.target_probability for c in self.controls])
        return premise is not None and premise.clears

    def _headline(self, key: str, value: float, null: list[float], control: str = "") -> dict:
        claim = self._controlled(key, value, null, control)
        return {key: value} if claim is None else claim.headline(key)

    def summary(self) -> dict:
        g, p = self.graph, self.pruned
        out = {"prompt": g.prompt, "targets": list(g.logit_labels), "features_active": g.n_features,
               "nodes": g.n_nodes, "nodes_kept": int(p.node_mask.sum()), "edges_kept": int(p.edge_mask.sum()),
               "node_threshold": p.node_threshold, "edge_threshold": p.edge_threshold,
               **self._headline(PREMISE, float(g.logit_probabilities.sum()),
                                [c.target_probability for c in self.controls]),
               **self._headline("replacement_score", self.replacement_score,
                                [c.replacement_score for c in self.controls]),
               **self._headline("completeness", self.completeness, [c.completeness for c in self.controls])}
        check = self.interventions
        if check is not None:
            out.update({"intervention_spearman": check.spearman,
                        "intervention_spearman_direct_only": check.direct_spearman, "intervention_nodes": len(check.nodes),
                        "intervention_spearman_random_features": float(np.mean(check.control_spearman)),
                        **self._headline("top_feature_ablation_effect", float(check.measured.abs().mean()),
                                         [float(m.abs().mean()) for m in check.control_measured],
                                         f"as many random active features of the same layers "
                                         f"x{len(check.control_measured)}")})
        if self.cue_path is not None:
            path, strength = self.cue_path
            out.update({"cue_path": " -> ".join(g.describe(i) for i in path) or None, "cue_path_strength": strength,
                        "cue_path_features": sum(g.kind(i) == "feature" for i in path)})
        if self.copy is not None:
            c = self.copy
            share = self._controlled("copy_heads_share_of_copy_edge", c.share, c.control_shares,
                                     f"as many random other heads' patterns zeroed x{len(c.control_shares)}")
            out.update({"copy_position": c.position, "copy_edge": c.edge, "copy_head_count": len(c.heads),
                        # the heads are named only when their share of the copy edge clears
                        "copy_heads": [head_label(*h) for h in c.heads] if share is not None and share.clears else None,
                        **(share.headline("copy_heads_share_of_copy_edge") if share is not None
                           else {"copy_heads_share_of_copy_edge": c.share})})
        if self.json_path:
            out["graph_json"] = self.json_path
        return out

    def findings(self) -> list[str]:
        """The scores, the interventions, the cue's path and the copy heads in words, with verdicts."""
        numbers = self.summary()
        said = lambda key, claim: sentence(numbers, key, claim) if f"{key}_control" in numbers else None  # noqa: E731
        out = [said(PREMISE, "the model gives the target logits a probability of"),
               said("replacement_score", "the replacement score (token influence / token and error influence) is"),
               said("completeness", "the completeness score is"),
               said("top_feature_ablation_effect", f"ablating each of the {numbers.get('intervention_nodes')} feature "
                                                   f"nodes of largest influence moves the target logit by (mean |effect|)")]
        if "intervention_spearman" in numbers:
            out.append(f"the graph predicts those ablations with Spearman {numbers['intervention_spearman']:.3f}; for "
                       f"random features of the same layers {numbers['intervention_spearman_random_features']:.3f}")
        if numbers.get("cue_path"):
            out.append(f"the strongest kept path from the cue: {numbers['cue_path']}")
        out.append(said("copy_heads_share_of_copy_edge", "the copy edge's share carried by the frozen patterns of "
                                                         f"{numbers.get('copy_head_count')} heads is"))
        return [line for line in out if line]

    def position(self, i: int) -> int:
        """The token position of node i (a logit's: the last)."""
        g = self.graph
        kind = g.kind(i)
        return (int(g.features[i, 1]) if kind == "feature" else (i - g.error_start) % g.n_pos if kind == "error"
                else i - g.token_start if kind == "token" else g.n_pos - 1)

    def to_frame(self) -> pd.DataFrame:
        g, p = self.graph, self.pruned
        layers = node_layers(g)
        rows = [{"node": g.describe(i), "kind": g.kind(i), "layer": int(layers[i]), "position": self.position(i),
                 "latent": int(g.features[i, 2]) if g.kind(i) == "feature" else None,
                 "activation": float(g.activations[i]) if g.kind(i) == "feature" else None,
                 "influence": float(p.node_influence[i]), "label": self.label(i)}
                for i in p.node_mask.nonzero()[:, 0].tolist()]
        return pd.DataFrame(rows).sort_values("influence", ascending=False, ignore_index=True)

    def figures(self) -> list[go.Figure]:
        g, p = self.graph, self.pruned
        kept = p.node_mask.nonzero()[:, 0].tolist()
        layers = node_layers(g)
        nodes = [{"id": i, "kind": g.kind(i), "layer": int(layers[i]), "pos": self.position(i), "label": self.label(i)}
                 for i in kept]
        targets, sources = (p.edge_mask & p.node_mask[:, None] & p.node_mask[None, :]).nonzero(as_tuple=True)
        weights = g.adjacency[targets, sources]
        strongest = weights.abs().argsort(descending=True)[:MAX_DRAWN_EDGES]
        edges = [(int(sources[k]), int(targets[k]), float(weights[k])) for k in strongest]
        figures = [attribution_graph(nodes, edges, tokens=g.tokens, n_layers=g.n_layers,
                                     title=f"Attribution graph of {g.prompt[-60:]!r} -> {', '.join(g.logit_labels[:4])}"
                                           f" ({len(kept)} nodes, {int(p.edge_mask.sum())} edges)")]
        check = self.interventions
        if check is not None:
            fig = go.Figure(go.Scatter(x=check.predicted.numpy(), y=check.measured.numpy(), mode="markers",
                                       name=f"top {len(check.nodes)} by influence",
                                       text=[self.label(i) for i in check.nodes], hoverinfo="text+x+y"))
            fig.add_trace(go.Scatter(x=torch.cat(check.control_predicted).numpy(),
                                     y=torch.cat(check.control_measured).numpy(), mode="markers",
                                     name="random features, same layers", marker=dict(color="grey", size=5)))
            fig.update_layout(title=f"Ablating a feature: the graph's prediction against the replacement model "
                                    f"(Spearman {check.spearman:.2f})",
                              xaxis_title="predicted change of the target logits", yaxis_title="measured change")
            figures.append(fig)
        return figures
