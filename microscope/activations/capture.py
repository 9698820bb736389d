"""Capture: hook functions that copy only the kept tokens of a batch into a unit's staging buffers.

For each forward batch the hooks gather the rows to keep (padding dropped, positions mode applied),
cast them to the store dtype in one step (`gather.gather_into`, counting fp16 overflows) and copy them into the unit's
host staging block at the batch's row offset. Attention patterns `[batch, head, q, k]` are gathered
as packed lower triangles: one row per kept query q and key k <= q, one column per head kept.

On CUDA the gather runs on the device and `HostCopies` queues each hook's device-to-host copy into
the unit's pinned buffer on a side stream, so the copy of layer l overlaps the compute of layer
l+1; the unit's `done_events` tell the writer when its rows have landed. On CPU the hooks gather
straight into the host rows (the same calls, synchronous).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from microscope.activations.gather import count_fp16_overflow, gather_into, gather_rows, has_non_finite
from microscope.activations.units import Unit
from microscope.activations.schema import StorePlan, StoredHook, hook_rows
from microscope.errors import Fp16OverflowError


@dataclass
class Batch:
    """One forward batch inside a unit: prompts [prompt_start, prompt_stop), right-padded.

    `token_index` indexes the flattened [B*T] axis (kept tokens, in store order) and fills
    unit rows [row_start, row_start + len); `pattern_index` indexes the flattened [B*T*T] axis
    (kept query q, key k <= q) and fills unit pattern rows from `pattern_row_start`."""

    unit: Unit
    prompt_start: int
    prompt_stop: int
    input_ids: torch.Tensor        # [B, T] int64
    attention_mask: torch.Tensor   # [B, T] int64
    token_index: torch.Tensor      # [N] int64
    row_start: int
    pattern_index: torch.Tensor    # [M] int64 (empty when no pattern hooks)
    pattern_row_start: int
    every_row: bool = False        # token_index is arange(B*T): no padding, every position kept

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def make_batch(plan: StorePlan, unit: Unit, prompt_start: int, prompt_stop: int, pad_id: int) -> Batch:
    """Pad prompts [prompt_start, prompt_stop) of `unit` to one batch and index its kept rows."""
    prompts = range(prompt_start, prompt_stop)
    length = max(len(plan.prompt_tokens[p]) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    token_index, pattern_index = [], []
    every_row = True
    for b, p in enumerate(prompts):
        tokens = plan.prompt_tokens[p]
        ids[b, :len(tokens)] = torch.from_numpy(tokens.astype(np.int64))
        mask[b, :len(tokens)] = 1
        kept = plan.kept[p].astype(np.int64)
        every_row = every_row and len(kept) == length   # kept is sorted and unique: all positions
        token_index.append(b * length + kept)
        if plan.has_patterns and len(kept):
            queries = np.repeat(kept, kept + 1)
            keys = np.concatenate([np.arange(q + 1) for q in kept])
            pattern_index.append((b * length + queries) * length + keys)
    return Batch(unit, prompt_start, prompt_stop, ids, mask,
                 torch.from_numpy(np.concatenate(token_index)),
                 int(plan.kept_offsets[prompt_start] - unit.token_start),
                 torch.from_numpy(np.concatenate(pattern_index) if pattern_index else np.zeros(0, np.int64)),
                 int(plan.pattern_offsets[prompt_start] - unit.pattern_start), every_row)


class BufferPool:
    """Host staging buffers reused from unit to unit, by shape and dtype (thread-safe).

    A fresh buffer costs a page fault per 4 KB page on first touch (a pinned one far more: pinning
    allocates page-locked memory); a written unit's buffers stage a later unit."""

    def __init__(self, pin: bool = False):
        self.pin = pin
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._free.get((tuple(shape), dtype))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault((tuple(buffer.shape), buffer.dtype), []).append(buffer)


class UnitStaging:
    """Host buffers for one unit: per hook a [whole-chunk rows, width] tensor in the store dtype.

    Taken from `pool` (pinned when the model runs on CUDA, so device-to-host copies overlap the
    next batch); `release(hook)` hands a written buffer back to it."""

    def __init__(self, plan: StorePlan, unit: Unit, pool: BufferPool | None = None):
        self.unit = unit
        self.pool = pool or BufferPool()
        self.rows = {h.name: hook_rows(h, unit, plan.chunk_rows, plan.pattern_chunk_rows) for h in plan.hooks}
        self.buffers: dict[str, torch.Tensor] = {}
        for hook in plan.hooks:
            rows = self.rows[hook.name]
            buf = self.pool.take((rows.stop - rows.start, hook.width), plan.dtype.torch_dtype)
            used = unit.n_pattern_rows if hook.is_pattern else unit.n_tokens
            buf[used:] = 0          # tail rows of the last chunk: no prompt, written as zeros
            self.buffers[hook.name] = buf
        self.done_events: list[torch.cuda.Event] = []   # the unit's device-to-host copies are done

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def release(self, hook: str) -> None:
        """The hook's rows are written (or abandoned): its buffer may stage another unit."""
        self.pool.give(self.buffers[hook])


