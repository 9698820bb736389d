"""Direct logit attribution: how much each head, MLP neuron, bias and embedding writes straight
into a logit (or a logit difference), with every LayerNorm scale frozen from the clean run.

What decomposes, exactly. Freeze each LayerNorm's 1/sigma at the value the clean run used; a
LayerNorm is then affine: ``LN(x) = A x + beta`` with ``A = diag(gamma) C / sigma`` (``C``
subtracts the mean). Every component's output reaches the logits along the residual stream's
skip connections through a chain of such affine maps, so the logit is exactly the sum of

    (pulled-back direction at that point) . (component output)   plus one term per LN bias.

- pre-LN (every OPT size but 350m): the residual stream is a plain sum (embeddings + each head
  + attention bias + each MLP neuron + MLP bias); only the final LayerNorm sits on the path, so
  its gamma/sigma scales every component alike and its beta is one more term (``ln_final.bias``).
- post-LN (350m): each block ends ``resid_mid = LN_attn(resid_pre + attn_out)`` and
  ``resid_post = LN_mlp(resid_mid + mlp_out)``; every one of those LayerNorms sits on the skip
  path of everything written before it. A component of block l is therefore scaled by the frozen
  LNs of block l and of every later block, and each LN's beta enters as its own term
  (``L{l}.ln_attn.bias``, ``L{l}.ln_mlp.bias``), itself scaled by the later LNs. This is the
  *direct* path only: what later layers compute from a component is not credited to it.

Components: ``embed`` (token embedding after project_in), ``pos_embed``, ``L{l}H{h}`` (head
output through its slice of out_proj), ``L{l}.attn_bias`` (out_proj bias), ``L{l}.mlp`` (the sum
of that layer's neurons, each ``activation * fc2 column``; see `.neurons`), ``L{l}.mlp_bias``
(fc2 bias), and the LN bias terms above. They sum to the model's logit (difference) up to float
rounding (checked to 1e-4 in the tests). The final path ``project_out`` and ``lm_head`` have no bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from einops import einsum, rearrange

from microscope.analysis.inputs import TextsOrIds, Tokens, select_position, token_batch, token_ids
from microscope.analysis.results import Result
from microscope.models.anatomy import decoder, final_norm, is_pre_ln
from microscope.names import act_name, head_label
from microscope.viz.figures import head_grid


@dataclass(repr=False)
class AttributionResult(Result):
    """Direct logit attribution at one position per prompt.

    components: names (see module docstring); values: [batch, component] contribution to the
    metric; heads: [batch, layer, head]; neurons: [batch, layer, d_mlp]; metric: [batch] the
    model's real logit (difference) at that position; target/baseline: token ids [batch]."""

    components: list[str]
    values: torch.Tensor
    heads: torch.Tensor
    neurons: torch.Tensor
    metric: torch.Tensor
    target: torch.Tensor
    baseline: torch.Tensor | None
    positions: torch.Tensor
    title: str = "direct logit attribution"

    def total(self) -> torch.Tensor:
        """[batch] sum of all components: equals `metric` (frozen LN scales)."""
        return self.values.sum(-1)

    def head_grid(self) -> torch.Tensor:
        """[layer, head] mean over prompts of each head's direct contribution."""
        return self.heads.mean(0)

    def component(self, name: str) -> torch.Tensor:
        """[batch] values of one named component."""
        return self.values[:, self.components.index(name)]

    def top_neurons(self, k: int = 10) -> pd.DataFrame:
        """The k neurons with the largest mean |contribution|: layer, neuron, mean value."""
        mean = self.neurons.mean(0)
        flat = mean.abs().flatten().topk(min(k, mean.numel())).indices
        d_mlp = mean.shape[1]
        return pd.DataFrame([dict(layer=int(i) // d_mlp, neuron=int(i) % d_mlp,
                                  value=float(mean.flatten()[i])) for i in flat])

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt x component: prompt, component, layer, head, value."""
        rows = []
        for b in range(self.values.shape[0]):
            for c, name in enumerate(self.components):
                layer, head = _layer_head(name)
                rows.append(dict(prompt=b, component=name, layer=layer, head=head,
                                 value=float(self.values[b, c])))
        return pd.DataFrame(rows)

    def figures(self) -> list[go.Figure]:
        return [head_grid(self.head_grid(), title="direct logit attribution per head (mean over prompts)",
                          colorbar="logit")]

    def summary(self) -> dict:
        err = (self.total() - self.metric).abs().max()
        return {"components": len(self.components), "metric_mean": round(float(self.metric.mean()), 4),
                "max_sum_error": float(err)}


def _layer_head(name: str) -> tuple[int | None, int | None]:
    if not name.startswith("L"):
        return None, None
    head = name.split(".")[0]
    if "H" in head:
        layer, h = head[1:].split("H")
        return int(layer), int(h)
    return int(head[1:]), None


def _frozen_ln_pullback(ln: torch.nn.LayerNorm, x: torch.Tensor, g: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pull a direction g [batch, d] back through LN frozen at inputs x [batch, d].

    Returns (A^T g, beta . g) where A = diag(gamma) C / sigma; the second is None without bias."""
    sigma = (x.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    gamma_g = g * ln.weight.float() if ln.weight is not None else g
    pulled = (gamma_g - gamma_g.mean(-1, keepdim=True)) / sigma
    bias = (g * ln.bias.float()).sum(-1) if ln.bias is not None else None
    return pulled, bias


def _needed_hooks(n_layers: int) -> list[str]:
    names = [act_name("hook_pos_embed"), act_name("resid_pre", 0), act_name("resid_post", n_layers - 1)]
    for l in range(n_layers):
        names += [act_name(site, l) for site in ("resid_pre", "attn_out", "z", "resid_mid", "mlp_post", "mlp_out")]
    return list(dict.fromkeys(names))


@torch.no_grad()
def direct_logit_attribution(scope, prompts: TextsOrIds, target: Tokens, *, baseline: Tokens | None = None,
                             position: int | str = "last",
                             attention_mask: torch.Tensor | None = None) -> AttributionResult:
    """Decompose logit[target] (minus logit[baseline] if given) at one position per prompt.

    prompts: texts or ids [batch, pos]; target/baseline: token id or one-token string, or one per
    prompt; position: "last" (each prompt's last real token) or an int (see
    `inputs.select_position`). Returns `AttributionResult` (components sum to `.metric`)."""
    ids, mask = token_batch(scope, prompts, attention_mask)
    batch = ids.shape[0]
    tgt = token_ids(scope, target, batch)
    base = token_ids(scope, baseline, batch) if baseline is not None else None
    cfg = scope.model.config
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    logits, cache = scope.run_with_cache(ids, names=_needed_hooks(n_layers), attention_mask=mask)
    pos = select_position(mask, position)
    rows = torch.arange(batch)

    def at(name: str) -> torch.Tensor:  # [batch, ...] at the chosen position, float32
        act = cache[name]
        return act[rows.to(act.device), pos.to(act.device)].float()

    model = scope.model
    dec, pre_ln = decoder(model), is_pre_ln(model)
    unembed_w = model.lm_head.weight.float()
    g = unembed_w[tgt.to(unembed_w.device)]
    if base is not None:
        g = g - unembed_w[base.to(unembed_w.device)]
    if dec.project_out is not None:
        g = g @ dec.project_out.weight.float()  # pull back through x -> W x
    metric = logits.float()[rows.to(logits.device), pos.to(logits.device)]
    metric = (metric.gather(-1, tgt[:, None].to(metric.device))
              - (metric.gather(-1, base[:, None].to(metric.device)) if base is not None else 0)).squeeze(-1)

    terms: dict[str, torch.Tensor] = {}
    heads = torch.zeros(batch, n_layers, n_heads)
    neurons = torch.zeros(batch, n_layers, cfg.ffn_dim)
    g = g.to(at(act_name("resid_pre", 0)).device)
    if pre_ln and final_norm(model) is not None:
        g, beta = _frozen_ln_pullback(final_norm(model), at(act_name("resid_post", n_layers - 1)), g)
        if beta is not None:
            terms["ln_final.bias"] = beta
    for l in reversed(range(n_layers)):
        layer = dec.layers[l]
        g = g.to(layer.fc2.weight.device)
        if not pre_ln:
            x2 = at(act_name("hook_resid_mid", l)) + at(act_name("hook_mlp_out", l))
            g, beta = _frozen_ln_pullback(layer.final_layer_norm, x2, g)
            if beta is not None:
                terms[f"L{l}.ln_mlp.bias"] = beta
        neurons[:, l] = (at(act_name("mlp.hook_post", l)) * (g @ layer.fc2.weight.float())).cpu()
        terms[f"L{l}.mlp"] = neurons[:, l].sum(-1)
        if layer.fc2.bias is not None:
            terms[f"L{l}.mlp_bias"] = (g @ layer.fc2.bias.float()).cpu()
        if not pre_ln:
            x1 = at(act_name("hook_resid_pre", l)) + at(act_name("hook_attn_out", l))
            g, beta = _frozen_ln_pullback(layer.self_attn_layer_norm, x1, g)
            if beta is not None:
                terms[f"L{l}.ln_attn.bias"] = beta
        out_proj = layer.self_attn.out_proj
        w_o = rearrange(out_proj.weight.float(), "d (h e) -> h e d", h=n_heads)
        heads[:, l] = einsum(at(act_name("attn.hook_z", l)), w_o, g, "b h e, h e d, b d -> b h").cpu()
        for h in range(n_heads):
            terms[head_label(l, h)] = heads[:, l, h]
        if out_proj.bias is not None:
            terms[f"L{l}.attn_bias"] = (g @ out_proj.bias.float()).cpu()
    pos_embed = at(act_name("hook_pos_embed"))
    terms["pos_embed"] = (pos_embed * g).sum(-1)
    terms["embed"] = ((at(act_name("resid_pre", 0)) - pos_embed) * g).sum(-1)

    order = ["embed", "pos_embed"]
    for l in range(n_layers):
        order += [head_label(l, h) for h in range(n_heads)]
        order += [f"L{l}.attn_bias", f"L{l}.ln_attn.bias", f"L{l}.mlp", f"L{l}.mlp_bias", f"L{l}.ln_mlp.bias"]
    order.append("ln_final.bias")
    names = [n for n in order if n in terms]
    values = torch.stack([terms[n].float().cpu() for n in names], -1)
    return AttributionResult(components=names, values=values, heads=heads, neurons=neurons,
                             metric=metric.cpu(), target=tgt, baseline=base, positions=pos)
