"""The local replacement model of one prompt: every MLP replaced by its transcoder, attention
patterns and LayerNorm scales frozen from the model's own (clean) run, error terms added back.

    rm = ReplacementModel(scope, transcoders, "You are such a")
    rm.run()                           # logits [pos, vocab]: the model's own, to float error
    rm.run(ablate=[(2, 5, 390)])       # latent 390 of block 2 zeroed at position 5
    rm.activations[2, 5]               # block 2's latents at position 5 [n_latents]

What is frozen, for a prompt of T tokens (one prompt, no padding):

- **attention patterns** ``[layer, head, q, k]`` as the clean run computed them: a head's output
  is then the pattern times its values, linear in the stream it reads;
- **LayerNorm scales**: each norm divides by the standard deviation its input had in the clean
  run at that position (``sqrt(var + eps)``), while centring and the affine map still act on the
  current input, so every norm is an affine map of its input. Pre-LN: the attention norm of each
  block and the final norm (the MLP's own norm sits inside its transcoder, which reads
  ``hook_resid_mid``). Post-LN (OPT-350m): both norms of every block sit *on the residual path*,
  ``h = LN1(x + attn)``, ``out = LN2(h + mlp)``, so freezing them fixes, per position, the factor
  by which everything already in the stream (the skip path included) is rescaled at each of them:
  a contribution written at block l reaches block m > l multiplied by ``g / sigma`` of every norm
  in between, the clean run's sigmas;
- **error terms** ``[layer, pos, d_model]``: each MLP's true output minus its transcoder's
  reconstruction in the clean run, added back as constants.

With nothing edited the replacement computes the model's clean forward pass: `run()` gives the
model's logits (tested against a plain HF forward in both layouts). Its transcoders recompute
their latents from the replacement's own stream (TopK and all), so an ablation's effect travels
through later transcoders; attention, norms and errors stay as in the clean run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from microscope.analysis.graphs.transcoders import Transcoders
from microscope.analysis.inputs import token_batch
from microscope.errors import AnalysisInputError
from microscope.models import anatomy
from microscope.names import act_name, layer_names

Node = tuple[int, int, int]          # (layer, position, latent) of one feature
MlpFn = Callable[[int, torch.Tensor], torch.Tensor]   # (layer, MLP input [B, T, d]) -> MLP output [B, T, d]


@dataclass(frozen=True)
class _Norm:
    """A LayerNorm with its clean-run scales [T] (None: no norm here)."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    sigma: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - x.mean(-1, keepdim=True)) / self.sigma[:, None]
        if self.weight is not None:
            x = x * self.weight
        return x + self.bias if self.bias is not None else x


