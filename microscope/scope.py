"""`Scope`: an HF OPT model and its tokenizer, with hook points, capture and generation.

    scope = Scope(model, tokenizer, source="facebook/opt-125m")     # usually from microscope.load
    logits, cache = scope.run_with_cache(["The cat"], names=["blocks.*.hook_resid_post"])
    with scope.hooks({"blocks.2.attn.hook_z": fn}):                # fn(activation, hook) -> new | None
        logits = scope.run(["The cat"])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch

from microscope.errors import PromptError
from microscope.hooks.cache import ActivationCache
from microscope.hooks.generation import GenerationResult, generate
from microscope.hooks.hook_points import HookFns, HookPoint, OPTHookPoints
from microscope.hooks.inputs import Prompts, prepare_inputs, tokenize
from microscope.models import anatomy
from microscope.models.loading import load_model

CachePositions = None | Literal["all", "last"] | torch.Tensor   # the tokens run_with_cache keeps


class Scope:
    """A hooked view of one HF `OPTForCausalLM` (`.model`) and its tokenizer (`.tokenizer`).

    The model is used as it is: no weights are copied or folded, and hooks are attached only for
    the duration of a call or a `hooks()` block.
    """

    def __init__(self, model, tokenizer=None, source: str = "model"):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.info = None                    # set by microscope.load (LoadInfo)
        self.hook_points = OPTHookPoints(model)

    @property
    def config(self):
        return self.model.config

    @property
    def hook_names(self) -> list[str]:
        """Every hook point name of this model, in forward order."""
        return self.hook_points.names

    def resolve_names(self, patterns: str | Sequence[str] | None) -> list[str]:
        """Exact names or glob patterns -> hook names (None = all); unknown ones raise UnknownHookError."""
        return self.hook_points.resolve(patterns)

    def __repr__(self) -> str:
        c = self.config
        return (f"Scope({self.source!r}: {c.num_hidden_layers} layers, {c.num_attention_heads} heads, "
                f"d_model={c.hidden_size}, {anatomy.layout(self.model)}, {len(self.hook_names)} hook points)")

    # --- inputs ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where input ids go: the device of the token embedding."""
        return self.model.get_input_embeddings().weight.device

    def tokenize(self, prompts: str | Sequence[str], max_length: int | None = None,
                 truncation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (input_ids [B, T], attention_mask [B, T]), right-padded, with the tokenizer's BOS.

        A prompt longer than `max_length` (default: the model's context) is an error unless
        `truncation=True`, which keeps its first `max_length` tokens.
        """
        return tokenize(self.tokenizer, self.config, prompts, max_length, truncation, source=self.source)

    def _inputs(self, prompts: Prompts, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts or ids -> (input_ids, attention_mask) on the model's input device (`hooks.inputs`)."""
        return prepare_inputs(prompts, attention_mask, tokenizer=self.tokenizer, config=self.config,
                              device=self.device, source=self.source)

    # --- hooks -------------------------------------------------------------------------------

    @contextmanager
    def hooks(self, hooks: HookFns | None) -> Iterator["Scope"]:
        """Attach `{name_or_pattern: fn or [fns]}` for the block; always detached on exit.

        `fn(activation, hook) -> replacement | None`: a returned tensor replaces the activation in
        the model's computation. Functions run in the order given; functions already attached
        (an outer block) run first.
        """
        with self.hook_points.attach(hooks):
            yield self

    def run(self, prompts: Prompts, attention_mask: torch.Tensor | None = None,
            hooks: HookFns | None = None, *, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits [B, T, vocab] with `hooks` applied (gradients flow if enabled by the caller);
        ``logits_to_keep`` k > 0: only the last k positions' [B, k, vocab] (on a 50k vocabulary the
        unembedding of every position is most of a small model's forward)."""
        input_ids, attention_mask = self._inputs(prompts, attention_mask)
        with self.hooks(hooks):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                              logits_to_keep=logits_to_keep).logits

    def run_with_cache(self, prompts: Prompts, names: str | Sequence[str] | None = None,
                       positions: CachePositions = None, attention_mask: torch.Tensor | None = None,
                       cache_device: str | torch.device | None = None,
                       cache_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ActivationCache]:
        """Run the model once (no gradients) and keep the activations of `names` (None = all).

        prompts: text(s), or token ids [B, T] (with `attention_mask`, 1 = real token) or lists of ids.
        positions: None/"all" keeps [B, T, ...] with padded positions zeroed; "last" keeps each
        prompt's last real token, a bool mask [B, T] the tokens it marks: then tensors are [N, ...]
        and `cache.rows` gives (batch, pos) of each row. Returns raw logits [B, T, vocab] (padded
        positions not zeroed) and the `ActivationCache`. Hooks already attached stay active, and
        the cache sees their edits.
        """
        input_ids, attention_mask = self._inputs(prompts, attention_mask)
        names = self.resolve_names(names)
        rows = _select_rows(positions, attention_mask)
        keep_padding_zeroed = rows is None and not bool(attention_mask.all())
        acts: dict[str, torch.Tensor] = {}

        def capture(x: torch.Tensor, hook: HookPoint) -> None:
            x = x.detach()
            if rows is not None:
                x = x[rows[:, 0], rows[:, 1]] if hook.pos_dim == 1 else x[rows[:, 0], :, rows[:, 1]]
            elif keep_padding_zeroed:
                shape = [1] * x.dim()
                shape[0], shape[hook.pos_dim] = attention_mask.shape
                x = x.masked_fill(~attention_mask.bool().view(shape), 0)
            acts[hook.name] = x.to(device=cache_device, dtype=cache_dtype)

        with torch.no_grad(), self.hooks({name: capture for name in names}):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        acts = {name: acts[name] for name in names if name in acts}   # forward order
        cache = ActivationCache(acts, input_ids=input_ids, attention_mask=attention_mask, rows=rows,
                                model=self.model)
        return logits, cache

    def generate(self, prompts: Prompts, max_new_tokens: int = 32, hooks: HookFns | None = None,
                 capture: str | Sequence[str] | None = None, **generate_kwargs: Any) -> GenerationResult:
        """Generate with the KV cache, `hooks` applied at every step, `capture` hooks recorded.

        See `microscope.hooks.generation.generate`; returns a `GenerationResult`.
        """
        input_ids, attention_mask = self._inputs(prompts, generate_kwargs.pop("attention_mask", None))
        return generate(self.model, self.hook_points, input_ids, attention_mask, tokenizer=self.tokenizer,
                        max_new_tokens=max_new_tokens, hooks=hooks, capture=capture, **generate_kwargs)


def _select_rows(positions: CachePositions, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """positions -> [N, 2] (batch, pos) of the tokens to keep, or None for every position."""
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return None
    if isinstance(positions, str) and positions == "last":
        arange = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.bool() * arange).argmax(dim=1)
        return torch.stack([torch.arange(len(last), device=last.device), last], dim=1)
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.shape != attention_mask.shape:
            raise PromptError(f"positions mask {tuple(positions.shape)} does not match the batch "
                              f"{tuple(attention_mask.shape)}")
        return (positions.to(attention_mask.device) & attention_mask.bool()).nonzero()
    raise PromptError(f"positions must be None, 'all', 'last' or a bool mask [batch, pos]; got {positions!r}")


def load(source, **options) -> Scope:
    """`microscope.load`: a `Scope` over the model and tokenizer `models.loading.load_model` finds
    for `source` ("organism", a hub id in the local cache, a folder, "random:opt-125m" or an
    `OPTForCausalLM`). options: device, dtype, device_map, max_memory, offload_folder, tokenizer.
    ``scope.info`` is the `LoadInfo` (source, kind, dtype, weights_hash, ...)."""
    model, tokenizer, info = load_model(source, **options)
    scope = Scope(model, tokenizer, source=info["source"])
    scope.info = info
    return scope
