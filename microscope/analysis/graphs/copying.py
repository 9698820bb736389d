"""Copying through frozen attention: which heads carry the edge from an earlier copy of the target
token straight into its logit.

    found = copying(rm, graph)        # None unless the top target token occurs earlier in the prompt
    found.heads, found.share, found.control_shares

When the top target token stands earlier in the prompt (a repeated span), the nodes at its last
earlier position (its input node, the latents and errors there) have direct edges into the target
logit, read at the last position: only attention moves anything between positions, so each of
these edges runs through the frozen attention patterns. Their sum is the copy edge. The heads
whose frozen pattern from the last position puts at least `min_attention` on that position
(induction heads, when the model has them) are the copy heads; their share of the copy edge is
how much it falls when their patterns are zeroed (the edges recomputed by the same backward
pass). The control zeroes as many other heads, drawn at random (`controls.random_heads`), and
measures their share.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from microscope.analysis.controls import random_heads
from microscope.analysis.graphs.attribution import Graph, graph_sources, logit_vectors, source_rows
from microscope.analysis.graphs.replacement import ReplacementModel


@dataclass
class Copying:
    """The copy position, its heads, the copy edge into the top target logit and the heads' shares."""

    position: int
    heads: list[tuple[int, int]]
    edge: float                          # the copy edge (see the module docstring)
    share: float                         # (edge - edge with the copy heads' patterns zeroed) / edge
    control_heads: list[list[tuple[int, int]]]
    control_shares: list[float]


def copy_edge(rm: ReplacementModel, graph: Graph, position: int) -> float:
    """The sum of the direct edges from every node at `position` (input, latents, errors) into the
    top target logit of `graph`."""
    row = source_rows(rm, graph_sources(rm, graph.features, graph.activations), rm.n_layers,
                      torch.tensor([rm.n_pos - 1]), logit_vectors(rm, graph.logit_tokens[:1]))
    at = torch.zeros(row.shape[1], dtype=torch.bool)
    at[:graph.n_features] = graph.features[:, 1] == position
    at[graph.error_start + position:graph.token_start:graph.n_pos] = True
    at[graph.token_start + position] = True
    return float(row[0, at].sum())


def without_heads(rm: ReplacementModel, heads: list[tuple[int, int]]) -> ReplacementModel:
    """A shallow copy of `rm` whose frozen patterns of `heads` ((layer, head)) are zero."""
    variant = copy.copy(rm)
    variant.patterns = rm.patterns.clone()
    for layer, head in heads:
        variant.patterns[layer, head] = 0.0
    return variant


def copying(rm: ReplacementModel, graph: Graph, *, min_attention: float = 0.3, draws: int = 5,
            seed: int = 0) -> Copying | None:
    """See the module docstring; None when the top target token does not occur earlier or no head
    attends to its last earlier occurrence with `min_attention`."""
    target = int(graph.logit_tokens[0])
    earlier = (graph.input_ids[:-1] == target).nonzero()[:, 0]
    if not len(earlier):
        return None
    position = int(earlier[-1])
    weights = rm.patterns[:, :, -1, position]                                  # [layer, head]
    heads = [tuple(map(int, lh)) for lh in (weights >= min_attention).nonzero().tolist()]
    if not heads:
        return None
    edge = copy_edge(rm, graph, position)
    share = lambda hs: (edge - copy_edge(without_heads(rm, hs), graph, position)) / edge  # noqa: E731
    L, H = rm.patterns.shape[:2]
    controls = [random_heads(L, H, len(heads), exclude=heads, seed=seed + d) for d in range(draws)]
    return Copying(position, heads, edge, share(heads), controls, [share(c) for c in controls])
