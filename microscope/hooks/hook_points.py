"""Hook points on Hugging Face's OPT modules, under TransformerLens names, without rewriting the model.

Every hook point is one place where a tensor flows through `OPTForCausalLM`. A point is reached
with an ordinary PyTorch forward hook or forward pre-hook on the HF module there, registered only
while some function is attached to the point (an unhooked model runs exactly as HF wrote it).

A hook function is `fn(activation, hook) -> replacement | None`. It sees the activation in the
TransformerLens shape (`[batch, pos, d_model]`, `[batch, pos, head, d_head]`, `[batch, head, q, k]`,
`[batch, pos, d_mlp]`); `hook.name` and `hook.layer` say where it is. Returning a tensor of the
same shape replaces the value *in the model's own computation*; returning None keeps it.

Where each name sits (see docs/hooks.md for the post-LN and projection layouts):

    hook_embed                 token embedding in the residual width: project_in output if the
                               model has project_in, else embed_tokens output
    hook_pos_embed             embed_positions output
    blocks.{l}.hook_resid_pre  input of decoder layer l
    blocks.{l}.attn.hook_q|k|v q_proj / k_proj / v_proj output (q before OPT's 1/sqrt(d_head) scale)
    blocks.{l}.attn.hook_pattern  softmax(q k^T) inside the attention function (eager path, layer l only)
    blocks.{l}.attn.hook_z     out_proj input (attention-weighted values, heads concatenated)
    blocks.{l}.hook_attn_out   out_proj output (self_attn output)
    blocks.{l}.hook_resid_mid  pre-LN: resid_pre + attn_out, the input of final_layer_norm, which is
                               also the MLP's skip residual (written in place so both paths see it);
                               post-LN: self_attn_layer_norm output
    blocks.{l}.mlp.hook_pre    fc1 output;  mlp.hook_post: activation output (fc2 input)
    blocks.{l}.hook_mlp_out    fc2 output
    blocks.{l}.hook_resid_post output of decoder layer l (post-LN: after its final_layer_norm)
    ln_final.hook_normalized   decoder.final_layer_norm output (absent where there is no final LN)
    hook_logits                lm_head output
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import AttentionInterface, OPTForCausalLM

from microscope import names
from microscope.errors import HookError, UnknownHookError
from microscope.models import anatomy

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]
HookFns = Mapping[str, HookFn | Sequence[HookFn]]       # {name or glob pattern: fn or [fns]} to attach

# "output": forward hook, the module's output (or output[0] for a tuple);
# "input": forward pre-hook, the module's first input;
# "input_inplace": forward pre-hook whose input tensor is shared with a path that bypasses the
#   module (OPT's pre-LN MLP residual), so writes go into that tensor in place;
# "pattern": inside the attention function (see `pattern_attention_forward`).
Kind = Literal["output", "input", "input_inplace", "pattern"]

PATTERN_ATTENTION = "microscope_pattern"


@dataclass(eq=False)
class HookPoint:
    """One named place in the model. `fns` run in the order they were added."""

    name: str
    layer: int | None
    module: nn.Module
    kind: Kind
    heads: int | None = None          # split the last axis into [head, d_head]
    fns: list[HookFn] = field(default_factory=list, repr=False)
    _handle: Any = field(default=None, repr=False)

    @property
    def pos_dim(self) -> int:
        """The token (query) axis of this point's activation."""
        return 2 if self.kind == "pattern" else 1

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r})"


class HookHandle:
    """Detaches one function from one hook point; `remove()` is idempotent."""

    def __init__(self, engine: "OPTHookPoints", point: HookPoint, fn: HookFn):
        self._engine, self._point, self._fn = engine, point, fn

    def remove(self) -> None:
        if self._point is not None:
            self._engine._detach(self._point, self._fn)
            self._point = None


# The pattern hook point of each attention module whose layer is being hooked there.
_PATTERN_POINTS: "weakref.WeakKeyDictionary[nn.Module, tuple[OPTHookPoints, HookPoint]]" = (
    weakref.WeakKeyDictionary())


