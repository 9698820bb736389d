"""`open_store(path)`: read an activation store lazily, from a notebook or a training loop.

    store = ms.open_store("activations/run.zarr")      # or "s3://bucket/run.zarr"
    store.hooks                                        # hook names, in model order
    x = store["blocks.3.hook_resid_post"][1000:2000]   # numpy [1000, d_model], flat token axis
    t = store["blocks.3.hook_resid_post"].torch()[:]   # torch, in the stored dtype (bf16 exact)
    store["blocks.3.hook_resid_post"].prompt(7)        # the kept tokens of prompt 7
    store.tokens(7)                                    # their decoded strings
    store["blocks.0.attn.hook_pattern"].prompt(7)      # [head, kept query, key], zeros above diagonal
    for batch in store.batches("blocks.3.hook_resid_post", batch_size=4096, seed=0): ...
    ds = store.to_xarray()                             # dask-backed xarray.Dataset

Everything is addressed on the flat token axis of kept tokens: the tail rows that pad each work
unit to whole chunks are never shown. Reads touching an uncommitted unit raise
`UnitNotCommittedError`; a chunk whose checksum fails raises `StoreCorruptError` naming the hook,
the unit and the chunk.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import zarr

from microscope.activations.layout import StoreDtype, store_dtype
from microscope.activations.schema import HOOKS_GROUP, open_group, store_is_complete
from microscope.activations.units import Unit, committed_units, units_from_array
from microscope.errors import (StoreCorruptError, StoreError, StoreIndexError, UnitNotCommittedError,
                               UnknownHookError)
from microscope.names import feature_dim_names


def open_store(path, storage_options: dict | None = None) -> ActivationStore:
    """Open a store written by `microscope dump`: a folder, an fsspec URL, or a zarr Store."""
    try:
        group = open_group(path, mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        raise StoreError(f"no activation store at {path!r}: write one with `microscope dump`") from err
    if "microscope" not in group.attrs:
        raise StoreError(f"{path!r} is a zarr group but not an activation store (no 'microscope' attribute)")
    if not store_is_complete(group):
        raise StoreError(f"{path!r} was never fully laid out (the dump died while creating it); "
                         "rerun the dump with --resume")
    return ActivationStore(group, str(path))


class ActivationStore:
    """A read-only view of one store. See the module docstring for the tour."""

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        attrs = group.attrs["microscope"]
        self.provenance: dict = attrs["provenance"]
        self.settings: dict = attrs["fingerprint"]
        self.layout: dict = attrs["layout"]
        self.dtype: StoreDtype = store_dtype(self.layout["dtype"])
        self.hooks: list[str] = list(self.layout["hooks"])
        self.units: list[Unit] = units_from_array(group["units"][:])
        self.prompt_offsets = group["prompt_offsets"][:]
        self.pattern_offsets = group["pattern_offsets"][:]
        self._token_starts = np.array([u.token_start for u in self.units], np.int64)
        self._pattern_starts = np.array([u.pattern_start for u in self.units], np.int64)
        self._vocab: np.ndarray | None = None

    # --- sizes and metadata ---
    @property
    def n_tokens(self) -> int:
        return int(self.layout["n_tokens"])

    @property
    def n_prompts(self) -> int:
        return int(self.layout["n_prompts"])

    @property
    def committed(self) -> np.ndarray:
        """Bool [units]: which work units are complete (re-read on every access)."""
        return committed_units(self.group)

    @property
    def is_complete(self) -> bool:
        return bool(self.committed.all())

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self[name].shape for name in self.hooks}

    @property
    def dtypes(self) -> dict[str, str]:
        return {name: self.dtype.name for name in self.hooks}

    def __getitem__(self, hook: str) -> HookArray:
        if hook not in self.hooks:
            raise UnknownHookError(f"{hook!r} is not in this store; it holds: {', '.join(self.hooks)}")
        array = self.group[f"{HOOKS_GROUP}/{hook}"]
        cls = PatternArray if array.attrs["kind"] == "pattern" else HookArray
        return cls(self, hook, array)

    def __contains__(self, hook: str) -> bool:
        return hook in self.hooks

    def __iter__(self) -> Iterator[str]:
        return iter(self.hooks)

    def __len__(self) -> int:
        return len(self.hooks)

    # --- prompts and tokens ---
    def prompt_range(self, prompt: int) -> slice:
        """Prompt's kept tokens on the flat token axis."""
        if not -self.n_prompts <= prompt < self.n_prompts:
            raise StoreIndexError(f"prompt {prompt} out of range: the store has {self.n_prompts} prompts")
        prompt %= self.n_prompts
        return slice(int(self.prompt_offsets[prompt]), int(self.prompt_offsets[prompt + 1]))

    def _index_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        array = self.group[name]
        return _read_logical(self, name, start, stop, pattern=False, check_commit=False,
                             read_unit=lambda u, lo, hi: array[u.row_start + lo:u.row_start + hi])

    def token_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """int32 token ids of flat tokens [start, stop)."""
        return self._index_rows("token_id", *_bounds(start, stop, self.n_tokens))

    def prompt_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._index_rows("prompt_id", *_bounds(start, stop, self.n_tokens))

    def positions(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Position of each flat token inside its prompt."""
        return self._index_rows("position", *_bounds(start, stop, self.n_tokens))

    @property
    def vocab(self) -> np.ndarray:
        """Decoded string of every token id (saved from the tokenizer at dump time)."""
        if self._vocab is None:
            self._vocab = self.group["vocab"][:]
        return self._vocab

    def decode(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """Decoded strings of token ids."""
        return [str(s) for s in self.vocab[np.asarray(ids, dtype=np.int64)]]

    def tokens(self, prompt: int) -> list[str]:
        """The decoded strings of a prompt's kept tokens."""
        r = self.prompt_range(prompt)
        return self.decode(self.token_ids(r.start, r.stop))

    def prompt_text(self, prompt: int) -> str:
        return str(self.group["prompt_text"][prompt])

    def prompt_metadata(self, prompt: int) -> dict:
        return json.loads(str(self.group["prompt_metadata"][prompt]))

    # --- streaming ---
    def batches(self, hooks: str | Sequence[str], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                buffer_chunks: int = 8, drop_last: bool = False) -> Iterator:
        """Batches of token rows as torch tensors (a dict when `hooks` is a list).

        Shuffled with a seeded generator within a buffer of `buffer_chunks` chunks read in random
        order: memory stays near buffer_chunks x chunk bytes whatever the store size. Each kept
        token appears exactly once per pass."""
        names = [hooks] if isinstance(hooks, str) else list(hooks)
        views = [self[n] for n in names]
        if any(isinstance(v, PatternArray) for v in views):
            raise StoreError("batches() streams per-token hooks; read attention patterns with .prompt()")
        pieces = [(u.token_start + i, min(u.token_stop, u.token_start + i + self.layout["chunk_rows"]))
                  for u in self.units for i in range(0, u.n_tokens, self.layout["chunk_rows"])]
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(pieces)) if shuffle else np.arange(len(pieces))
        buffered: list[list[torch.Tensor]] = []
        held = 0

        def flush(final: bool):
            nonlocal buffered, held
            columns = [torch.cat([b[k] for b in buffered]) for k in range(len(views))]
            perm = torch.from_numpy(rng.permutation(held)) if shuffle else torch.arange(held)
            columns = [c[perm] for c in columns]
            n_out = held if final else held - held % batch_size
            for start in range(0, n_out, batch_size):
                if final and drop_last and start + batch_size > n_out:
                    break
                out = [c[start:start + batch_size] for c in columns]
                yield out[0] if isinstance(hooks, str) else dict(zip(names, out))
            buffered = [[c[n_out:] for c in columns]] if n_out < held else []
            held -= n_out

        committed = self.committed     # read once: a marker read costs 10-25 ms on a busy disk
        if not committed.all():
            first = int(np.argmin(committed))
            raise UnitNotCommittedError(f"work unit {first} of this store is not committed yet; batches() streams "
                                        "whole stores: finish it with `microscope dump ... --resume`")
        for count, piece in enumerate(order, start=1):
            start, stop = pieces[piece]
            buffered.append([self.dtype.to_torch(v.read(start, stop, check_commit=False)) for v in views])
            held += stop - start
            if count % buffer_chunks == 0:
                yield from flush(final=False)
        if held:
            yield from flush(final=True)

    # --- integrity ---
    def verify(self) -> list[str]:
        """Read every chunk of every committed unit; return one line per corrupted chunk (empty: all good)."""
        problems = []
        committed = self.committed
        for name in self.hooks:
            view = self[name]
            for unit in self.units:
                if committed[unit.index]:
                    try:
                        view._read_unit(unit, 0, view._unit_len(unit))
                    except StoreCorruptError as err:
                        problems.append(str(err))
        return problems

    # --- xarray ---
    def to_xarray(self, hooks: Sequence[str] | None = None):
        """An `xarray.Dataset` of dask arrays: one variable per hook on a `token` dimension (patterns
        on `pattern_row`), coordinates token_id, prompt_id, position.

        Every variable is float32, whatever the stored dtype: fp16 and bf16 chunks are widened
        exactly as dask reads them, so ``ds[hook].mean()`` and other reductions accumulate in
        float32 (as numpy's mean of float16 does) rather than in float16, which loses most digits
        and overflows to inf past 65504. ``store[hook][a:b]`` still reads the stored dtype."""
        import dask.array as da
        import xarray as xr

        names = list(hooks) if hooks is not None else self.hooks
        dims_used: dict[str, int] = {}
        variables = {}
        for name in names:
            view = self[name]
            feature_dims = _feature_dims(name, view.shape[1:], dims_used)
            axis = "pattern_row" if isinstance(view, PatternArray) else "token"
            variables[name] = ((axis, *feature_dims), view.to_dask())
        coords = {}
        for coord in ("token_id", "prompt_id", "position"):
            raw = da.from_zarr(self.group[coord])
            parts = [raw[u.row_start:u.row_start + u.n_tokens] for u in self.units if u.n_tokens]
            coords[coord] = ("token", da.concatenate(parts) if parts else raw[:0])
        return xr.Dataset(variables, coords=coords, attrs={"store": self.path,
                                                            "model": str(self.settings.get("model"))})

    # --- display ---
    def _summary_rows(self) -> list[tuple[str, str, str]]:
        return [(name, "x".join(str(s) for s in self[name].shape), self.dtype.name) for name in self.hooks]

    def __repr__(self) -> str:
        done = int(self.committed.sum())
        lines = [f"<ActivationStore {self.path}",
                 f"  model {self.settings.get('model')}  dtype {self.dtype.name}  "
                 f"positions {self.settings.get('positions')}",
                 f"  {self.n_prompts:,} prompts  {self.n_tokens:,} tokens  "
                 f"units {done}/{len(self.units)} committed",
                 f"  hooks ({len(self.hooks)}):"]
        width = max((len(h) for h in self.hooks), default=0)
        lines += [f"    {n:<{width}}  [{s}]  {d}" for n, s, d in self._summary_rows()]
        return "\n".join(lines) + ">"

    def _repr_html_(self) -> str:
        done = int(self.committed.sum())
        rows = "".join(f"<tr><td><code>{html.escape(n)}</code></td><td>[{s}]</td><td>{d}</td></tr>"
                       for n, s, d in self._summary_rows())
        return (f"<div><b>ActivationStore</b> <code>{html.escape(self.path)}</code><br>"
                f"model <code>{html.escape(str(self.settings.get('model')))}</code>, "
                f"dtype {self.dtype.name}, positions {html.escape(str(self.settings.get('positions')))}, "
                f"{self.n_prompts:,} prompts, {self.n_tokens:,} tokens, "
                f"units {done}/{len(self.units)} committed"
                f"<table><thead><tr><th>hook</th><th>shape</th><th>dtype</th></tr></thead>"
                f"<tbody>{rows}</tbody></table></div>")


