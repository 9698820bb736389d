"""Interventions as hook dictionaries for `scope.hooks(...)`, `scope.run(hooks=...)`, `scope.generate(hooks=...)`.

    with scope.hooks(ablate_heads({3: [0, 5]})): ...                 # zero heads 0 and 5 of layer 3
    with scope.hooks(ablate_neurons({2: [17]}, mean_from=cache)): ...  # mean-ablate an MLP neuron
    with scope.hooks(resample_heads({3: [0]}, cache, seed=0)): ...   # resample-ablate a head
    with scope.hooks(add_vector("blocks.4.hook_resid_mid", v, scale=4.0)): ...
    with scope.hooks(patch_from(clean_cache, "blocks.*.hook_resid_pre", positions=[5])): ...

Heads are ablated at `blocks.{l}.attn.hook_z` (the head's output before out_proj, so the head's
whole write into the residual stream goes; out_proj's bias stays), neurons at
`blocks.{l}.mlp.hook_post` (after the activation function). Means are taken over the real
(unpadded) tokens of a cache captured with positions="all".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from microscope.errors import HookError
from microscope.names import act_name
from microscope.hooks.cache import ActivationCache
from microscope.hooks.hook_points import HookFn, HookPoint

Units = Mapping[int, Sequence[int]] | Iterable[tuple[int, int]]


def _by_layer(units: Units) -> dict[int, list[int]]:
    if isinstance(units, Mapping):
        return {int(l): [int(i) for i in idx] for l, idx in units.items()}
    out: dict[int, list[int]] = {}
    for layer, index in units:
        out.setdefault(int(layer), []).append(int(index))
    return out


def token_mean(cache: ActivationCache, name: str) -> torch.Tensor:
    """Mean of `cache[name]` over the real tokens of every prompt: the trailing shape ([head, d_head], [d_mlp], ...)."""
    if cache.rows is not None:
        x = cache[name]
        return x.float().mean(0).to(x.dtype)
    x, mask = cache[name], cache.mask.to(cache[name].device)
    return (x[mask].float().mean(0)).to(x.dtype)


def _ablate(site: str, units: Units, mean_from: ActivationCache | None) -> dict[str, HookFn]:
    hooks: dict[str, HookFn] = {}
    for layer, index in _by_layer(units).items():
        name = act_name(site, layer)
        fill = None if mean_from is None else token_mean(mean_from, name)[index]

        def ablate(x: torch.Tensor, hook: HookPoint, index=index, fill=fill) -> torch.Tensor:
            x = x.clone()
            x[:, :, index] = 0 if fill is None else fill.to(x.device, x.dtype)
            return x

        hooks[name] = ablate
    return hooks


def ablate_heads(heads: Units, mean_from: ActivationCache | None = None) -> dict[str, HookFn]:
    """Zero (or, with `mean_from`, mean-) ablate heads: `{layer: [head, ...]}` or `[(layer, head), ...]`."""
    return _ablate("attn.hook_z", heads, mean_from)


def resample_heads(heads: Units, source: ActivationCache, seed: int = 0) -> dict[str, HookFn]:
    """Resample-ablate heads (Chan et al. 2022): each token's output of each head is replaced by
    that head's output at a token drawn at random from the real tokens of `source` (a cache of
    other text holding ``attn.hook_z``; positions="all" or selected rows). Fresh draws on every
    forward call (each generation step), from one seeded generator per layer."""
    hooks: dict[str, HookFn] = {}
    for layer, index in _by_layer(heads).items():
        name = act_name("attn.hook_z", layer)
        z = source[name]
        pool = (z if source.rows is not None else z[source.mask.to(z.device)])[:, index]  # [N, k, d_head]
        g = torch.Generator().manual_seed(seed + layer)

        def resample(x: torch.Tensor, hook: HookPoint, index=index, pool=pool, g=g) -> torch.Tensor:
            draw = torch.randint(len(pool), x.shape[:2], generator=g)
            x = x.clone()
            x[:, :, index] = pool[draw].to(x.device, x.dtype)
            return x

        hooks[name] = resample
    return hooks


ABLATIONS = ("zero", "mean", "resample")


def ablate_heads_by(heads: Units, method: str = "zero", reference: ActivationCache | None = None,
                    seed: int = 0) -> dict[str, HookFn]:
    """Ablate heads by one of `ABLATIONS`: zero, mean (over `reference`'s real tokens) or resample
    (from `reference`, see `resample_heads`); `reference` holds the heads' ``attn.hook_z``."""
    if method == "zero":
        return ablate_heads(heads)
    if method not in ABLATIONS:
        raise HookError(f"ablation method must be one of {ABLATIONS}, got {method!r}")
    if reference is None:
        raise HookError(f"{method} ablation needs a reference cache of attn.hook_z (other text)")
    return ablate_heads(heads, mean_from=reference) if method == "mean" else resample_heads(heads, reference, seed)


def ablate_neurons(neurons: Units, mean_from: ActivationCache | None = None) -> dict[str, HookFn]:
    """Zero (or mean-) ablate MLP neurons after the activation: `{layer: [neuron, ...]}` or pairs."""
    return _ablate("mlp.hook_post", neurons, mean_from)


def add_vector(names: str, vector: torch.Tensor, scale: float = 1.0,
               positions: Sequence[int] | slice | None = None) -> dict[str, HookFn]:
    """Add `scale * vector` at the hook(s) `names` (a name or glob pattern), at `positions` or everywhere.

    `vector` broadcasts against the activation's trailing shape (e.g. [d_model] at a residual hook).
    Positions index the token axis of each forward call; during generation a step sees one token.
    """
    index = slice(None) if positions is None else positions

    def steer(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        x = x.clone()
        sel = (slice(None),) * hook.pos_dim + (index,)
        x[sel] = x[sel] + scale * vector.to(x.device, x.dtype)
        return x

    return {names: steer}


def patch_from(source: ActivationCache, names: str | Sequence[str], positions: Sequence[int] | slice | None = None,
               heads: Sequence[int] | None = None) -> dict[str, HookFn]:
    """Replace activations with the ones in `source` (a cache captured with positions="all").

    names: hook names or glob patterns (matched against the cache's names; `UnknownHookError` when
    one matches nothing). positions: token
    indices to patch (default all); heads: for per-head hooks (q, k, v, z, pattern), which heads.
    The running batch must have the source's batch and length at the patched positions.
    """
    if source.rows is not None:
        raise HookError("patch_from needs a cache captured with positions='all' (this one kept selected rows)")
    chosen = source.select(names)
    index = slice(None) if positions is None else positions

    def patch(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        clean = source[hook.name].to(x.device, x.dtype)
        if clean.shape != x.shape:
            raise HookError(f"cannot patch {hook.name}: source {tuple(clean.shape)} vs running "
                            f"{tuple(x.shape)} (same batch size and prompt length needed)")
        head_axis = 1 if hook.kind == "pattern" else 2
        if heads is not None and not (hook.heads or hook.kind == "pattern"):
            raise HookError(f"heads= applies to per-head hooks (q, k, v, z, pattern), not {hook.name}")
        sel: list = [slice(None)] * x.dim()
        sel[hook.pos_dim] = index
        x = x.clone()
        if heads is None:
            x[tuple(sel)] = clean[tuple(sel)]
        else:
            for h in heads:
                sel[head_axis] = h
                x[tuple(sel)] = clean[tuple(sel)]
        return x

    return {name: patch for name in chosen}
