"""Work units: whole prompts packed into chunk-aligned row ranges, and their commit markers.

A unit is the store's unit of work, of writing and of recovery. Its prompts are consecutive, its
rows start on a chunk boundary and cover whole chunks (the tail rows of its last chunk belong to
no prompt), so every chunk of every hook array has exactly one writer: the rank that owns the unit.
After all hooks of a unit are written, its commit marker (one single-chunk element of the
`committed` array) is set; a resume recomputes exactly the units without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from microscope.errors import StoreError

UNIT_COLUMNS = ("prompt_start", "prompt_stop", "token_start", "token_stop", "row_start",
                "pattern_start", "pattern_stop", "pattern_row_start")


@dataclass(frozen=True)
class Unit:
    """One work unit. Tokens/patterns are offsets on the flat (logical) axes, rows on the arrays."""

    index: int
    prompt_start: int
    prompt_stop: int
    token_start: int
    token_stop: int
    row_start: int
    pattern_start: int
    pattern_stop: int
    pattern_row_start: int

    @property
    def n_tokens(self) -> int:
        return self.token_stop - self.token_start

    @property
    def n_pattern_rows(self) -> int:
        return self.pattern_stop - self.pattern_start

    @property
    def prompts(self) -> range:
        return range(self.prompt_start, self.prompt_stop)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_units(kept_tokens: np.ndarray, pattern_rows: np.ndarray, unit_rows: int, chunk_rows: int,
               pattern_chunk_rows: int) -> list[Unit]:
    """Pack prompts, in order, into units of at most `unit_rows` kept tokens (a longer prompt gets a
    unit of its own). `kept_tokens[p]`/`pattern_rows[p]` are prompt p's rows on the two axes."""
    if unit_rows % chunk_rows:
        raise StoreError(f"unit_rows ({unit_rows}) must be a multiple of chunk_rows ({chunk_rows})")
    units: list[Unit] = []
    start = token = row = pattern = pattern_row = 0
    n_prompts = len(kept_tokens)
    while start < n_prompts:
        stop, tokens, patterns = start, 0, 0
        while stop < n_prompts and (stop == start or tokens + kept_tokens[stop] <= unit_rows):
            tokens += int(kept_tokens[stop])
            patterns += int(pattern_rows[stop])
            stop += 1
        units.append(Unit(len(units), start, stop, token, token + tokens, row,
                          pattern, pattern + patterns, pattern_row))
        token, pattern = token + tokens, pattern + patterns
        row += round_up(tokens, chunk_rows)
        pattern_row += round_up(patterns, pattern_chunk_rows)
        start = stop
    return units


def units_to_array(units: list[Unit]) -> np.ndarray:
    """[U, len(UNIT_COLUMNS)] int64 table, as stored in the `units` array."""
    return np.array([[getattr(u, c) for c in UNIT_COLUMNS] for u in units], dtype=np.int64).reshape(
        len(units), len(UNIT_COLUMNS))


def units_from_array(table: np.ndarray) -> list[Unit]:
    return [Unit(i, *(int(v) for v in row)) for i, row in enumerate(table)]


def row_extent(units: list[Unit], chunk_rows: int, pattern_chunk_rows: int) -> tuple[int, int]:
    """Total rows of the token arrays and of the pattern arrays."""
    if not units:
        return 0, 0
    last = units[-1]
    return (last.row_start + round_up(last.n_tokens, chunk_rows),
            last.pattern_row_start + round_up(last.n_pattern_rows, pattern_chunk_rows))


def committed_units(group: zarr.Group) -> np.ndarray:
    """Bool mask [U]: which units carry a commit marker."""
    return group["committed"][:].astype(bool)


def mark_committed(committed: zarr.Array, unit: Unit) -> None:
    """Write unit's commit marker (its own chunk of the `committed` array): call after all its hooks
    are written."""
    committed[unit.index] = 1
