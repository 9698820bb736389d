"""The attribution graph of one prompt: direct linear effects between nodes of the frozen
replacement model, computed by batched backward passes.

    graph = attribute(ReplacementModel(scope, transcoders, prompt), targets=[283, 291])
    graph.adjacency          # [node, node]: row = target, column = source
    graph.describe(i)        # "L2#390@5", "err L1@4", "tok ' bitter'@3", "logit ' idiot'"

Nodes, in circuit-tracer's order: every active transcoder latent at (layer, position) (sorted by
layer, position, latent), one error node per (layer, position) (layer-major), one input node per
position, the target logits. An input node carries what enters block 0 at its position (token
plus position embedding, ``blocks.0.hook_resid_pre``): OPT learns its position embeddings, where
circuit-tracer's models have none. A target logit is circuit-tracer's: the logit minus the mean
logit over the vocabulary (the unembedding row minus the mean row), read at the last position,
weighted by its probability.

Edge s -> t: what source s writes (a latent's activation times its decoder row, an error term,
an input vector) times the gradient of t's pre-activation (the latent's encoder row dotted with
its transcoder's input, or the logit) with respect to where s writes, through the frozen model:
attention by its frozen patterns, norms by their frozen scales, and no path through any MLP (a
transcoder's output is a sum of its nodes). The frozen model is affine, so every target's
pre-activation is exactly the sum of its incoming edges plus its bias (its value with every
source zeroed, each MLP output then its transcoder's decoder bias; `Graph.biases`). One backward
pass serves a batch of targets at one layer: each row of the batch injects one target's read vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from microscope.analysis.graphs.replacement import ReplacementModel
from microscope.analysis.inputs import decode_token
from microscope.errors import AnalysisInputError


@dataclass
class Graph:
    """An unpruned attribution graph (see the module docstring). N = features + layers x positions
    + positions + logits nodes."""

    prompt: str
    input_ids: torch.Tensor            # [T]
    tokens: list[str]                  # [T] decoded
    features: torch.Tensor             # [n_features, 3] long: (layer, position, latent)
    activations: torch.Tensor          # [n_features]
    logit_tokens: torch.Tensor         # [n_logits] vocabulary ids
    logit_probabilities: torch.Tensor  # [n_logits] softmax probability at the last position
    logit_labels: list[str]            # [n_logits] decoded
    adjacency: torch.Tensor            # [N, N] float32, row = target, column = source
    biases: torch.Tensor               # [N] a target's value with every source zeroed (NaN for sources only)
    n_layers: int
    scan: list[str]                    # the transcoders (circuit-tracer's transcoder list)

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_start + self.n_logits

    def kind(self, i: int) -> str:
        """"feature", "error", "token" or "logit"."""
        return ("feature" if i < self.error_start else "error" if i < self.token_start
                else "token" if i < self.logit_start else "logit")

    def describe(self, i: int) -> str:
        """A short label of node i: ``L2#390@5``, ``err L1@4``, ``tok ' bitter'@3``, ``logit ' idiot'``."""
        kind = self.kind(i)
        if kind == "feature":
            layer, pos, latent = self.features[i].tolist()
            return f"L{layer}#{latent}@{pos}"
        if kind == "error":
            layer, pos = divmod(i - self.error_start, self.n_pos)
            return f"err L{layer}@{pos}"
        if kind == "token":
            pos = i - self.token_start
            return f"tok {self.tokens[pos]!r}@{pos}"
        return f"logit {self.logit_labels[i - self.logit_start]!r}"


def salient_logits(logits: torch.Tensor, max_n_logits: int = 10, desired_logit_prob: float = 0.95) -> torch.Tensor:
    """circuit-tracer's target logits: the most probable tokens of `logits` [vocab], as few as
    reach `desired_logit_prob` of the probability, at most `max_n_logits`."""
    top_p, top_idx = logits.float().softmax(-1).topk(max_n_logits)
    cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob))) + 1
    return top_idx[:cutoff]


def logit_vectors(rm: ReplacementModel, tokens: torch.Tensor) -> torch.Tensor:
    """[n, d_out] what a target logit reads from the final path's output: its unembedding row minus
    the mean row (so its value is the logit minus the mean logit)."""
    return (rm.unembedding - rm.unembedding.mean(0))[tokens.to(rm.device)]


@dataclass
class Sources:
    """What every source node writes, on the model's device: inputs [T, d], errors [L, T, d], and
    per block its latents' writes (activation x decoder row) [n_l, d], ordered by position then
    latent as the graph's features are, with their first column and their count per position."""

    inputs: torch.Tensor
    errors: torch.Tensor
    writes: list[torch.Tensor]
    starts: list[int]
    counts: list[list[int]]
    n_features: int

    @property
    def width(self) -> int:
        """Columns of every source: features, errors, inputs."""
        return self.n_features + self.errors.shape[0] * self.errors.shape[1] + len(self.inputs)


