"""The storage layer on its own: plans of synthetic prompts written through the background writer,
read back through `open_store`, compared with the arrays that went in."""

from __future__ import annotations

import errno
import os

import dask.array
import numpy as np
import pytest
import torch
import zarr

from microscope.activations.capture import BufferPool, UnitStaging
from microscope.activations.layout import store_dtype
from microscope.activations.pipeline import BackgroundWriter
from microscope.activations.reader import open_store
from microscope.activations.schema import StorePlan, StoredHook, open_group
from microscope.activations.units import plan_units, round_up
from microscope.activations.writer import check_resume, create_store
from microscope.errors import DiskFullError, StoreCorruptError, StoreMismatchError, UnitNotCommittedError

CHUNK = 8


def synthetic_plan(dtype="float16", lengths=(5, 9, 3, 12, 7, 1, 4), last_only=False, pattern=True,
                   fingerprint=None):
    rng = np.random.default_rng(0)
    tokens = [rng.integers(4, 50, n).astype(np.int32) for n in lengths]
    kept = [np.array([n - 1]) if last_only else np.arange(n) for n in lengths]
    hooks = [StoredHook("blocks.0.hook_resid_post", (6,)), StoredHook("blocks.0.attn.hook_z", (2, 3))]
    if pattern:
        hooks.append(StoredHook("blocks.0.attn.hook_pattern", (2,), heads=(0, 1)))
    kept_counts = np.array([len(k) for k in kept])
    pattern_counts = np.array([int(np.sum(k + 1)) for k in kept]) if pattern else np.zeros(len(kept), int)
    units = plan_units(kept_counts, pattern_counts, unit_rows=2 * CHUNK, chunk_rows=CHUNK, pattern_chunk_rows=32)
    fp = fingerprint or {"model": "synthetic", "hooks": [h.name for h in hooks], "dtype": dtype}
    return StorePlan(hooks, store_dtype(dtype), tokens, kept, units, CHUNK, 32, fp)


def reference_values(plan):
    """Per hook, per prompt: the values the writer is given (deterministic from prompt and hook)."""
    out = {}
    for h_i, hook in enumerate(plan.hooks):
        per_prompt = []
        for p, kept in enumerate(plan.kept):
            n = int(np.sum(kept + 1)) if hook.is_pattern else len(kept)
            g = torch.Generator().manual_seed(1000 * h_i + p)
            per_prompt.append((torch.randn(n, hook.width, generator=g) * 3).to(plan.dtype.torch_dtype))
        out[hook.name] = per_prompt
    return out


def write_store(path, plan, units=None, store=None, values=None, threads=2):
    group = open_group(store if store is not None else str(path), mode="w")
    vocab = [f"tok{i}" for i in range(50)]
    create_store(group, plan, [f"prompt {i}" for i in range(len(plan.kept))],
                 [{"i": i} for i in range(len(plan.kept))], vocab, {"model": "synthetic"})
    values = values or reference_values(plan)
    writer = BackgroundWriter(group, plan, max_pending_bytes=1 << 12, threads=threads)
    pool = BufferPool()       # shared as in a dump: written units' buffers stage later ones
    for u in (plan.units if units is None else [plan.units[i] for i in units]):
        staging = UnitStaging(plan, u, pool)
        for hook in plan.hooks:
            start = 0
            for p in u.prompts:
                rows = values[hook.name][p]
                staging.buffers[hook.name][start:start + len(rows)] = rows
                start += len(rows)
        writer.submit(staging)
    writer.close()
    return group, values


def test_a_written_units_buffers_stage_a_later_unit_with_its_tail_rows_zeroed():
    plan = synthetic_plan()
    pool = BufferPool()
    first = UnitStaging(plan, plan.units[0], pool)
    for name, buffer in first.buffers.items():
        buffer.fill_(7)
        first.release(name)
    given = {(tuple(b.shape), b.data_ptr()) for b in first.buffers.values()}
    later = UnitStaging(plan, plan.units[0], pool)
    assert {(tuple(b.shape), b.data_ptr()) for b in later.buffers.values()} == given
    unit = plan.units[0]
    for hook in plan.hooks:
        used = unit.n_pattern_rows if hook.is_pattern else unit.n_tokens
        buffer = later.buffers[hook.name]
        assert used < len(buffer) and bool((buffer[used:] == 0).all())


