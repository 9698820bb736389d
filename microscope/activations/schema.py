"""The store's on-disk contract: what a group holds, which hooks and rows it lays out, and how it
is opened. The writer, capture, the pipeline and the reader all build on it.

A store is one Zarr v3 group:

    token_id, prompt_id, position   [rows]        int32, -1 on the tail rows of a unit
    prompt_offsets                  [P+1]         int64, prompt p's kept tokens are tokens
                                                  offsets[p]:offsets[p+1] of the flat token axis
    prompt_length                   [P]           int32, tokens the model saw (after truncation)
    pattern_offsets                 [P+1]         int64, same for packed attention-pattern rows
    units                           [U, 8]        int64, see `units.UNIT_COLUMNS`
    committed                       [U]           uint8, one chunk per unit: the commit markers
    prompt_text, prompt_metadata    [P]           strings (metadata as JSON)
    vocab                           [V]           the decoded string of every token id
    hooks/<hook name>               [rows, width] one array per hook, chunked by `chunk_rows`

"rows" is the physical axis: every work unit covers whole chunks, so a unit's last chunk ends in
tail rows that belong to no prompt (`prompt_id == -1`). The reader hides them and presents the
flat token axis (kept tokens only). Attention patterns use their own row axis (one row per kept
query position and key position k <= q, one column per head kept). The group's ``microscope``
attribute holds `FORMAT_VERSION`, ``complete`` (set last by the creator), the fingerprint a resume
must match, the provenance and the layout. Dtypes, chunk sizes and codecs: `layout.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import zarr

from microscope.activations.layout import StoreDtype
from microscope.activations.units import Unit

FORMAT_VERSION = 1
HOOKS_GROUP = "hooks"


@dataclass(frozen=True)
class HookSpec:
    """One captured hook: per-token features of `feature_shape`, or a packed attention pattern."""

    name: str
    feature_shape: tuple[int, ...]
    heads: tuple[int, ...] | None = None     # set for attention patterns: the heads kept

    @property
    def is_pattern(self) -> bool:
        return self.heads is not None

    @property
    def width(self) -> int:
        return len(self.heads) if self.is_pattern else math.prod(self.feature_shape)

    @property
    def path(self) -> str:
        return f"{HOOKS_GROUP}/{self.name}"


@dataclass
class StorePlan:
    """Everything the tokenisation pass decides, before any forward pass.

    `prompt_tokens[p]` are the ids the model sees for prompt p; `kept[p]` the positions stored
    (sorted); `units` pack the prompts; `fingerprint` is what a resume must match."""

    hooks: list[HookSpec]
    dtype: StoreDtype
    prompt_tokens: list[np.ndarray]
    kept: list[np.ndarray]
    units: list[Unit]
    chunk_rows: int
    pattern_chunk_rows: int
    fingerprint: dict
    kept_offsets: np.ndarray = field(init=False)      # [P+1] on the flat token axis
    pattern_offsets: np.ndarray = field(init=False)   # [P+1] on the flat pattern axis

    def __post_init__(self):
        self.kept_offsets = np.concatenate([[0], np.cumsum([len(k) for k in self.kept])]).astype(np.int64)
        self.pattern_offsets = np.concatenate(
            [[0], np.cumsum([pattern_rows(k) for k in self.kept])]).astype(np.int64)

    @property
    def has_patterns(self) -> bool:
        return any(h.is_pattern for h in self.hooks)


def pattern_rows(kept: np.ndarray) -> int:
    """Packed lower-triangle rows of one prompt: keys 0..q for every kept query position q."""
    return int(np.sum(np.asarray(kept, dtype=np.int64) + 1))


def hook_rows(spec: HookSpec, unit: Unit, plan_chunk_rows: int, pattern_chunk_rows: int) -> slice:
    """The array rows unit owns in `spec`'s array: whole chunks from the unit's first row."""
    if spec.is_pattern:
        n = -(-unit.n_pattern_rows // pattern_chunk_rows) * pattern_chunk_rows
        return slice(unit.pattern_row_start, unit.pattern_row_start + n)
    n = -(-unit.n_tokens // plan_chunk_rows) * plan_chunk_rows
    return slice(unit.row_start, unit.row_start + n)


def store_is_complete(group: zarr.Group) -> bool:
    """True when the creator finished laying the store out (units may still be uncommitted)."""
    return bool(group.attrs.get("microscope", {}).get("complete", False))


def open_group(path, mode: str, storage_options: dict | None = None) -> zarr.Group:
    """Open a store path: a local folder, any fsspec URL (s3://...), or a zarr Store object."""
    kwargs = {"storage_options": storage_options} if storage_options and isinstance(path, str) else {}
    return zarr.open_group(store=path, mode=mode, zarr_format=3, **kwargs)