class HookArray:
    """One per-token hook: shape (n_tokens, *feature_shape) on the flat token axis."""

    kind = "tokens"

    def __init__(self, store: ActivationStore, name: str, array: zarr.Array):
        self.store, self.name, self.array = store, name, array
        self.feature_shape = tuple(array.attrs["feature_shape"])

    @property
    def n_rows(self) -> int:
        return self.store.n_tokens

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n_rows, *self.feature_shape)

    @property
    def dtype(self) -> str:
        return self.store.dtype.name

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {list(self.shape)} {self.dtype}>"

    def _unit_len(self, unit: Unit) -> int:
        return unit.n_tokens

    def _unit_first_row(self, unit: Unit) -> int:
        return unit.row_start

    def _chunk_rows(self) -> int:
        return self.array.chunks[0]

    def read(self, start: int, stop: int, *, check_commit: bool = True) -> np.ndarray:
        """Stored values of rows [start, stop), as stored (bf16 as its uint16 pattern).
        check_commit=False skips re-reading the commit markers (the caller checked them)."""
        raw = _read_logical(self.store, self.name, start, stop, pattern=self.kind == "pattern",
                            read_unit=self._read_unit, check_commit=check_commit)
        return raw.reshape(len(raw), *self.feature_shape) if self.kind == "tokens" else raw

    def _read_unit(self, unit: Unit, start: int, stop: int) -> np.ndarray:
        first = self._unit_first_row(unit)
        try:
            return self.array[first + start:first + stop]
        except ValueError as err:
            if "checksum" not in str(err):
                raise
            chunk = self._chunk_rows()
            bad = []
            for c in range((first + start) // chunk, -(-(first + stop) // chunk)):
                try:
                    self.array[c * chunk:(c + 1) * chunk]
                except ValueError:
                    bad.append(c)
            raise StoreCorruptError(
                f"corrupted data in hook {self.name}, work unit {unit.index} (prompts "
                f"{unit.prompt_start}..{unit.prompt_stop - 1}), chunk {bad}: checksum mismatch. "
                "Rerun the dump with --resume after deleting that unit's commit marker, "
                f"e.g. store.group['committed'][{unit.index}] = 0") from err

    def __getitem__(self, key) -> np.ndarray:
        start, stop = _slice_bounds(key, self.n_rows)
        out = self.store.dtype.to_numpy(self.read(start, stop))
        return out[0] if isinstance(key, (int, np.integer)) else out

    def prompt(self, prompt: int) -> np.ndarray:
        r = self.store.prompt_range(prompt)
        return self[r]

    def torch(self) -> TorchView:
        """Indexable like the array, returning torch tensors in the stored dtype (bf16 exact)."""
        return TorchView(self)

    def to_dask(self):
        """Dask array over the kept rows (unit tail rows dropped), always float32: fp16 and bf16
        chunks are widened (exactly) as they are read, so sums and means accumulate in float32."""
        import dask.array as da

        raw = da.from_zarr(self.array)
        parts = [raw[self._unit_first_row(u):self._unit_first_row(u) + self._unit_len(u)]
                 for u in self.store.units if self._unit_len(u)]
        flat = da.concatenate(parts) if parts else raw[:0]
        if self.store.dtype.name != "float32":
            flat = flat.map_blocks(_as_float32, self.store.dtype, dtype=np.float32)
        return flat.reshape(flat.shape[0], *self.feature_shape) if self.kind == "tokens" else flat


class PatternArray(HookArray):
    """A packed attention pattern: rows are (kept query q, key k <= q) pairs, columns the heads kept."""

    kind = "pattern"

    @property
    def heads(self) -> list[int]:
        return list(self.array.attrs["heads"])

    @property
    def n_rows(self) -> int:
        return int(self.store.layout["n_pattern_rows"])

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n_rows, len(self.heads))

    def _unit_len(self, unit: Unit) -> int:
        return unit.n_pattern_rows

    def _unit_first_row(self, unit: Unit) -> int:
        return unit.pattern_row_start

    def read_prompt(self, prompt: int) -> np.ndarray:
        """Packed rows of one prompt, as stored."""
        self.store.prompt_range(prompt)
        p = prompt % self.store.n_prompts
        return self.read(int(self.store.pattern_offsets[p]), int(self.store.pattern_offsets[p + 1]))

    def prompt(self, prompt: int, as_torch: bool = False):
        """Dense [head, kept query, key] pattern of one prompt; zeros above the diagonal."""
        packed = self.store.dtype.to_torch(self.read_prompt(prompt))
        r = self.store.prompt_range(prompt)
        queries = torch.from_numpy(self.store.positions(r.start, r.stop).astype(np.int64))
        length = int(self.store.group["prompt_length"][prompt % self.store.n_prompts])
        dense = torch.zeros(len(self.heads), len(queries), length, dtype=packed.dtype)
        q_index = torch.repeat_interleave(torch.arange(len(queries)), queries + 1)
        k_index = torch.cat([torch.arange(int(q) + 1) for q in queries]) if len(queries) else q_index
        dense[:, q_index, k_index] = packed.T
        return dense if as_torch else self.store.dtype.to_numpy(_storage_view(dense, self.store.dtype))