def graph_sources(rm: ReplacementModel, features: torch.Tensor, activations: torch.Tensor) -> Sources:
    """The `Sources` of `features` [n, 3] (sorted by layer, position, latent) with `activations` [n]."""
    writes, starts, counts = [], [], []
    for layer in range(rm.n_layers):
        cols = (features[:, 0] == layer).nonzero()[:, 0]
        decoder = rm.transcoders[layer].decoder.float().to(rm.device)
        writes.append(decoder[features[cols, 2].to(rm.device)] * activations[cols, None].to(rm.device))
        starts.append(int(cols[0]) if len(cols) else 0)
        counts.append(torch.bincount(features[cols, 1], minlength=rm.n_pos).tolist())
    return Sources(rm.inputs, rm.errors, writes, starts, counts, len(features))


def attribute(rm: ReplacementModel, targets: Sequence[int] | torch.Tensor | None = None, *,
              max_n_logits: int = 10, desired_logit_prob: float = 0.95, batch_size: int = 64) -> Graph:
    """The attribution graph of `rm`'s prompt toward `targets` (token ids read at the last
    position; None: `salient_logits`). `batch_size` targets share one backward pass."""
    vocab = rm.unembedding.shape[0]
    last_logits = rm.model_logits[-1]
    if targets is None:
        targets = salient_logits(last_logits, max_n_logits, desired_logit_prob)
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1).cpu()
    if not len(targets) or (targets < 0).any() or (targets >= vocab).any():
        raise AnalysisInputError(f"target logits {targets.tolist()} must be one or more token ids in [0, {vocab})")
    features = rm.activations.nonzero().cpu()                                    # [n, 3] sorted
    activations = rm.activations[tuple(features.T)].float().cpu()
    sources = graph_sources(rm, features, activations)
    L, T = rm.n_layers, rm.n_pos
    N = sources.width + len(targets)
    adjacency = torch.zeros(N, N)
    biases = torch.full((N,), float("nan"))
    with torch.no_grad():   # every source zeroed: what is left of each MLP output is its transcoder's bias
        zero_out = rm.stream(torch.zeros_like(rm.inputs)[None],
                             lambda l, h: rm.transcoders[l].coder.b_dec.float().to(h.device).expand_as(h))
    for layer in range(L + 1):
        if layer < L:                        # block `layer`'s latents: a contiguous run of rows
            rows = (features[:, 0] == layer).nonzero()[:, 0]
            coder = rm.transcoders[layer].coder
            read = coder.encoder.weight.detach().float()[features[rows, 2].to(rm.device)]    # [n, d]
            positions = features[rows, 1]
            biases[rows] = (read @ zero_out[0][layer][0].T)[torch.arange(len(rows)), positions].cpu() \
                + coder.encoder.bias.detach().float().cpu()[features[rows, 2]]
        else:
            rows = torch.arange(sources.width, N)
            read, positions = logit_vectors(rm, targets), torch.full((len(targets),), T - 1)
            biases[rows] = (read @ zero_out[1][0, T - 1]).cpu()
        for chunk in range(0, len(rows), batch_size):
            part = slice(chunk, chunk + batch_size)
            first = int(rows[part][0])
            adjacency[first:first + len(rows[part]), :sources.width] = source_rows(
                rm, sources, layer, positions[part], read[part])
    return Graph(prompt=rm.prompt, input_ids=rm.input_ids.cpu(),
                 tokens=[decode_token(rm.scope.tokenizer, t) for t in rm.input_ids],
                 features=features, activations=activations, logit_tokens=targets,
                 logit_probabilities=last_logits.softmax(-1)[targets.to(last_logits.device)].cpu(),
                 logit_labels=[decode_token(rm.scope.tokenizer, t) for t in targets], adjacency=adjacency,
                 biases=biases, n_layers=L, scan=rm.transcoders.scan)


def source_rows(rm: ReplacementModel, sources: Sources, layer: int, positions: torch.Tensor,
                read: torch.Tensor) -> torch.Tensor:
    """Incoming edges [B, sources.width] (on the CPU) of B targets all read at block `layer`'s MLP
    input (or at the final path's output when layer == n_layers), from one backward pass: target b
    reads ``read[b] . x[positions[b]]`` (read [B, d])."""
    L, T = rm.n_layers, rm.n_pos
    B = len(positions)
    leaves = torch.zeros(1 + layer, B, T, rm.inputs.shape[-1], device=rm.device, requires_grad=True)
    reads, out = rm.stream(leaves[0], lambda l, h: leaves[l + 1], upto=layer if layer < L else None)
    at = reads[layer] if layer < L else out
    objective = (at[torch.arange(B), positions.to(rm.device)] * read).sum()
    (grad,) = torch.autograd.grad(objective, leaves)                              # [1 + layer, B, T, d]
    rows = torch.zeros(B, sources.width, device=rm.device)
    rows[:, sources.width - T:] = torch.einsum("btd,td->bt", grad[0], sources.inputs)
    for source in range(layer):
        g = grad[source + 1]
        errors = sources.n_features + source * T
        rows[:, errors:errors + T] = torch.einsum("btd,td->bt", g, sources.errors[source])
        per_position = sources.writes[source].split(sources.counts[source])
        start = sources.starts[source]
        rows[:, start:start + len(sources.writes[source])] = torch.cat(
            [g[:, t] @ w.T for t, w in enumerate(per_position)], 1)
    return rows.cpu()
