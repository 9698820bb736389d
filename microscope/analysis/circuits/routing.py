"""The edge-resolved forward pass: every receiver reads its own copy of the residual stream.

One ordinary forward of the HF model, with hooks (`Scope.hooks`) that

- record each sender's output as the run computes it: the embeddings (``hook_embed`` +
  ``hook_pos_embed``), each head's output (its d_head slice of ``hook_z`` times its columns of
  ``out_proj``; the ``out_proj`` bias belongs to no head and is never patched), each MLP's output
  (``hook_mlp_out``, its ``fc2`` bias included);
- rebuild each receiver's input as the model's own residual plus a per-receiver delta, and feed
  it to that receiver alone: the head's q/k/v projection slice (replacing its slice of
  ``hook_q|k|v``), the MLP's ``fc1`` (replacing ``mlp.hook_pre``), the final path (replacing the
  last ``hook_resid_post``).

The delta of a receiver group comes from a `DeltaFn`: ``fn(kind, layer, senders)``, where
``senders()`` gives the outputs (detached) of the senders upstream of the group in this run
([batch, pos, S', d_model]), returns [batch, pos, R_group, n_entries, d_model] (or None: the group reads the model's own
residual). Edge patching returns (ablated - current) summed over the ablated edges; EAP returns
zero leaves whose gradient is d metric / d receiver input.

How a delta reaches the receiver (docs/circuits.md):
- pre-LN: input = LN_receiver(residual + delta), LN_receiver the receiver's own norm
  (``self_attn_layer_norm`` for q/k/v, ``final_layer_norm`` for the MLP, the final norm for
  the logits, which the model applies itself).
- post-LN: the residual is replayed from the senders with recomputed statistics: starting from
  embed + delta[entry 0], through every sublayer below the receiver, ``x = LN(x + out + delta
  [entry])`` -- the delta of a sender enters where the sender does and passes through each
  LayerNorm between it and the receiver, each norm's statistics recomputed on the receiver's
  own copy (so ablating every edge gives exactly the corrupted run's inputs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from microscope.analysis.circuits.graph import CircuitGraph
from microscope.models import anatomy
from microscope.names import act_name

DeltaFn = Callable[[str, int, Callable[[], torch.Tensor]], "torch.Tensor | None"]
EmbedFn = Callable[[torch.Tensor], torch.Tensor]


class EdgeRouter:
    """Hook functions for one edge-resolved forward (see module doc). Use a fresh router per run:
    ``with scope.hooks(router.hooks()): logits = scope.run(ids, attention_mask=mask)``.

    `embed_fn` optionally replaces the token embedding (``hook_embed``), e.g. to interpolate
    inputs for EAP-IG. After the run, `senders()` is [batch, pos, S, d_model] of this run."""

    def __init__(self, model: nn.Module, graph: CircuitGraph, delta_fn: DeltaFn,
                 embed_fn: EmbedFn | None = None):
        self.model, self.graph, self.delta_fn, self.embed_fn = model, graph, delta_fn, embed_fn
        self.layers = anatomy.layers(model)
        self._parts: list[torch.Tensor] = []     # sender outputs so far, each [batch, pos, n, d]
        self._embed: dict[str, torch.Tensor] = {}
        self._resid: dict[tuple[str, int], torch.Tensor] = {}   # pre-LN: resid_pre / resid_mid
        self._sublayer: dict[tuple[str, int], torch.Tensor] = {}   # post-LN: attn_out / mlp_out
        self._qkv: dict[int, torch.Tensor] = {}

    def senders(self, upstream: int | None = None) -> torch.Tensor:
        """[batch, pos, S', d_model]: the first `upstream` senders recorded in this run (all so far)."""
        self._flush_embed()
        return torch.cat(self._parts, dim=2)[:, :, :upstream]

    def hooks(self) -> dict:
        g, last = self.graph, self.graph.n_layers - 1
        hooks = {act_name("hook_embed"): self._on_embed, act_name("hook_pos_embed"): self._on_embed,
                 act_name("resid_post", last): self._on_logits_input}
        for l in range(g.n_layers):
            hooks[act_name("z", l)] = self._on_z
            hooks[act_name("mlp_out", l)] = self._on_mlp_out
            hooks[act_name("mlp_pre", l)] = self._on_mlp_in
            for which in ("q", "k", "v"):
                hooks[act_name(which, l)] = self._on_qkv
            if g.pre_ln:
                hooks[act_name("resid_pre", l)] = self._record_resid
                hooks[act_name("resid_mid", l)] = self._record_resid
            else:
                hooks[act_name("attn_out", l)] = self._record_sublayer
        return hooks

    # --- recording senders -------------------------------------------------------------------

    def _on_embed(self, x: torch.Tensor, hook) -> torch.Tensor | None:
        if hook.name == act_name("hook_embed") and self.embed_fn is not None:
            x = self.embed_fn(x)
            self._embed[hook.name] = x
            return x
        self._embed[hook.name] = x
        return None

    def _flush_embed(self) -> None:
        if not self._parts:
            self._parts.append((self._embed[act_name("hook_embed")]
                                + self._embed[act_name("hook_pos_embed")]).detach()[:, :, None])

    def _on_z(self, z: torch.Tensor, hook) -> None:
        """z [batch, pos, head, d_head] -> head outputs [batch, pos, head, d_model]."""
        w = self.layers[hook.layer].self_attn.out_proj.weight          # [d_model, head * d_head]
        self._flush_embed()
        self._parts.append(torch.einsum("bphe,dhe->bphd", z.detach(), w.detach().view(w.shape[0], *z.shape[2:])))

    def _on_mlp_out(self, x: torch.Tensor, hook) -> None:
        self._parts.append(x.detach()[:, :, None])
        if not self.graph.pre_ln:
            self._sublayer["mlp", hook.layer] = x

    def _record_resid(self, x: torch.Tensor, hook) -> None:
        self._resid["attn" if hook.name.endswith("resid_pre") else "mlp", hook.layer] = x

    def _record_sublayer(self, x: torch.Tensor, hook) -> None:
        self._sublayer["attn", hook.layer] = x

    # --- receivers ---------------------------------------------------------------------------

    def _delta(self, kind: str, layer: int) -> torch.Tensor | None:
        upstream = self.graph.upstream_senders(kind, layer)
        return self.delta_fn(kind, layer, lambda: self.senders(upstream))

    def _on_qkv(self, x: torch.Tensor, hook) -> torch.Tensor | None:
        """Replace each head's q, k or v [batch, pos, head, d_head] by its projection of its own input."""
        l = hook.layer
        if l not in self._qkv:
            delta = self._delta("attn", l)
            self._qkv[l] = None if delta is None else self._inputs("attn", l, delta)  # [b, p, 3H, d]
        inputs = self._qkv[l]
        if inputs is None:
            return None
        which = hook.name.rsplit("_", 1)[-1]
        h = self.graph.n_heads
        part = inputs[:, :, "qkv".index(which) * h:("qkv".index(which) + 1) * h]
        proj = getattr(self.layers[l].self_attn, f"{which}_proj")
        w = proj.weight.view(h, -1, proj.weight.shape[-1])              # [head, d_head, d_model]
        out = torch.einsum("bphd,hed->bphe", part, w)
        return out if proj.bias is None else out + proj.bias.view(h, -1)

    def _on_mlp_in(self, x: torch.Tensor, hook) -> torch.Tensor | None:
        delta = self._delta("mlp", hook.layer)
        if delta is None:
            return None
        fc1 = self.layers[hook.layer].fc1
        return F.linear(self._inputs("mlp", hook.layer, delta)[:, :, 0], fc1.weight, fc1.bias)

    def _on_logits_input(self, x: torch.Tensor, hook) -> torch.Tensor | None:
        delta = self._delta("logits", self.graph.n_layers)
        if delta is None:
            return None
        if self.graph.pre_ln:   # the model applies the final norm itself
            return x + delta.sum(3)[:, :, 0]
        return self._replay(self.graph.n_layers, delta)[:, :, 0]

    def _inputs(self, kind: str, layer: int, delta: torch.Tensor) -> torch.Tensor:
        """A receiver group's inputs [batch, pos, R, d_model] from its delta [b, p, R, E, d]."""
        if not self.graph.pre_ln:
            x = self._replay(layer, delta)
            if kind == "attn":
                return x
            return _norm(self.layers[layer].self_attn_layer_norm,
                         x + (self._sublayer["attn", layer][:, :, None] + delta[:, :, :, -1]))
        block = self.layers[layer]
        norm = block.self_attn_layer_norm if kind == "attn" else block.final_layer_norm
        return _norm(norm, self._resid[kind, layer][:, :, None] + delta.sum(3))

    def _replay(self, layer: int, delta: torch.Tensor) -> torch.Tensor:
        """post-LN: the residual entering block `layer` [b, p, R, d], rebuilt with each entry's delta."""
        x = self.senders(1) + delta[:, :, :, 0]
        for k in range(layer):
            block = self.layers[k]
            x = _norm(block.self_attn_layer_norm, x + (self._sublayer["attn", k][:, :, None] + delta[:, :, :, 1 + 2 * k]))
            x = _norm(block.final_layer_norm, x + (self._sublayer["mlp", k][:, :, None] + delta[:, :, :, 2 + 2 * k]))
        return x


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm` applied functionally (calling the module would fire hooks attached to it)."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
