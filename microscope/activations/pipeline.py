"""The dump pipeline: batches packed by token budget, the forward loop that captures them unit by
unit (`capture_units`), and a bounded background writer.

While the model runs batch k+1, a small thread pool writes the finished units (one task per hook,
each writing whole chunks) and sets the unit's commit marker after its last hook. The staging bytes
waiting to be written are bounded by `max_pending_bytes`: `submit` blocks when the disk is slower
than the model (back-pressure), so memory stays bounded. A write error (a full disk) stops the
pipeline; units committed before it stay valid.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import zarr

from microscope.activations.capture import BufferPool, Capture, UnitStaging, make_batch
from microscope.activations.units import Unit, mark_committed
from microscope.activations.schema import StorePlan
from microscope.activations.writer import write_hook
from microscope.errors import DiskFullError
from microscope.models.anatomy import pad_id


def pack_batches(plan: StorePlan, unit: Unit, batch_tokens: int) -> list[tuple[int, int]]:
    """Split a unit's prompts, in order, into [start, stop) prompt ranges whose padded size
    (prompts x longest) stays within `batch_tokens` (a longer prompt runs alone). Depends on the
    unit only, so a unit is computed identically whichever rank or run takes it."""
    batches = []
    start = unit.prompt_start
    while start < unit.prompt_stop:
        stop, longest = start, 0
        while stop < unit.prompt_stop:
            longest_next = max(longest, len(plan.prompt_tokens[stop]))
            if stop > start and (stop - start + 1) * longest_next > batch_tokens:
                break
            longest, stop = longest_next, stop + 1
        batches.append((start, stop))
        start = stop
    return batches


class ForwardDone(Exception):
    """Raised by the capture hook once every requested hook fired: skips the rest of the model."""


def capture_units(scope, plan: StorePlan, unit_indices: Iterable[int], batch_tokens: int, pool: BufferPool,
                  on_batch: Callable[[int], None] | None = None) -> Iterator[UnitStaging]:
    """Run every batch of the given units through `scope` with the capture hooks on; yield each
    unit's staging once its batches have run (its device-to-host copies may still be in flight:
    `staging.done_events`). `on_batch(tokens)` follows every forward with its unpadded token count."""
    device = scope.device
    pad = pad_id(scope.config)
    capture = Capture(plan, stop=ForwardDone)
    with torch.inference_mode(), scope.hooks(capture.fns()):
        for index in unit_indices:
            unit = plan.units[index]
            staging = UnitStaging(plan, unit, pool)
            for start, stop in pack_batches(plan, unit, batch_tokens):
                batch = make_batch(plan, unit, start, stop, pad)
                capture.start(batch, staging)
                try:
                    scope.model(input_ids=batch.input_ids.to(device, non_blocking=True),
                                attention_mask=batch.attention_mask.to(device, non_blocking=True),
                                use_cache=False)
                except ForwardDone:
                    pass
                capture.finish()
                if on_batch is not None:
                    on_batch(batch.n_tokens)
            staging.done_events = capture.copies.done()
            yield staging


class BackgroundWriter:
    """Writes staged units to the store in background threads; `submit` applies back-pressure."""

    def __init__(self, group: zarr.Group, plan: StorePlan, max_pending_bytes: int = 1 << 30,
                 threads: int = 2):
        self.group, self.plan = group, plan
        # Opened once (opening an array reads its metadata from the store every time), with
        # write_empty_chunks: a run-time setting, not stored, without which zarr compares every
        # chunk with the fill value before writing it.
        self.arrays = {spec.name: (spec, group[spec.path].with_config({"write_empty_chunks": True}))
                       for spec in plan.hooks}
        self.committed = group["committed"]
        self.max_pending_bytes = max_pending_bytes
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="store-writer")
        self.cond = threading.Condition()
        self.pending_bytes = 0
        self.bytes_written = 0
        self.units_committed = 0
        self.error: BaseException | None = None

    def submit(self, staging: UnitStaging) -> None:
        """Queue a unit whose batches have all run; blocks while too many bytes are pending."""
        size = staging.nbytes
        with self.cond:
            # One unit is always admitted, even when larger than the bound.
            self.cond.wait_for(lambda: self.error is not None or self.pending_bytes == 0
                               or self.pending_bytes + size <= self.max_pending_bytes)
            self._raise_if_failed()
            self.pending_bytes += size
        remaining = [len(staging.buffers), False]     # hooks left to write, whether one failed
        for name in staging.buffers:
            self.pool.submit(self._write, staging, name, remaining)

    def _write(self, staging: UnitStaging, name: str, remaining: list) -> None:
        buffer = staging.buffers[name]
        size = buffer.numel() * buffer.element_size()
        try:
            if self.error is not None:
                return
            for event in staging.done_events:
                event.synchronize()
            spec, array = self.arrays[name]
            write_hook(array, spec, staging.unit, staging.rows[name], self.plan.dtype.to_storage(buffer))
            with self.cond:
                self.bytes_written += size
                remaining[0] -= 1
                # a unit whose every hook was written commits, whatever happened to other units
                last = remaining[0] == 0 and not remaining[1]
            if last:
                mark_committed(self.committed, staging.unit)
                with self.cond:
                    self.units_committed += 1
        except BaseException as err:  # surfaced to the main thread by submit()/close()
            with self.cond:
                remaining[1] = True
                if self.error is None:
                    self.error = _describe(err, staging.unit, name)
        finally:
            staging.release(name)
            with self.cond:
                self.pending_bytes -= size
                self.cond.notify_all()

    def close(self) -> None:
        """Wait for every queued write; raise the first write error, if any."""
        self.pool.shutdown(wait=True)
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without waiting for queued writes to be useful (after an error in the main thread)."""
        with self.cond:
            if self.error is None:
                self.error = RuntimeError("dump aborted")
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


def _describe(err: BaseException, unit: Unit, hook: str) -> BaseException:
    """Turn a full disk into a clear error; pass anything else through."""
    full = err
    while full is not None and not (isinstance(full, OSError) and full.errno in (errno.ENOSPC, errno.EDQUOT)):
        full = full.__cause__ or full.__context__
    if full is None:
        return err
    disk_full = DiskFullError(
        errno.ENOSPC, f"the store ran out of space while writing hook {hook} of work unit {unit.index}. "
        "Every unit committed before stays readable; free space (or move the store) and rerun with --resume")
    disk_full.__cause__ = err
    return disk_full
