"""Does the graph predict what removing a feature does? Its prediction against the measured effect
of ablating the feature in the replacement model, with random features as the control.

    check = check_interventions(rm, graph, node_influence, n=20, draws=5)
    check.spearman                 # rank agreement of predicted and measured effects, top-20 nodes
    check.control_spearman         # the same for random features of the same layers, per draw

The metric is the target logits' mean, weighted by their probabilities (each a logit minus the
mean logit, as the graph's logit nodes are). Removing feature s (its activation a_s set to zero)
is predicted to change it by ``-e_s``, where e is its total effect through the adjacency A:
``e_s = d_s + sum_t (e_t / a_t) A[t, s]`` over features t, d_s the probability-weighted direct
edges from s into the logit nodes; each feature downstream is taken to move one for one with its
pre-activation (an active ReLU). The measured effect is `ReplacementModel.run` with s zeroed at
its position: later transcoders recompute their latents (TopK and all), attention patterns, norm
scales and error terms stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from microscope.analysis.graphs.attribution import Graph
from microscope.analysis.graphs.replacement import ReplacementModel
from microscope.errors import AnalysisInputError


def target_weights(graph: Graph) -> torch.Tensor:
    """[n_logits] the target logits' probabilities, normalised to sum 1 (the metric's weights)."""
    p = graph.logit_probabilities.float()
    return p / p.sum()


def predicted_effects(graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
    """(direct, total) [n_features]: each feature's effect on the metric through its direct edges
    into the logits, and through every path of the adjacency (see the module docstring)."""
    F = graph.n_features
    direct = target_weights(graph) @ graph.adjacency[graph.logit_start:, :F]
    feature_edges = graph.adjacency[:F, :F]
    total, term = direct.clone(), direct.clone()
    for _ in range(graph.n_layers):        # features feed only later blocks: the series ends by then
        term = (term / graph.activations) @ feature_edges
        total += term
    return direct, total


def metric(rm: ReplacementModel, graph: Graph, logits: torch.Tensor) -> float:
    """The metric of replacement logits [T, vocab]: the weighted mean of the targets' demeaned
    logits at the last position."""
    last = logits[-1].float().cpu()
    return float(target_weights(graph) @ (last[graph.logit_tokens] - last.mean()))


def measured_effects(rm: ReplacementModel, graph: Graph, nodes: list[int]) -> torch.Tensor:
    """[len(nodes)] the metric's change when each feature node (an index < n_features) is ablated."""
    clean = metric(rm, graph, rm.run())
    return torch.tensor([metric(rm, graph, rm.run(ablate=[tuple(graph.features[i].tolist())])) - clean
                         for i in nodes])


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation; 0 when either side is constant (no ranking to agree with)."""
    if bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return 0.0
    return float(stats.spearmanr(a.numpy(), b.numpy()).statistic)


@dataclass
class InterventionCheck:
    """Top-influence feature nodes and random controls: predicted (-total effect), direct-only
    prediction and measured changes of the metric, and their rank agreement."""

    nodes: list[int]
    predicted: torch.Tensor
    direct: torch.Tensor
    measured: torch.Tensor
    spearman: float
    control_nodes: list[list[int]]
    control_predicted: list[torch.Tensor]
    control_measured: list[torch.Tensor]
    control_spearman: list[float]

    @property
    def direct_spearman(self) -> float:
        """The same agreement using only the direct edges into the logits."""
        return _spearman(self.direct, self.measured)


def check_interventions(rm: ReplacementModel, graph: Graph, node_influence: torch.Tensor, *, n: int = 20,
                        draws: int = 5, seed: int = 0) -> InterventionCheck:
    """Ablate the `n` feature nodes of largest influence one at a time and compare with the graph's
    prediction; the control: `draws` draws of n other active features with the same count per layer."""
    if n < 3 or graph.n_features < 2 * n:
        raise AnalysisInputError(f"need n >= 3 and at least 2n active features to compare; n={n}, "
                                 f"{graph.n_features} features: lower n")
    direct, total = predicted_effects(graph)
    top = node_influence[:graph.n_features].argsort(descending=True)[:n].tolist()
    rng = np.random.default_rng(seed)
    layers = graph.features[:, 0]
    pools = {int(layer): [i for i in (layers == layer).nonzero()[:, 0].tolist() if i not in set(top)]
             for layer in layers[top].unique()}
    counts = {layer: int((layers[top] == layer).sum()) for layer in pools}
    controls = [sorted(j for layer, pool in pools.items()
                       for j in rng.choice(pool, min(counts[layer], len(pool)), replace=False).tolist())
                for _ in range(draws)]
    measured = measured_effects(rm, graph, top)
    control_measured = [measured_effects(rm, graph, c) for c in controls]
    return InterventionCheck(
        nodes=top, predicted=-total[top], direct=-direct[top], measured=measured,
        spearman=_spearman(-total[top], measured), control_nodes=controls,
        control_predicted=[-total[c] for c in controls], control_measured=control_measured,
        control_spearman=[_spearman(-total[c], m) for c, m in zip(controls, control_measured)])
