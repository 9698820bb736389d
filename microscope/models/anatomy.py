"""Model anatomy: where the parts of an HF `OPTForCausalLM` are, in one place.

Every module that reaches into the model's modules (hook points, lenses, attribution, head
scores) asks here instead of spelling ``model.model.decoder...`` itself, in the way tuned-lens
keeps its ``model_surgery.py``.

The two OPT layouts differ in the final path (what the model does after its last block):

- pre-LN (every size but 350m): ``final_layer_norm`` -> ``project_out`` (only where
  ``word_embed_proj_dim != hidden_size``) -> ``lm_head``.
- post-LN (350m, ``do_layer_norm_before=False``): no final norm (every block already ends in its
  own ``final_layer_norm``), so the final path is ``project_out`` -> ``lm_head``.

    dec = decoder(model)                 # OPTDecoder: .layers, .embed_tokens, .project_in, ...
    logits = unembed(model, resid)       # [..., d_model] -> [..., vocab], float32
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

# The id OPT's tokenizer pads with, used where a config leaves pad_token_id unset.
OPT_PAD_ID = 1


def decoder(model: nn.Module) -> nn.Module:
    """The HF `OPTDecoder` of an `OPTForCausalLM` (layers, norms, projections, embeddings)."""
    return model.model.decoder


def layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order."""
    return decoder(model).layers


def is_pre_ln(model: nn.Module) -> bool:
    """True for the usual OPT layout; False for post-LN (350m)."""
    return bool(model.config.do_layer_norm_before)


def layout(model: nn.Module) -> Literal["pre-LN", "post-LN"]:
    """The layout's name, as shown in reprs and cards."""
    return "pre-LN" if is_pre_ln(model) else "post-LN"


def final_norm(model: nn.Module) -> nn.LayerNorm | None:
    """The decoder's final LayerNorm, or None where the model has none (post-LN 350m)."""
    return decoder(model).final_layer_norm


def pad_id(config: Any) -> int:
    """The pad token id of an `OPTConfig`, OPT's own (1) where the config leaves it unset."""
    return config.pad_token_id if config.pad_token_id is not None else OPT_PAD_ID


def unembed(model: nn.Module, resid: torch.Tensor) -> torch.Tensor:
    """Logits [..., vocab] of residual vectors [..., d_model] through the final path, in float32.

    The final LayerNorm (pre-LN) is applied with fresh statistics of `resid` (the logit lens);
    at the last block's ``hook_resid_post`` this is the model's own logits."""
    x = resid.float().to(model.lm_head.weight.device)
    ln = final_norm(model)
    if ln is not None:
        x = nn.functional.layer_norm(x, ln.normalized_shape, _f32(ln.weight), _f32(ln.bias), ln.eps)
    project_out = decoder(model).project_out
    if project_out is not None:
        x = x @ project_out.weight.float().T
    return x @ model.lm_head.weight.float().T


def unembed_direction(model: nn.Module, direction: torch.Tensor) -> torch.Tensor:
    """Scores [vocab] of a residual-space direction [d_model] through the final path's linear part.

    In pre-LN the final LayerNorm's centring and gain apply (no 1/sigma: a direction has no scale
    of its own), then project_out and the unembedding."""
    v = direction.float().reshape(-1).to(model.lm_head.weight.device)
    ln = final_norm(model)
    if ln is not None:
        v = (v - v.mean()) * (_f32(ln.weight) if ln.weight is not None else 1)
    project_out = decoder(model).project_out
    if project_out is not None:
        v = project_out.weight.float() @ v
    return model.lm_head.weight.float() @ v


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()
