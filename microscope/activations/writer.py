"""Creating a store from a plan, reopening it for resume, and writing one unit's rows.

The creator (rank 0) writes every array's metadata and the small index arrays once, pre-sized from
the tokenisation pass, and sets ``complete`` last; a store without it is recreated on resume
(nothing can have been committed). Workers then only write whole chunks of the units they own.
"""

from __future__ import annotations

import json

import numpy as np
import zarr

from microscope.activations.layout import create_array
from microscope.activations.schema import FORMAT_VERSION, StorePlan, StoredHook
from microscope.activations.units import Unit, row_extent, units_to_array
from microscope.errors import StoreError, StoreMismatchError

# Settings a resume must match exactly; the error names the ones that differ.
FINGERPRINT_FIELDS = ("model", "weights_hash", "hooks", "dtype", "positions", "pattern_heads",
                      "prompts_hash", "tokens_hash", "max_length", "chunk_rows", "unit_rows",
                      "pattern_chunk_rows", "compress")


def create_store(group: zarr.Group, plan: StorePlan, texts: list[str], metadata: list[dict],
                 vocab: list[str], provenance: dict, compress: str | None = None) -> None:
    """Lay out an empty store in `group` (opened with mode "w"): every array pre-sized, index arrays
    filled, hook arrays left unwritten. Marks the group as a store being laid out first (so a dump
    killed half way through is recognised, and recreated, by the next run) and sets ``complete`` last."""
    group.attrs["microscope"] = {"format_version": FORMAT_VERSION, "complete": False}
    rows, pattern_rows_total = row_extent(plan.units, plan.chunk_rows, plan.pattern_chunk_rows)
    n_prompts, n_units = len(plan.prompt_tokens), len(plan.units)
    token_id = np.full(rows, -1, np.int32)
    prompt_id = np.full(rows, -1, np.int32)
    position = np.full(rows, -1, np.int32)
    for unit in plan.units:
        row = unit.row_start
        for p in unit.prompts:
            kept = plan.kept[p]
            token_id[row:row + len(kept)] = plan.prompt_tokens[p][kept]
            prompt_id[row:row + len(kept)] = p
            position[row:row + len(kept)] = kept
            row += len(kept)
    index_chunk = max(plan.chunk_rows, 1 << 16)

    def small(name, data, chunk, fill):
        arr = create_array(group, name, data.shape, data.dtype, chunks=(max(1, min(chunk, len(data))),)
                           + data.shape[1:], fill_value=fill)
        if data.size:
            arr[...] = data

    small("token_id", token_id, index_chunk, -1)
    small("prompt_id", prompt_id, index_chunk, -1)
    small("position", position, index_chunk, -1)
    small("prompt_offsets", plan.kept_offsets, 1 << 16, 0)
    small("pattern_offsets", plan.pattern_offsets, 1 << 16, 0)
    small("prompt_length", np.array([len(t) for t in plan.prompt_tokens], np.int32), 1 << 16, 0)
    small("units", units_to_array(plan.units), 1 << 14, 0)
    create_array(group, "committed", (n_units,), np.uint8, chunks=(1,), fill_value=0)
    for name, values in (("prompt_text", texts), ("prompt_metadata", [json.dumps(m) for m in metadata]),
                         ("vocab", vocab)):
        arr = group.create_array(name, shape=(len(values),), dtype=str,
                                 chunks=(max(1, min(len(values), 1 << 16)),))
        if values:
            arr[...] = np.array(values, dtype=object)
    for spec in plan.hooks:
        n = pattern_rows_total if spec.is_pattern else rows
        chunk = plan.pattern_chunk_rows if spec.is_pattern else plan.chunk_rows
        create_array(group, spec.path, (n, spec.width), plan.dtype.storage, chunks=(chunk, spec.width),
                     fill_value=0, compress=compress,
                     attributes={"hook": spec.name, "dtype": plan.dtype.name,
                                 "feature_shape": list(spec.feature_shape),
                                 "kind": "pattern" if spec.is_pattern else "tokens",
                                 "heads": list(spec.heads) if spec.is_pattern else None})
    layout = {"chunk_rows": plan.chunk_rows, "pattern_chunk_rows": plan.pattern_chunk_rows,
              "n_prompts": n_prompts, "n_tokens": int(plan.kept_offsets[-1]),
              "n_pattern_rows": int(plan.pattern_offsets[-1]), "n_units": n_units, "rows": rows,
              "pattern_rows": pattern_rows_total, "hooks": [h.name for h in plan.hooks],
              "dtype": plan.dtype.name}
    attrs = {"format_version": FORMAT_VERSION, "complete": False, "fingerprint": plan.fingerprint,
             "provenance": provenance, "layout": layout}
    group.attrs["microscope"] = attrs
    group.attrs["microscope"] = {**attrs, "complete": True}


def check_resume(group: zarr.Group, fingerprint: dict, where: str) -> None:
    """Refuse to resume into a store made with other settings; the error lists every difference."""
    stored = group.attrs["microscope"]["fingerprint"]
    differ = [f for f in FINGERPRINT_FIELDS if _jsonable(stored.get(f)) != _jsonable(fingerprint.get(f))]
    if differ:
        lines = "\n".join(f"  {f}: store has {stored.get(f)!r}, this run has {fingerprint.get(f)!r}"
                          for f in differ)
        raise StoreMismatchError(
            f"cannot resume {where}: it was made with different settings ({', '.join(differ)}):\n"
            f"{lines}\nRerun with the store's settings, or write to a new --out.")


def _jsonable(value):
    return json.loads(json.dumps(value))


def write_hook(array: zarr.Array, spec: StoredHook, unit: Unit, rows: slice, data: np.ndarray) -> None:
    """Write one hook's whole-chunk block for a unit into its array (data rows == rows' length)."""
    if data.shape[0] != rows.stop - rows.start:
        raise StoreError(f"{spec.name}: unit {unit.index} block has {data.shape[0]} rows, "
                         f"expected {rows.stop - rows.start}")
    if data.shape[0]:
        array[rows] = data