def _sigma(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """The standard deviation [T] a LayerNorm divides its input [T, d] by."""
    return (x.float().var(-1, unbiased=False) + norm.eps).sqrt()


def _f32(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device=device, dtype=torch.float32)


class ReplacementModel:
    """The frozen replacement of `scope`'s model on one prompt (see the module docstring).

    prompt: a text (tokenized by the scope, BOS added) or token ids [T] / [1, T]."""

    def __init__(self, scope, transcoders: Transcoders, prompt: str | torch.Tensor):
        model = scope.model
        transcoders.check_fits(model)
        for d in transcoders.by_layer:                 # the coders run where the model does
            d.coder.to(model.lm_head.weight.device)
        ids, mask = token_batch(scope, [prompt] if isinstance(prompt, str) else prompt)
        if len(ids) != 1 or not bool(mask.all()):
            raise AnalysisInputError(f"an attribution graph is for one prompt without padding; got ids of shape "
                                     f"{tuple(ids.shape)}: pass one text or one row of ids")
        L = model.config.num_hidden_layers
        names = [*layer_names("resid_pre", L), *layer_names("attn_out", L), *layer_names("resid_mid", L),
                 *layer_names("mlp_out", L), *layer_names("pattern", L), act_name("resid_post", L - 1)]
        logits, cache = scope.run_with_cache(ids, names=names)
        self.scope, self.transcoders = scope, transcoders
        self.pre_ln = anatomy.is_pre_ln(model)
        self.device = model.lm_head.weight.device
        self.input_ids = ids[0]
        self.prompt = prompt if isinstance(prompt, str) else (
            scope.tokenizer.decode(self.input_ids, skip_special_tokens=True) if scope.tokenizer is not None else "")
        self.model_logits = logits[0].float()
        per_layer = lambda site: torch.stack([cache[act_name(site, l)][0].float() for l in range(L)])  # noqa: E731
        resid_pre, attn_out = per_layer("resid_pre"), per_layer("attn_out")
        self.inputs = resid_pre[0]                                 # [T, d]: token + position embedding
        self.patterns = torch.stack([cache[act_name("pattern", l)][0].float() for l in range(L)])  # [L, H, T, T]
        self.mlp_in, self.mlp_out = per_layer("resid_mid"), per_layer("mlp_out")       # [L, T, d]
        dev = self.device
        self._layers = []
        for l, layer in enumerate(anatomy.layers(model)):
            ln1, ln2 = layer.self_attn_layer_norm, layer.final_layer_norm
            attn = layer.self_attn
            sigma1 = _sigma(resid_pre[l] if self.pre_ln else resid_pre[l] + attn_out[l], ln1)
            self._layers.append({
                "attn_norm": _Norm(_f32(ln1.weight, dev), _f32(ln1.bias, dev), sigma1),
                "mlp_norm": None if self.pre_ln else _Norm(_f32(ln2.weight, dev), _f32(ln2.bias, dev),
                                                           _sigma(self.mlp_in[l] + self.mlp_out[l], ln2)),
                "v": (_f32(attn.v_proj.weight, dev), _f32(attn.v_proj.bias, dev)),
                "o": (_f32(attn.out_proj.weight, dev), _f32(attn.out_proj.bias, dev)),
            })
        final = anatomy.final_norm(model)
        last = cache[act_name("resid_post", L - 1)][0].float()
        self._final_norm = None if final is None else _Norm(_f32(final.weight, dev), _f32(final.bias, dev),
                                                            _sigma(last, final))
        project_out = anatomy.decoder(model).project_out
        self._project_out = None if project_out is None else _f32(project_out.weight, dev)
        self.unembedding = _f32(model.lm_head.weight, dev)                              # [vocab, d_out]
        self.n_heads = model.config.num_attention_heads
        self.activations = torch.stack([transcoders[l].encode_dense(self.mlp_in[l]) for l in range(L)])
        self.errors = self.mlp_out - torch.stack([transcoders[l].decode_dense(self.activations[l])
                                                  for l in range(L)])                 # [L, T, d]

    @property
    def n_layers(self) -> int:
        return len(self._layers)

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    def stream(self, inputs: torch.Tensor, mlp: MlpFn, upto: int | None = None
               ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The frozen forward pass from `inputs` [B, T, d] (what enters block 0), each block's MLP
        output given by ``mlp(layer, mlp_input)``. Returns (MLP inputs [B, T, d] of blocks 0..,
        the final path's output [B, T, d_out], what the unembedding reads); with `upto`, it stops
        once block `upto`'s MLP input is computed (the output is then None). Differentiable."""
        x = inputs
        reads = []
        for l, p in enumerate(self._layers):
            h = p["attn_norm"](x) if self.pre_ln else x
            B, T, d = h.shape
            v = nn.functional.linear(h, *p["v"]).view(B, T, self.n_heads, d // self.n_heads)
            z = torch.einsum("hqk,bkhd->bqhd", self.patterns[l], v).reshape(B, T, d)
            a = nn.functional.linear(z, *p["o"])
            x = x + a if self.pre_ln else p["attn_norm"](x + a)
            reads.append(x)
            if upto == l:
                return reads, None
            m = mlp(l, x)
            x = x + m if self.pre_ln else p["mlp_norm"](x + m)
        if self._final_norm is not None:
            x = self._final_norm(x)
        if self._project_out is not None:
            x = x @ self._project_out.T
        return reads, x

    @torch.no_grad()
    def run(self, ablate: Iterable[Node] = (), *, with_errors: bool = True) -> torch.Tensor:
        """Logits [T, vocab] of the replacement model, each transcoder's latents recomputed from the
        replacement's own stream and the `ablate` ones ((layer, position, latent)) set to zero;
        `with_errors=False` drops the error terms (the transcoders alone)."""
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for layer, pos, latent in ablate:
            by_layer.setdefault(int(layer), []).append((int(pos), int(latent)))

        def replaced(layer: int, h: torch.Tensor) -> torch.Tensor:
            d = self.transcoders[layer]
            latents = d.encode_dense(h)
            for pos, latent in by_layer.get(layer, []):
                latents[:, pos, latent] = 0.0
            out = d.decode_dense(latents).to(h.device)
            return out + self.errors[layer] if with_errors else out

        _, out = self.stream(self.inputs[None], replaced)
        return out[0] @ self.unembedding.T
