"""`ActivationCache`: the activations one `run_with_cache` call kept, by hook name."""

from __future__ import annotations

import html
from collections.abc import Iterable, Iterator, Mapping

import torch
from einops import einsum, rearrange

from microscope import names
from microscope.errors import HookError, UnknownHookError
from microscope.models import anatomy


class ActivationCache(Mapping[str, torch.Tensor]):
    """A read-only mapping hook name -> tensor, plus what is needed to read it.

    With `positions="all"` each tensor keeps the batch and token axes (`[batch, pos, ...]`,
    patterns `[batch, head, q, k]`) and padded positions are zeros. With `positions="last"` or
    a boolean mask the token (query) axis is replaced by a row axis: `rows` ([N, 2] of
    (batch index, position)) says which token each row is, and tensors are `[N, ...]`
    (patterns `[N, head, k]`).

    Attributes: `attention_mask` [batch, pos] (1 = real token), `mask` (the same as bool),
    `input_ids` [batch, pos], `rows` (None when every position is kept), `model` (the HF model,
    for per-head helpers).
    """

    def __init__(self, activations: dict[str, torch.Tensor], *, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, rows: torch.Tensor | None = None, model=None):
        self._acts = activations
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.mask = attention_mask.bool()
        self.rows = rows
        self.model = model

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._acts[name]
        except KeyError:
            raise UnknownHookError(names.unknown_message(name, list(self._acts), where="this cache",
                                                         hint="pass it in names= to run_with_cache")) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def select(self, patterns: str | Iterable[str]) -> list[str]:
        """The cached hook names matching glob patterns, in forward order; `UnknownHookError` (a
        KeyError) with the closest names when a pattern matches nothing."""
        return names.resolve(patterns, list(self._acts), where="this cache")

    def stack(self, pattern: str) -> torch.Tensor:
        """The tensors of every cached hook matching `pattern` stacked on a new leading axis.

        E.g. `cache.stack("blocks.*.hook_resid_post")` -> [n_layers, batch, pos, d_model].
        """
        return torch.stack([self._acts[n] for n in self.select(pattern)])

    def head_results(self, layer: int) -> torch.Tensor:
        """Each head's write into the residual stream at `layer`: [..., head, d_model].

        Computed from `blocks.{layer}.attn.hook_z` and out_proj's weight; the sum over heads plus
        out_proj's bias is `blocks.{layer}.hook_attn_out`.
        """
        if self.model is None:
            raise HookError("this cache has no model attached; per-head results need out_proj's weight: "
                            "use scope.run_with_cache, or pass model= to ActivationCache")
        z = self[names.act_name("z", layer)]
        out_proj = anatomy.layers(self.model)[layer].self_attn.out_proj
        w = rearrange(out_proj.weight, "d (h e) -> h e d", h=z.shape[-2]).to(z.device, z.dtype)
        return einsum(z, w, "... h e, h e d -> ... h d")

    def to(self, device=None, dtype=None) -> "ActivationCache":
        """A copy with every floating tensor moved/cast."""
        acts = {n: t.to(device=device, dtype=dtype if t.is_floating_point() else None)
                for n, t in self._acts.items()}
        return ActivationCache(acts, input_ids=self.input_ids, attention_mask=self.attention_mask,
                               rows=self.rows, model=self.model)

    def _summary(self) -> list[tuple[str, str, str]]:
        return [(n, "x".join(map(str, t.shape)), str(t.dtype).removeprefix("torch."))
                for n, t in self._acts.items()]

    def __repr__(self) -> str:
        batch, pos = self.attention_mask.shape
        rows = "all positions" if self.rows is None else f"{len(self.rows)} selected rows"
        mb = sum(t.numel() * t.element_size() for t in self._acts.values()) / 2**20
        head = f"ActivationCache({len(self)} hooks, batch={batch}, pos={pos}, {rows}, {mb:.1f} MiB)"
        lines = [f"  {n}: [{s}] {d}" for n, s, d in self._summary()]
        if len(lines) > 12:
            lines = lines[:6] + [f"  ... {len(lines) - 12} more ..."] + lines[-6:]
        return "\n".join([head, *lines])

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td><code>{html.escape(n)}</code></td><td>[{s}]</td><td>{d}</td></tr>"
                       for n, s, d in self._summary())
        title = html.escape(repr(self).splitlines()[0])
        return (f"<details open><summary><b>{title}</b></summary><table><thead><tr><th>hook</th>"
                f"<th>shape</th><th>dtype</th></tr></thead><tbody>{rows}</tbody></table></details>")
