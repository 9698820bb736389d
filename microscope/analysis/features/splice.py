"""Splicing a dictionary into the model: `scope.hooks(...)` functions that replace a hook's
activation with the dictionary's reconstruction, or edit chosen latents.

    with scope.hooks(splice_hooks(d)): scope.run(prompts)                       # reconstruction
    with scope.hooks(splice_hooks(d, ablate=[390], keep_error=True)): ...      # x - a_390 * W_dec[390]
    with scope.hooks(splice_hooks(d, clamp={390: 5.0}, keep_error=True)): ...  # x + (5 - a_390) W_dec[390]

For an SAE one function sits on `d.hook`; for a transcoder one captures `d.hook` (the MLP's input)
and one replaces `d.target` (its output). `keep_error=True` adds the dictionary's error
(activation minus reconstruction) back, so that only the edit changes the model; with no edit it
leaves the activation unchanged. Latent edits act after the TopK selection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from microscope.analysis.features.coder import Dictionary


def edited_latents(d: Dictionary, x: torch.Tensor, ablate: Iterable[int] = (),
                   clamp: Mapping[int, float] | None = None) -> torch.Tensor:
    """Dense latents [..., n_latents] of inputs `x` with `ablate` set to 0 and `clamp` to its values."""
    latents = d.encode_dense(x)
    ablate = list(ablate)
    if ablate:
        latents[..., ablate] = 0.0
    for latent, value in (clamp or {}).items():
        latents[..., latent] = value
    return latents


def splice_hooks(d: Dictionary, *, ablate: Iterable[int] = (), clamp: Mapping[int, float] | None = None,
                 keep_error: bool = False) -> dict[str, Callable]:
    """{hook name: fn} for `scope.hooks`: the activation at `d.target` becomes the decoded
    (edited) latents of the activation at `d.hook`, plus the dictionary's error when `keep_error`."""
    ablate = list(ablate)
    seen: dict[str, torch.Tensor] = {}

    def replace(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        edited = d.decode_dense(edited_latents(d, source, ablate, clamp))
        if keep_error:  # activation + (edited - unedited reconstruction): exact when nothing is edited
            edited = target.to(edited.dtype) + (edited - d.decode_dense(d.encode_dense(source)))
        return edited.to(target.dtype)

    if d.target == d.hook:
        return {d.hook: lambda x, hook: replace(x, x)}

    def capture(x: torch.Tensor, hook) -> None:
        seen["input"] = x

    return {d.hook: capture, d.target: lambda x, hook: replace(x, seen.pop("input"))}