class HostCopies:
    """Device-to-host copies of gathered rows: on CUDA queued on one side stream per device, after
    the work already queued on its compute stream; elsewhere a plain synchronous copy."""

    def __init__(self):
        self._side: dict[torch.device, torch.cuda.Stream] = {}
        self._used: set[torch.device] = set()

    def copy(self, rows: torch.Tensor, target: torch.Tensor) -> None:
        """Copy `rows` [N, W] into the host rows `target` [N, W] (pinned for an asynchronous copy)."""
        if rows.device.type != "cuda":
            target.copy_(rows)
            return
        side = self._side.get(rows.device)
        if side is None:
            side = self._side[rows.device] = torch.cuda.Stream(rows.device)
        side.wait_stream(torch.cuda.current_stream(rows.device))
        with torch.cuda.stream(side):
            target.copy_(rows, non_blocking=True)
        rows.record_stream(side)    # the allocator keeps `rows` until the side stream has read it
        self._used.add(rows.device)

    def done(self) -> list[torch.cuda.Event]:
        """One event per device copied from since the last call, completing after its last copy."""
        events = []
        for device in self._used:
            event = torch.cuda.Event()
            event.record(self._side[device])
            events.append(event)
        self._used.clear()
        return events


class Capture:
    """The hook functions of one dump: `fns()` for `scope.hooks(...)`; set `.batch`/`.staging` per forward."""

    def __init__(self, plan: StorePlan, stop: type[Exception] | None = None):
        self.plan = plan
        self.specs = {h.name: h for h in plan.hooks}
        self.stop = stop            # raised once every hook fired: the rest of the model is skipped
        self.batch: Batch | None = None
        self.staging: UnitStaging | None = None
        self.fired: set[str] = set()
        self._device_index: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.overflow: dict[str, torch.Tensor | int] = {}   # per hook: fp16 values that became inf
        self.copies = HostCopies()

    def fns(self) -> dict:
        return {name: self._capture for name in self.specs}

    def start(self, batch: Batch, staging: UnitStaging) -> None:
        self.batch, self.staging = batch, staging
        self.fired = set()
        self._device_index = {}
        self.overflow = {}

    def finish(self) -> None:
        """After a forward: every hook fired, and no fp16 cast overflowed (|x| > 65504 -> inf)."""
        missing = set(self.specs) - self.fired
        if missing:
            raise RuntimeError(f"hooks {sorted(missing)} did not fire during the forward pass")
        overflowed = {name: int(count) for name, count in self.overflow.items() if int(count)}
        if overflowed:
            batch = self.batch
            raise Fp16OverflowError(
                f"prompts {batch.prompt_start}..{batch.prompt_stop - 1}: activations beyond the float16 "
                f"range (65504) in {', '.join(f'{n} ({c} values)' for n, c in overflowed.items())} would "
                "be stored as inf. Dump with --dtype bf16 or --dtype fp32.")

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's index tensors on `device` (layers may sit on different GPUs)."""
        if device not in self._device_index:
            self._device_index[device] = (self.batch.token_index.to(device, non_blocking=True),
                                          self.batch.pattern_index.to(device, non_blocking=True))
        return self._device_index[device]

    def _capture(self, activation: torch.Tensor, hook) -> None:
        spec: StoredHook = self.specs[hook.name]
        batch, dtype = self.batch, self.plan.dtype.torch_dtype
        token_index, pattern_index = self._indices(activation.device)
        if spec.is_pattern:
            heads = activation if len(spec.heads) == activation.shape[1] else activation[:, list(spec.heads)]
            b, h, t, _ = heads.shape
            source = heads.permute(0, 2, 3, 1).reshape(b, t * t, h)
            index, start = pattern_index, batch.pattern_row_start
        else:
            source, index, start = activation, token_index, batch.row_start
        target = self.staging.buffers[hook.name][start:start + len(index)]
        if source.device == target.device:
            # CPU: gather and cast straight into the staging rows; one min/max pass, and the exact
            # overflow count (which re-gathers in float32) only when a non-finite value is there.
            if batch.every_row and not spec.is_pattern and source.is_contiguous():
                target.copy_(source.view(len(index), -1))   # every row, in order: a plain cast
            else:
                gather_into(source, index, target)
            if dtype == torch.float16 and has_non_finite(target):
                count = count_fp16_overflow(gather_rows(source, index, torch.float32), target)
                self.overflow[hook.name] = self.overflow.get(hook.name, 0) + count
        else:
            # GPU: gather on the device (counting overflows in the same kernel), copy to pinned rows.
            overflow = None
            if dtype == torch.float16:
                overflow = self.overflow.setdefault(
                    hook.name, torch.zeros(1, dtype=torch.int32, device=source.device))
            rows = torch.empty(target.shape, dtype=dtype, device=source.device)
            self.copies.copy(gather_into(source, index, rows, overflow), target)
        self.fired.add(hook.name)
        if self.stop is not None and len(self.fired) == len(self.specs):
            raise self.stop()