def test_units_pack_whole_prompts_into_chunk_aligned_ranges():
    plan = synthetic_plan()
    covered = []
    for u in plan.units:
        assert u.row_start % CHUNK == 0 and u.pattern_row_start % 32 == 0
        assert u.n_tokens <= 2 * CHUNK or u.prompt_stop - u.prompt_start == 1
        covered += list(u.prompts)
    assert covered == list(range(len(plan.kept)))
    # no two units share a chunk: each unit starts where the previous one's whole chunks end
    for a, b in zip(plan.units, plan.units[1:]):
        assert b.row_start == a.row_start + round_up(a.n_tokens, CHUNK)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_bit_exact_for_every_dtype(tmp_path, dtype):
    plan = synthetic_plan(dtype)
    _, values = write_store(tmp_path / "s.zarr", plan)
    store = open_store(str(tmp_path / "s.zarr"))
    assert store.is_complete and store.hooks == [h.name for h in plan.hooks]
    assert store.dtypes["blocks.0.hook_resid_post"] == dtype
    for hook in plan.hooks:
        expected = torch.cat(values[hook.name])
        got = store[hook.name].torch()[:]
        assert got.dtype == plan.dtype.torch_dtype
        assert torch.equal(got.reshape(len(got), -1).view(torch.uint8), expected.view(torch.uint8))
        if hook.name == "blocks.0.attn.hook_z":
            assert store[hook.name].shape == (store.n_tokens, 2, 3)
        numpy_values = store[hook.name][:]
        assert np.array_equal(numpy_values.reshape(len(expected), -1), expected.float().numpy())


def test_slicing_by_token_range_and_prompt_crosses_units(tmp_path):
    plan = synthetic_plan()
    _, values = write_store(tmp_path / "s.zarr", plan)
    store = open_store(str(tmp_path / "s.zarr"))
    hook = "blocks.0.hook_resid_post"
    flat = torch.cat(values[hook]).float().numpy()
    assert store.n_tokens == len(flat) == sum(len(k) for k in plan.kept)
    for a, b in [(0, 3), (4, 30), (13, 41), (0, store.n_tokens), (40, 41)]:
        assert np.array_equal(store[hook][a:b], flat[a:b])
    assert np.array_equal(store[hook][-1], flat[-1])
    for p in range(len(plan.kept)):
        assert np.array_equal(store[hook].prompt(p), values[hook][p].float().numpy())
        assert store.tokens(p) == [f"tok{t}" for t in plan.prompt_tokens[p]]
        assert store.prompt_metadata(p) == {"i": p} and store.prompt_text(p) == f"prompt {p}"
    assert np.array_equal(store.positions(), np.concatenate(plan.kept))
    assert np.array_equal(store.prompt_ids(), np.repeat(np.arange(len(plan.kept)), [len(k) for k in plan.kept]))


def test_packed_pattern_expands_to_the_lower_triangle(tmp_path):
    plan = synthetic_plan(last_only=True)
    _, values = write_store(tmp_path / "s.zarr", plan)
    store = open_store(str(tmp_path / "s.zarr"))
    pattern = store["blocks.0.attn.hook_pattern"]
    for p, n in enumerate(len(t) for t in plan.prompt_tokens):
        dense = pattern.prompt(p)                 # [head, 1 kept query (the last), key]
        assert dense.shape == (2, 1, n)
        assert np.array_equal(dense[:, 0, :], values["blocks.0.attn.hook_pattern"][p].float().numpy().T)