def pattern_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: torch.Tensor | None,
                              scaling: float, dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention that exposes `hook_pattern` [batch, head, q, k], for the hooked layers only.

    The model builds its mask for its own (sdpa) implementation: None (plain causal), a boolean
    mask (True = attend) or an additive float mask; all three are handled here.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is None:
        q_len, k_len = scores.shape[-2:]
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    engine, point = _PATTERN_POINTS[module]
    pattern = engine._run(point, pattern)
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, pattern


AttentionInterface.register(PATTERN_ATTENTION, pattern_attention_forward)


def _build_points(model: OPTForCausalLM) -> dict[str, HookPoint]:
    """Every hook point of `model`, in the order the forward pass reaches them."""
    decoder = anatomy.decoder(model)
    pre_ln = anatomy.is_pre_ln(model)
    n_heads = model.config.num_attention_heads
    points = [
        HookPoint(names.act_name("hook_embed"), None, decoder.project_in or decoder.embed_tokens, "output"),
        HookPoint(names.act_name("hook_pos_embed"), None, decoder.embed_positions, "output"),
    ]
    for l, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        places = {  # site -> (module, kind, heads)
            "hook_resid_pre": (layer, "input", None),
            "attn.hook_q": (attn.q_proj, "output", n_heads),
            "attn.hook_k": (attn.k_proj, "output", n_heads),
            "attn.hook_v": (attn.v_proj, "output", n_heads),
            "attn.hook_pattern": (attn, "pattern", None),
            "attn.hook_z": (attn.out_proj, "input", n_heads),
            "hook_attn_out": (attn, "output", None),
            "hook_resid_mid": ((layer.final_layer_norm, "input_inplace", None) if pre_ln
                               else (layer.self_attn_layer_norm, "output", None)),
            "mlp.hook_pre": (layer.fc1, "output", None),
            "mlp.hook_post": (layer.fc2, "input", None),
            "hook_mlp_out": (layer.fc2, "output", None),
            "hook_resid_post": (layer, "output", None),
        }
        points += [HookPoint(names.act_name(site, l), l, *places[site]) for site in names.LAYER_SITES]
    if anatomy.final_norm(model) is not None:
        points.append(HookPoint(names.FINAL_NORM, None, anatomy.final_norm(model), "output"))
    points.append(HookPoint(names.LOGITS, None, model.lm_head, "output"))
    return {p.name: p for p in points}


