"""The hook-name grammar: the one place that builds, parses and matches hook names.

Names follow TransformerLens:

    hook_embed, hook_pos_embed                           before the first block
    blocks.{layer}.{site}                                in block `layer`, sites in `LAYER_SITES`
    ln_final.hook_normalized, hook_logits                after the last block

    >>> act_name("resid_post", 3)
    'blocks.3.hook_resid_post'
    >>> act_name("z", 2)                     # short forms as TransformerLens' get_act_name
    'blocks.2.attn.hook_z'
    >>> parse("blocks.2.attn.hook_z")
    HookName(site='attn.hook_z', layer=2)
    >>> resolve("blocks.*.hook_resid_post", model_names(2))
    ['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']

Every other module calls these functions; none formats a ``blocks.{l}...`` string itself.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from microscope.errors import UnknownHookError

# Sites inside a block, in the order one forward pass reaches them.
LAYER_SITES = (
    "hook_resid_pre",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z",
    "hook_attn_out", "hook_resid_mid",
    "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out",
    "hook_resid_post",
)
BEFORE_BLOCKS = ("hook_embed", "hook_pos_embed")
FINAL_NORM = "ln_final.hook_normalized"
LOGITS = "hook_logits"
PATTERN_SITE = "attn.hook_pattern"
HEAD_SITES = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")   # [.., head, d_head]
MLP_SITES = ("mlp.hook_pre", "mlp.hook_post")                                 # [.., d_mlp]

# Short forms accepted by `act_name` (TransformerLens' get_act_name spellings).
_SHORT = {site.rsplit("hook_", 1)[-1]: site for site in LAYER_SITES}
_SHORT.update({"attn": "hook_attn_out", "mlp": "hook_mlp_out", "mlp_pre": "mlp.hook_pre",
               "mlp_post": "mlp.hook_post", "embed": "hook_embed", "pos_embed": "hook_pos_embed",
               "ln_final": FINAL_NORM, "normalized": FINAL_NORM, "logits": LOGITS})
_SHORT.pop("pre"), _SHORT.pop("post")   # ambiguous alone: say mlp_pre / mlp_post


class HookName(NamedTuple):
    """A parsed hook name: `site` as in `LAYER_SITES` (or the whole name outside blocks) and its layer."""

    site: str
    layer: int | None


def act_name(site: str, layer: int | None = None) -> str:
    """The hook name of `site` in block `layer` (a site outside the blocks takes no layer).

    `site` is a full site ("attn.hook_z"), its leaf ("hook_z") or a short form ("z", "resid_post",
    "attn", "mlp", "mlp_post", "pattern", "logits")."""
    full = _site(site)
    if full in LAYER_SITES:
        if layer is None:
            raise UnknownHookError(f"{site!r} is a per-block site: give its layer, e.g. act_name({site!r}, 0)")
        return f"blocks.{int(layer)}.{full}"
    if layer is not None:
        raise UnknownHookError(f"{full!r} is not inside a block; call act_name({site!r}) without a layer")
    return full


def _site(site: str) -> str:
    if site in LAYER_SITES or site in BEFORE_BLOCKS or site in (FINAL_NORM, LOGITS):
        return site
    if site in _SHORT:
        return _SHORT[site]
    for full in LAYER_SITES:
        if full.endswith("." + site) or full == "hook_" + site:
            return full
    known = sorted({*LAYER_SITES, *BEFORE_BLOCKS, FINAL_NORM, LOGITS, *_SHORT})
    close = difflib.get_close_matches(site, known, n=3, cutoff=0.6)
    raise UnknownHookError(f"unknown hook site {site!r}" + _did_you_mean(close))


def parse(name: str) -> HookName:
    """Split a hook name into its site and layer; `UnknownHookError` if it is not a hook name."""
    if name in BEFORE_BLOCKS or name in (FINAL_NORM, LOGITS):
        return HookName(name, None)
    head, _, rest = name.partition(".")
    layer, _, site = rest.partition(".")
    if head == "blocks" and layer.isdigit() and site in LAYER_SITES:
        return HookName(site, int(layer))
    close = difflib.get_close_matches(name, model_names(max(1, _layer_hint(name) + 1)), n=3, cutoff=0.6)
    raise UnknownHookError(f"{name!r} is not a hook name (they look like blocks.3.hook_resid_post)"
                           + _did_you_mean(close))


def _layer_hint(name: str) -> int:
    digits = [int(p) for p in name.split(".") if p.isdigit()]
    return digits[0] if digits else 0


def layer_names(site: str, n_layers: int) -> list[str]:
    """`site` in every block: ``layer_names("resid_post", 2) == ["blocks.0.hook_resid_post", ...]``."""
    return [act_name(site, layer) for layer in range(n_layers)]


def every_layer(site: str) -> str:
    """A glob selecting `site` in every block: ``every_layer("resid_post") == "blocks.*.hook_resid_post"``."""
    full = _site(site)
    if full not in LAYER_SITES:
        raise UnknownHookError(f"{full!r} is not inside a block; it has one hook, not one per layer")
    return f"blocks.*.{full}"


def model_names(n_layers: int, *, final_norm: bool = True) -> list[str]:
    """Every hook name of an OPT with `n_layers` blocks, in forward order (post-LN OPT-350m has
    no final LayerNorm: `final_norm=False`)."""
    names = list(BEFORE_BLOCKS)
    names += [f"blocks.{layer}.{site}" for layer in range(n_layers) for site in LAYER_SITES]
    return names + ([FINAL_NORM] if final_norm else []) + [LOGITS]


def is_pattern(name: str) -> bool:
    """Whether `name` is an attention pattern ([batch, head, q, k]; stored as packed triangles)."""
    return name.endswith(PATTERN_SITE)


def head_label(layer: int, head: int) -> str:
    """The short label of one attention head: ``"L3H2"`` (the studies' headline keys use it)."""
    return f"L{layer}H{head}"


def parse_head_label(label: str) -> tuple[int, int]:
    """``"L3H2"`` -> (3, 2)."""
    layer, sep, head = label.removeprefix("L").partition("H")
    if not (label.startswith("L") and sep and layer.isdigit() and head.isdigit()):
        raise UnknownHookError(f"{label!r} is not a head label; they look like L3H2 (layer 3, head 2)")
    return int(layer), int(head)


def short_label(name: str) -> str:
    """A compact label for tables and axes: ``blocks.3.hook_resid_post`` -> ``L3.resid_post``."""
    site, layer = parse(name)
    leaf = site.replace("attn.hook_", "attn.").replace("mlp.hook_", "mlp.").replace("hook_", "")
    return leaf if layer is None else f"L{layer}.{leaf}"


def feature_shape(name: str, config: Any) -> tuple[int, ...]:
    """The per-token shape of a hook's activation for an HF `OPTConfig`-like `config`.

    Residual-width hooks give (d_model,) [hook_embed: word_embed_proj_dim's projection, so d_model
    too], q/k/v/z (head, d_head), MLP hooks (d_mlp,), logits (vocab rows,), patterns (head,) per
    query row (the key axis varies with the prompt)."""
    site, _ = parse(name)
    heads = config.num_attention_heads
    if site == PATTERN_SITE:
        return (heads,)
    if site in HEAD_SITES:
        return (heads, config.hidden_size // heads)
    if site in MLP_SITES:
        return (config.ffn_dim,)
    if site == LOGITS:
        return (config.vocab_size,)
    return (config.hidden_size,)


def feature_dim_names(name: str) -> tuple[str, ...]:
    """Semantic axis names of a hook's per-token features, matching `feature_shape`."""
    site, _ = parse(name)
    if site == PATTERN_SITE:
        return ("head",)
    if site in HEAD_SITES:
        return ("head", "d_head")
    if site in MLP_SITES:
        return ("d_mlp",)
    if site == LOGITS:
        return ("vocab",)
    return ("d_model",)


def split_patterns(patterns: str | Iterable[str] | None) -> list[str] | None:
    """Comma-separated text or a list -> a list of stripped patterns (None stays None)."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = patterns.split(",")
    return [p.strip() for p in patterns if p and p.strip()]


def resolve(patterns: str | Iterable[str] | None, names: Sequence[str], *, where: str = "this model",
            hint: str = "") -> list[str]:
    """The `names` matching exact names or glob patterns, in the order of `names`, no duplicates.

    `patterns` may be comma-separated text; None selects every name, an empty list none. Blank
    text, or a pattern that matches nothing, raises `UnknownHookError` naming `where`, the closest
    names and `hint`."""
    chosen_patterns = split_patterns(patterns)
    if chosen_patterns is None:
        return list(names)
    if not chosen_patterns and isinstance(patterns, str):
        raise UnknownHookError("no hooks given: name some, e.g. 'blocks.*.hook_resid_post'")
    chosen: set[str] = set()
    for pattern in chosen_patterns:
        found = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not found:
            raise UnknownHookError(unknown_message(pattern, names, where=where, hint=hint))
        chosen.update(found)
    return [n for n in names if n in chosen]


def unknown_message(pattern: str, names: Sequence[str], *, where: str = "this model", hint: str = "") -> str:
    """"no hook of <where> matches <pattern>; did you mean ...?" with the closest names, or for a
    glob pattern the closest globs (`glob_forms`)."""
    is_glob = any(c in pattern for c in "*?[")
    close = difflib.get_close_matches(pattern, glob_forms(names) if is_glob else list(names), n=3, cutoff=0.6)
    msg = f"no hook of {where} matches {pattern!r}"
    if hint:
        msg += f" ({hint})"
    looks = ("globs look like blocks.*.hook_resid_post or blocks.*.attn.hook_*" if is_glob
             else "names look like blocks.3.hook_resid_post")
    return msg + _did_you_mean(close) + f" ({len(names)} hooks there; {looks})"


def glob_forms(names: Sequence[str]) -> list[str]:
    """The globs worth suggesting over hook `names`: each site in every block
    (blocks.*.hook_resid_post), each family in every block (blocks.*.attn.hook_*, blocks.*.hook_*),
    each whole block (blocks.3.*), and the names outside the blocks."""
    forms: dict[str, None] = {}
    for name in names:
        head, _, rest = name.partition(".")
        layer, _, site = rest.partition(".")
        if head != "blocks" or not layer.isdigit():
            forms[name] = None
            continue
        family = site.rpartition("hook_")[0]
        forms.update(dict.fromkeys([f"blocks.*.{site}", f"blocks.*.{family}hook_*", f"blocks.{layer}.*"]))
    return list(forms)


def _did_you_mean(close: list[str]) -> str:
    return "; did you mean " + " or ".join(close) + "?" if close else ""
