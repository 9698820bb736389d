"""The computational graph of an OPT model at head/MLP granularity (docs/circuits.md).

Senders write into the residual stream, receivers read from it; an edge is one sender's
contribution to one receiver's input.

    senders    embed (token + position), then per layer l: heads L{l}H0..H{n-1}, MLP{l}
    receivers  per layer l: L{l}H{h}.q for every head, then .k, then .v, then MLP{l};
               finally logits

An edge (s, r) exists when s is upstream of r: s sits in an earlier layer, or s is a head of
layer l and r is MLP{l}, or r is the logits. In the post-LN layout a LayerNorm sits on the
residual path after every sublayer, so each sender enters the residual at an *entry point*
(embed: 0; heads of layer l: 1 + 2l; MLP l: 2 + 2l) and reaches a receiver through the norms in
between; in pre-LN every sender reaches every receiver through a plain sum (one entry point).

    graph = CircuitGraph.of(scope.model)
    graph.edges                 # LongTensor [n_edges, 2]: (sender, receiver) indices
    graph.edge_labels[0]        # "embed->L0H0.q"
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from microscope.models import anatomy
from microscope.names import head_label

INPUTS = ("q", "k", "v")


@dataclass(frozen=True)
class CircuitGraph:
    """The senders, receivers and edges of an OPT of `n_layers` x `n_heads` (see module doc)."""

    n_layers: int
    n_heads: int
    pre_ln: bool

    @classmethod
    def of(cls, model) -> "CircuitGraph":
        """The graph of an HF `OPTForCausalLM`."""
        return cls(model.config.num_hidden_layers, model.config.num_attention_heads, anatomy.is_pre_ln(model))

    # --- senders -----------------------------------------------------------------------------

    @property
    def n_senders(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    @cached_property
    def senders(self) -> list[str]:
        """Sender labels in index order: "embed", "L0H0", ..., "MLP0", ..."""
        out = ["embed"]
        for l in range(self.n_layers):
            out += [head_label(l, h) for h in range(self.n_heads)] + [f"MLP{l}"]
        return out

    @cached_property
    def sender_layer(self) -> torch.Tensor:
        """LongTensor [S]: the layer of each sender (-1 for the embeddings)."""
        return torch.tensor([-1] + [l for l in range(self.n_layers) for _ in range(self.n_heads + 1)])

    @cached_property
    def entry(self) -> torch.Tensor:
        """LongTensor [S]: the entry point of each sender into the residual (all 0 in pre-LN)."""
        if self.pre_ln:
            return torch.zeros(self.n_senders, dtype=torch.long)
        return torch.tensor([0] + [1 + 2 * l + (h == self.n_heads) for l in range(self.n_layers)
                                   for h in range(self.n_heads + 1)])

    def n_entries(self, group: tuple[str, int]) -> int:
        """How many entry points lie upstream of a receiver group (1 in pre-LN)."""
        kind, layer = group
        if self.pre_ln:
            return 1
        return 1 + 2 * layer + (kind == "mlp")

    # --- receivers ---------------------------------------------------------------------------

    @property
    def n_receivers(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1) + 1

    def head_receiver(self, layer: int, head: int, which: str) -> int:
        return layer * (3 * self.n_heads + 1) + INPUTS.index(which) * self.n_heads + head

    def mlp_receiver(self, layer: int) -> int:
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    @property
    def logits_receiver(self) -> int:
        return self.n_receivers - 1

    def group(self, kind: str, layer: int) -> slice:
        """Receiver indices of a group: ("attn", l) the 3 x n_heads q/k/v inputs of layer l,
        ("mlp", l) the MLP's input, ("logits", n_layers) the unembedding's input."""
        if kind == "attn":
            start = layer * (3 * self.n_heads + 1)
            return slice(start, start + 3 * self.n_heads)
        if kind == "mlp":
            return slice(self.mlp_receiver(layer), self.mlp_receiver(layer) + 1)
        return slice(self.logits_receiver, self.logits_receiver + 1)

    @cached_property
    def groups(self) -> list[tuple[str, int]]:
        """Every receiver group in receiver order: ("attn", 0), ("mlp", 0), ..., ("logits", n_layers)."""
        return [(kind, l) for l in range(self.n_layers) for kind in ("attn", "mlp")] + [("logits", self.n_layers)]

    def upstream_senders(self, kind: str, layer: int) -> int:
        """How many senders (a prefix of the sender order) lie upstream of a receiver group."""
        if kind == "logits":
            return self.n_senders
        return 1 + layer * (self.n_heads + 1) + (self.n_heads if kind == "mlp" else 0)

    @cached_property
    def receivers(self) -> list[str]:
        """Receiver labels in index order: "L0H0.q", ..., "L0H3.v", "MLP0", ..., "logits"."""
        out = []
        for l in range(self.n_layers):
            out += [f"{head_label(l, h)}.{which}" for which in INPUTS for h in range(self.n_heads)]
            out.append(f"MLP{l}")
        return out + ["logits"]

    # --- edges -------------------------------------------------------------------------------

    @cached_property
    def upstream(self) -> torch.Tensor:
        """BoolTensor [S, R]: which (sender, receiver) pairs are edges."""
        mask = torch.zeros(self.n_senders, self.n_receivers, dtype=torch.bool)
        for l in range(self.n_layers):
            for kind in ("attn", "mlp"):
                mask[: self.upstream_senders(kind, l), self.group(kind, l)] = True
        mask[:, self.logits_receiver] = True
        return mask

    @cached_property
    def edges(self) -> torch.Tensor:
        """LongTensor [n_edges, 2]: (sender, receiver) of every edge, sender-major order."""
        return self.upstream.nonzero()

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @cached_property
    def edge_labels(self) -> list[str]:
        return [f"{self.senders[s]}->{self.receivers[r]}" for s, r in self.edges.tolist()]

    def edge_index(self, label: str) -> int:
        """The index of an edge given as "L0H1->L2H3.k"."""
        return self.edge_labels.index(label)

    def mask(self, edge_values: torch.Tensor) -> torch.Tensor:
        """[n_edges] values -> [S, R] (zero / False off the edges)."""
        out = torch.zeros(self.n_senders, self.n_receivers, dtype=edge_values.dtype)
        out[self.edges[:, 0], self.edges[:, 1]] = edge_values.to(out.device)
        return out