class OPTHookPoints:
    """The hook points of one HF `OPTForCausalLM` and the functions attached to them."""

    def __init__(self, model: OPTForCausalLM):
        self.model = model
        self.points = _build_points(model)
        self.post_ln = not anatomy.is_pre_ln(model)
        self._batch_shape: tuple[int, int] | None = None   # (batch, pos) of the running forward
        self._shape_handle = None
        self._n_attached = 0

    @property
    def names(self) -> list[str]:
        return list(self.points)

    # --- names -------------------------------------------------------------------------------

    def resolve(self, patterns: str | Iterable[str] | None) -> list[str]:
        """Hook names matching exact names or glob patterns, in forward order, without duplicates.

        None means every hook point. An entry matching nothing raises `UnknownHookError`.
        """
        return names.resolve(patterns, self.names, where="this model", hint=self._hint(patterns))

    def _hint(self, patterns: str | Iterable[str] | None) -> str:
        """Why a post-LN model has no ln_final hook, when one is asked for."""
        asked = names.split_patterns(patterns) or []
        if self.post_ln and any(p.startswith("ln_final") for p in asked):
            return ("this is a post-LayerNorm OPT like opt-350m: it has no final LayerNorm; the last "
                    "blocks.{L-1}.hook_resid_post is already normalised and goes to project_out")
        return ""

    # --- attaching functions ---------------------------------------------------------------

    def add(self, name: str, fn: HookFn) -> HookHandle:
        """Attach `fn` to the hook point `name` (an exact name); returns a handle to remove it."""
        if name not in self.points:
            raise UnknownHookError(names.unknown_message(name, self.names, hint=self._hint(name)))
        point = self.points[name]
        if not point.fns:
            self._activate(point)
        point.fns.append(fn)
        if self._n_attached == 0:
            self._shape_handle = anatomy.decoder(self.model).register_forward_pre_hook(
                self._record_shape, with_kwargs=True)
        self._n_attached += 1
        return HookHandle(self, point, fn)

    @contextmanager
    def attach(self, hooks: HookFns | None) -> Iterator[None]:
        """Attach `{name_or_pattern: fn or [fns]}` for the block; always detached on exit, latest first."""
        handles = []
        try:
            for pattern, fns in (hooks or {}).items():
                fns = [fns] if callable(fns) else list(fns)
                for name in self.resolve(pattern):
                    handles += [self.add(name, fn) for fn in fns]
            yield
        finally:
            for handle in reversed(handles):
                handle.remove()

    def _detach(self, point: HookPoint, fn: HookFn) -> None:
        point.fns.remove(fn)
        if not point.fns:
            self._deactivate(point)
        self._n_attached -= 1
        if self._n_attached == 0:
            self._shape_handle.remove()
            self._shape_handle = None

    def remove_all(self) -> None:
        """Detach every function from every point (a reset after an interrupted session)."""
        for point in self.points.values():
            for fn in list(point.fns):
                self._detach(point, fn)

    def _record_shape(self, module, args, kwargs) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else args[0]
        self._batch_shape = (x.shape[0], x.shape[1])

    def _activate(self, point: HookPoint) -> None:
        module = point.module
        if point.kind == "pattern":
            # This layer alone gets a config naming the eager pattern function; the decoder's mask
            # and every other layer keep the model's own implementation (sdpa).
            point._handle = module.config
            module.config = copy.copy(module.config)
            module.config._attn_implementation = PATTERN_ATTENTION
            _PATTERN_POINTS[module] = (self, point)
        elif point.kind == "output":
            point._handle = module.register_forward_hook(lambda m, a, out: self._on_output(point, out))
        else:
            point._handle = module.register_forward_pre_hook(
                lambda m, a, kw: self._on_input(point, a, kw), with_kwargs=True)

    def _deactivate(self, point: HookPoint) -> None:
        if point.kind == "pattern":
            point.module.config = point._handle
            del _PATTERN_POINTS[point.module]
        else:
            point._handle.remove()
        point._handle = None

    # --- running functions -------------------------------------------------------------------

    def _on_output(self, point: HookPoint, out):
        if isinstance(out, tuple):
            new = self._run(point, out[0])
            return out if new is out[0] else (new, *out[1:])
        new = self._run(point, out)
        return None if new is out else new

    def _on_input(self, point: HookPoint, args: tuple, kwargs: dict):
        x = args[0] if args else kwargs["hidden_states"]
        new = self._run(point, x)
        if new is x:
            return None
        if point.kind == "input_inplace":
            x.copy_(new)
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    def _run(self, point: HookPoint, x: torch.Tensor) -> torch.Tensor:
        """Show `x` to the point's functions in TransformerLens shape; return the model tensor to use."""
        view = self._view(point, x)
        value = view
        for fn in list(point.fns):
            out = fn(value, point)
            if out is None:
                continue
            if not isinstance(out, torch.Tensor) or out.shape != value.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise HookError(f"hook function {getattr(fn, '__name__', fn)!r} at {point.name} returned "
                                f"{got}; return None or a tensor of shape {tuple(value.shape)}")
            value = out
        if value is view:
            return x
        return value.reshape(x.shape).to(x.dtype)

    def _view(self, point: HookPoint, x: torch.Tensor) -> torch.Tensor:
        """HF's MLP runs on a flattened [batch*pos, width] view; heads live in the last axis."""
        if x.dim() == 2:
            x = x.view(*self._batch_shape, x.shape[-1])
        if point.heads:
            x = x.view(*x.shape[:-1], point.heads, x.shape[-1] // point.heads)
        return x