def test_shuffled_batches_cover_every_token_once_and_depend_on_the_seed(tmp_path):
    plan = synthetic_plan()
    write_store(tmp_path / "s.zarr", plan)
    store = open_store(str(tmp_path / "s.zarr"))
    hook = "blocks.0.hook_resid_post"

    def rows(seed):
        return torch.cat(list(store.batches(hook, batch_size=5, seed=seed, buffer_chunks=2)))

    a, b, c = rows(0), rows(0), rows(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    ordered = store[hook].torch()[:]
    as_set = lambda t: sorted(map(tuple, t.float().tolist()))
    assert len(a) == len(ordered) and as_set(a) == as_set(ordered) == as_set(c)
    both = next(iter(store.batches([hook, "blocks.0.attn.hook_z"], batch_size=4, seed=0)))
    assert set(both) == {hook, "blocks.0.attn.hook_z"} and both[hook].shape == (4, 6)


def test_xarray_view_and_reprs(tmp_path):
    plan = synthetic_plan("bfloat16")
    _, values = write_store(tmp_path / "s.zarr", plan)
    store = open_store(str(tmp_path / "s.zarr"))
    ds = store.to_xarray()
    z = ds["blocks.0.attn.hook_z"]
    assert z.dims == ("token", "head", "d_head")
    assert np.array_equal(z.values.reshape(store.n_tokens, -1),
                          torch.cat(values["blocks.0.attn.hook_z"]).float().numpy())
    assert np.array_equal(ds["prompt_id"].values, store.prompt_ids())
    assert "blocks.0.hook_resid_post" in repr(store) and "bfloat16" in repr(store)
    assert "<table>" in store._repr_html_()


def test_xarray_means_of_an_fp16_store_are_float32_accurate(tmp_path):
    """The xarray view widens fp16 chunks to float32 as dask reads them, so its means agree with
    the float64 mean of the same stored values to float32 precision. The control: dask's mean of
    the very same float16 values, summed in float16, overflows to inf and misses by far more."""
    plan = synthetic_plan("float16", lengths=(500, 500, 500), pattern=False)
    g = torch.Generator().manual_seed(0)
    values = {h.name: [(torch.randn(len(k), h.width, generator=g) + 8).half() for k in plan.kept]
              for h in plan.hooks}
    write_store(tmp_path / "s.zarr", plan, values=values)
    store = open_store(str(tmp_path / "s.zarr"))
    hook = "blocks.0.hook_resid_post"
    view = store.to_xarray()[hook]
    stored = store[hook][:]
    exact = stored.astype(np.float64)
    tolerance = 1e-6 * np.abs(exact).mean()          # float32 rounding, well above its 6e-8
    assert view.dtype == np.float32 and stored.dtype == np.float16
    assert abs(float(view.mean()) - exact.mean()) < tolerance
    assert np.abs(view.mean("token").values - exact.mean(axis=0)).max() < tolerance
    in_float16 = dask.array.from_array(stored, chunks=view.data.chunks)
    with np.errstate(over="ignore"):
        assert not np.isfinite(in_float16.mean().compute())
    assert np.abs(in_float16.mean(axis=0).compute() - exact.mean(axis=0)).max() > 100 * tolerance


def test_uncommitted_units_are_refused_and_committed_ones_read(tmp_path):
    plan = synthetic_plan()
    _, values = write_store(tmp_path / "s.zarr", plan, units=[0])
    store = open_store(str(tmp_path / "s.zarr"))
    assert store.committed.tolist() == [True] + [False] * (len(plan.units) - 1)
    hook = "blocks.0.hook_resid_post"
    first = plan.units[0]
    assert np.array_equal(store[hook][:first.n_tokens],
                          torch.cat(values[hook][first.prompt_start:first.prompt_stop]).float().numpy())
    with pytest.raises(UnitNotCommittedError, match="unit 1"):
        store[hook][: first.n_tokens + 1]
    with pytest.raises(UnitNotCommittedError, match="unit 1"):
        next(iter(store.batches(hook, batch_size=4)))


def test_a_corrupted_chunk_is_detected_and_named(tmp_path):
    plan = synthetic_plan()
    write_store(tmp_path / "s.zarr", plan)
    chunk_file = tmp_path / "s.zarr" / "hooks" / "blocks.0.hook_resid_post" / "c" / "2" / "0"
    data = bytearray(chunk_file.read_bytes())
    data[10] ^= 0xFF
    chunk_file.write_bytes(bytes(data))
    store = open_store(str(tmp_path / "s.zarr"))
    unit = next(u for u in plan.units if u.row_start <= 2 * CHUNK < u.row_start + round_up(u.n_tokens, CHUNK))
    with pytest.raises(StoreCorruptError, match=rf"blocks.0.hook_resid_post, work unit {unit.index}.*chunk \[2\]"):
        store["blocks.0.hook_resid_post"][:]
    problems = store.verify()
    assert len(problems) == 1 and "blocks.0.hook_resid_post" in problems[0]


class FullDisk(zarr.storage.WrapperStore):
    """A store that refuses writes once `budget` bytes of chunk data were written (ENOSPC)."""

    def __init__(self, store, budget: int | list[int]):
        super().__init__(store)
        self.budget = budget if isinstance(budget, list) else [budget]   # shared by read-only copies

    def _with_store(self, store):
        return FullDisk(store, self.budget)

    async def set(self, key, value):
        if "/c/" in key and key.startswith("hooks/"):
            self.budget[0] -= len(value)
            if self.budget[0] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
        await self._store.set(key, value)


def test_a_full_disk_fails_cleanly_and_keeps_committed_units(tmp_path):
    plan = synthetic_plan(pattern=False)
    local = zarr.storage.LocalStore(str(tmp_path / "s.zarr"))
    with pytest.raises(DiskFullError, match="ran out of space.*--resume"):
        # one writer thread: units are written in order, so the disk fills during a later unit
        write_store(None, plan, store=FullDisk(local, budget=450), threads=1)
    store = open_store(str(tmp_path / "s.zarr"))
    done = store.committed
    assert 0 < done.sum() < len(plan.units)
    values = reference_values(plan)
    hook = "blocks.0.hook_resid_post"
    for u in plan.units:
        if done[u.index]:
            assert np.array_equal(store[hook][u.token_start:u.token_stop],
                                  torch.cat(values[hook][u.prompt_start:u.prompt_stop]).float().numpy())


def test_resume_refuses_other_settings_naming_each_difference(tmp_path):
    plan = synthetic_plan(fingerprint={"model": "a", "dtype": "float16", "hooks": ["x"]})
    group, _ = write_store(tmp_path / "s.zarr", plan, units=[])
    check_resume(group, {"model": "a", "dtype": "float16", "hooks": ["x"]}, "s.zarr")
    with pytest.raises(StoreMismatchError) as err:
        check_resume(group, {"model": "b", "dtype": "bfloat16", "hooks": ["x"]}, "s.zarr")
    assert "model: store has 'a', this run has 'b'" in str(err.value)
    assert "dtype: store has 'float16', this run has 'bfloat16'" in str(err.value)
    assert "hooks" not in str(err.value).split("(")[1].split(")")[0]
