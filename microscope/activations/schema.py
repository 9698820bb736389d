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

A store is written only at a new path, in an empty folder or over a group a dump made
(`is_dump_group`); `check_store_path` refuses anything else before any work starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from microscope.activations.layout import StoreDtype
from microscope.activations.units import Unit
from microscope.errors import StoreError

FORMAT_VERSION = 1
HOOKS_GROUP = "hooks"


@dataclass(frozen=True)
class StoredHook:
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

    hooks: list[StoredHook]
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


def hook_rows(spec: StoredHook, unit: Unit, plan_chunk_rows: int, pattern_chunk_rows: int) -> slice:
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


def is_dump_group(group: zarr.Group) -> bool:
    """True for a group a dump made: it carries the ``microscope`` attribute, or it is still the
    bare group a dump opens before its first write (no attributes, no members)."""
    return "microscope" in group.attrs or not (dict(group.attrs) or list(group.keys()))


def foreign_files_error(where: str) -> StoreError:
    """The refusal to write over someone else's files (a dump deletes only what a dump wrote)."""
    return StoreError(f"{where} already holds files that are not an activation store; nothing was "
                      "written or deleted there: choose an empty folder or a new path for --out")


def existing_store_error(where: str) -> StoreError:
    """The refusal to start over a finished store without --resume."""
    return StoreError(f"{where} already holds a store; pass --resume to continue it, "
                      "or choose another --out (or delete it)")


def check_store_path(out, resume: bool = False) -> None:
    """Refuse a local `out` a dump cannot or must not write: a file, a path below a file or in a
    folder it cannot write to, a folder holding anything but an activation store, a finished
    store unless `resume`. Reads only the folder listing and zarr.json. fsspec URLs and zarr
    Store objects pass (the dump refuses someone else's files there when it creates the store)."""
    if not isinstance(out, (str, os.PathLike)) or "://" in str(out):
        return
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise StoreError(f"--out {out} is a file; choose an empty folder or a new path")
    if path.is_dir():
        group = _dump_group(path)
        if group is None and any(path.iterdir()):
            raise foreign_files_error(str(out))
        if group is not None and store_is_complete(group) and not resume:
            raise existing_store_error(str(out))
        folder = path
    else:
        folder = next(p for p in path.absolute().parents if p.exists())
        if not folder.is_dir():
            raise StoreError(f"cannot create --out {out}: {folder} is a file, not a folder; "
                             "choose a path inside a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write --out {out}: {folder} is not writable; "
                         "choose a folder you can write to")


def _dump_group(folder: Path) -> zarr.Group | None:
    """The group in `folder` if a dump made it, else None."""
    try:
        group = open_group(str(folder), mode="r")
    except (OSError, ValueError):    # no zarr.json, an array, or a zarr.json that is not JSON
        return None
    return group if is_dump_group(group) else None