class TorchView:
    """`hook.torch()[a:b]` -> torch tensor in the stored dtype."""

    def __init__(self, hook: HookArray):
        self.hook = hook

    @property
    def shape(self) -> tuple[int, ...]:
        return self.hook.shape

    def __getitem__(self, key) -> torch.Tensor:
        start, stop = _slice_bounds(key, self.hook.n_rows)
        out = self.hook.store.dtype.to_torch(self.hook.read(start, stop))
        return out[0] if isinstance(key, (int, np.integer)) else out

    def prompt(self, prompt: int) -> torch.Tensor:
        if isinstance(self.hook, PatternArray):
            return self.hook.prompt(prompt, as_torch=True)
        return self[self.hook.store.prompt_range(prompt)]


def _as_float32(stored: np.ndarray, dtype: StoreDtype) -> np.ndarray:
    """One chunk's stored values as float32 (exact for float16 and bfloat16)."""
    return dtype.to_numpy(stored).astype(np.float32, copy=False)


def _storage_view(x: torch.Tensor, dtype: StoreDtype) -> np.ndarray:
    return dtype.to_storage(x.contiguous())


def _bounds(start: int, stop: int | None, n: int) -> tuple[int, int]:
    return _slice_bounds(slice(start, stop), n)


def _slice_bounds(key, n: int) -> tuple[int, int]:
    if isinstance(key, (int, np.integer)):
        index = int(key) + n if key < 0 else int(key)
        if not 0 <= index < n:
            raise StoreIndexError(f"row {key} out of range for {n} rows")
        return index, index + 1
    if isinstance(key, slice):
        start, stop, step = key.indices(n)
        if step != 1:
            raise StoreError("store slices must be contiguous (step 1); index the result for strides")
        return start, max(start, stop)
    raise StoreError(f"index the flat token axis with an int or a slice, not {type(key).__name__}; "
                     "use .prompt(i) for a prompt")


