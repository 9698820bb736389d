"""Influence, pruning and the two scores of an attribution graph, as circuit-tracer 0.5 defines them
(``circuit_tracer/graph.py``; tested equal to its functions).

    pruned = prune(graph, node_threshold=0.8, edge_threshold=0.98)
    pruned.node_mask, pruned.edge_mask          # [N] bool, [N, N] bool (row = target)
    replacement, completeness = graph_scores(graph)

- A = the adjacency with each row's absolute values normalised to sum 1 (a node's inputs as
  shares); w = the logit nodes' probabilities. A node's influence is w (A + A^2 + ...): its share
  of the logits' inputs over every path (the series ends because the graph has no cycle).
- Pruning keeps the smallest set of nodes holding `node_threshold` of the total influence (input
  and logit nodes always), then, in the graph of the kept nodes, the edges holding
  `edge_threshold` of the edge influence (an edge's normalised weight times its target's
  influence plus logit weight), then drops orphans until none is left: a feature or error node
  with no kept outgoing edge, a feature with no kept incoming edge.
- Replacement score: input nodes' influence / (input + error nodes' influence). Completeness:
  sum over nodes of (1 - the share of its normalised input from error nodes) x (its influence +
  its logit weight), over the sum of (influence + logit weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from microscope.analysis.graphs.attribution import Graph
from microscope.errors import AnalysisInputError


def normalized(adjacency: torch.Tensor) -> torch.Tensor:
    """|A| with every row divided by its sum (rows of zeros stay zero)."""
    a = adjacency.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def influence(normalized_adjacency: torch.Tensor, weights: torch.Tensor, max_steps: int = 1000) -> torch.Tensor:
    """w A + w A^2 + ... [N] for weights w [N] over an acyclic normalised adjacency A [N, N]."""
    step = weights @ normalized_adjacency
    total = step.clone()
    for _ in range(max_steps):
        if not step.any():
            return total
        step = step @ normalized_adjacency
        total += step
    raise AnalysisInputError(f"influence did not vanish after {max_steps} steps: the adjacency has a cycle")


def threshold(scores: torch.Tensor, share: float) -> torch.Tensor:
    """The smallest score among the top scores that together hold `share` of their sum."""
    ranked = scores.flatten().sort(descending=True).values
    cumulative = ranked.cumsum(0) / ranked.sum()
    return ranked[min(int(torch.searchsorted(cumulative, torch.tensor(share))), len(ranked) - 1)]


def logit_weights(graph: Graph) -> torch.Tensor:
    """[N]: each target logit's probability, zero elsewhere."""
    w = torch.zeros(graph.n_nodes)
    w[graph.logit_start:] = graph.logit_probabilities.float()
    return w


@dataclass
class Pruned:
    """What `prune` keeps: nodes [N], edges [N, N] (row = target), each node's influence [N] and its
    cumulative share of influence in descending order [N] (circuit-tracer's "influence" in JSON)."""

    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    node_influence: torch.Tensor
    cumulative: torch.Tensor
    node_threshold: float
    edge_threshold: float


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """The pruned graph (see the module docstring)."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise AnalysisInputError(f"{name} must lie between 0 and 1, got {value}")
    w = logit_weights(graph)
    node_influence = influence(normalized(graph.adjacency), w)
    nodes = node_influence >= threshold(node_influence, node_threshold)
    nodes[graph.token_start:] = True                                   # inputs and logits stay
    kept = graph.adjacency * nodes[:, None] * nodes[None, :]
    kept_normalized = normalized(kept)
    edge_scores = kept_normalized * (influence(kept_normalized, w) + w)[:, None]
    edges = edge_scores >= threshold(edge_scores, edge_threshold)
    sources = slice(0, graph.token_start)                              # features and errors
    before = None
    while before is None or not torch.equal(nodes, before):
        if before is not None:                                         # as circuit-tracer: edges of dropped
            edges &= nodes[:, None] & nodes[None, :]                   # nodes go from the second pass on
        before = nodes.clone()
        nodes[sources] &= edges[:, sources].any(0)                     # something downstream reads it
        nodes[:graph.n_features] &= edges[:graph.n_features].any(1)    # a feature has an input
    ranked, order = node_influence.sort(descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = ranked.cumsum(0) / ranked.sum()
    return Pruned(nodes, edges, node_influence, cumulative, node_threshold, edge_threshold)


def graph_scores(graph: Graph) -> tuple[float, float]:
    """(replacement score, completeness score) of the unpruned graph (see the module docstring)."""
    w = logit_weights(graph)
    a = normalized(graph.adjacency)
    node_influence = influence(a, w)
    errors = slice(graph.error_start, graph.token_start)
    tokens = node_influence[graph.token_start:graph.logit_start].sum()
    error = node_influence[errors].sum()
    replacement = tokens / (tokens + error)
    weight = node_influence + w
    completeness = ((1 - a[:, errors].sum(1)) * weight).sum() / weight.sum()
    return float(replacement), float(completeness)
