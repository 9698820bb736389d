"""The strongest path from one node to the logits in a pruned attribution graph.

    path, strength = strongest_path(graph, pruned, graph.token_start + 3)
    " -> ".join(graph.describe(i) for i in path)   # "tok ' bitter'@3 -> L0#99@16 -> ... -> logit ' idiot'"

An edge's strength is its share of its target's input (the row-normalised |adjacency|, circuit-
tracer's A); a path's strength is the product of its edges' shares, and the strongest path to
any kept logit node is found by dynamic programming over the graph's layers (inputs, then each
block's features and errors, then the logits). Only kept nodes and edges count.
"""

from __future__ import annotations

import torch

from microscope.analysis.graphs.attribution import Graph
from microscope.analysis.graphs.pruning import Pruned, normalized


def node_layers(graph: Graph) -> torch.Tensor:
    """[N] each node's place in the order edges run: inputs -1, block l's features and errors l,
    logits n_layers."""
    order = torch.full((graph.n_nodes,), graph.n_layers, dtype=torch.long)
    order[:graph.n_features] = graph.features[:, 0]
    order[graph.error_start:graph.token_start] = torch.arange(graph.n_layers).repeat_interleave(graph.n_pos)
    order[graph.token_start:graph.logit_start] = -1
    return order


def strongest_path(graph: Graph, pruned: Pruned, source: int) -> tuple[list[int], float]:
    """(node indices from `source` to a logit node, product of edge shares) of the strongest path
    through kept edges; ([], 0.0) when no kept path reaches a logit."""
    share = normalized(graph.adjacency) * pruned.edge_mask
    best = torch.zeros(graph.n_nodes, dtype=torch.float64)
    previous = torch.full((graph.n_nodes,), -1, dtype=torch.long)
    best[source] = 1.0
    order = node_layers(graph)
    for layer in range(int(order[source]) + 1, graph.n_layers + 1):
        targets = (order == layer).nonzero()[:, 0]
        reach = share[targets].double() * best[None, :]                     # [targets, sources]
        value, via = reach.max(1)
        best[targets], previous[targets] = value, via
    logits = torch.arange(graph.logit_start, graph.n_nodes)
    end = int(logits[best[logits].argmax()])
    if best[end] == 0:
        return [], 0.0
    path = [end]
    while path[-1] != source:
        path.append(int(previous[path[-1]]))
    return path[::-1], float(best[end])