def _read_logical(store: ActivationStore, name: str, start: int, stop: int, pattern: bool,
                  read_unit, check_commit: bool = True) -> np.ndarray:
    """Rows [start, stop) of a flat axis, gathered unit by unit with `read_unit(unit, lo, hi)`."""
    starts = store._pattern_starts if pattern else store._token_starts
    first = max(0, int(np.searchsorted(starts, start, side="right")) - 1)
    committed = store.committed if check_commit else None
    parts = []
    for unit in store.units[first:]:
        unit_start = unit.pattern_start if pattern else unit.token_start
        unit_len = unit.n_pattern_rows if pattern else unit.n_tokens
        if unit_start >= stop:
            break
        lo, hi = max(start, unit_start) - unit_start, min(stop, unit_start + unit_len) - unit_start
        if hi <= lo:
            continue
        if committed is not None and not committed[unit.index]:
            raise UnitNotCommittedError(
                f"{name}: rows {start}:{stop} touch work unit {unit.index}, which the dump has not "
                "committed yet; finish it with `microscope dump ... --resume`")
        parts.append(read_unit(unit, lo, hi))
    return np.concatenate(parts) if parts else read_unit(store.units[0], 0, 0)


def _feature_dims(name: str, shape: tuple[int, ...], used: dict[str, int]) -> tuple[str, ...]:
    """Dimension names for a hook's features, semantic where sizes agree, else unique per hook."""
    wanted = feature_dim_names(name)
    if len(wanted) != len(shape) or any(used.get(d, s) != s for d, s in zip(wanted, shape)):
        wanted = tuple(f"{name}:{i}" for i in range(len(shape)))
    used.update(zip(wanted, shape))
    return wanted
