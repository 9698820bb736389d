"""Device-to-host transfer of captured activations: a ring of pinned host buffers fed on a side stream.

    ring = TransferRing({name: (max_rows, width)}, torch.float16, deliver=write, budget_bytes=2 << 30)
    with ring:
        for batch in batches:
            ring.begin(batch.token_index)         # claims a host slot; blocks while every slot is busy
            model(...)                             # each hook calls ring.stage(name, activation)
            ring.end(tag=batch)                    # hands finished batches to `deliver`, in order
    # leaving the block waits for the last copies and delivers them

On CUDA, `stage` gathers and casts the kept rows into the device's `StagingBuffer` (one Triton
kernel on the compute stream) and queues that hook's device-to-host copy on a side stream, ordered
by events, so the copy of layer l overlaps the compute of layer l+1. Each device of a `device_map`
model stages its own hooks on its own buffer and side stream. A slot is delivered once the events
of all its copies have completed; the next forward's gather into a segment waits (on the device,
not the host) for the previous copy out of it.

Memory: host slots hold one forward each (`slot_bytes` = sum of max_rows x width x itemsize), and
`budget_bytes // slot_bytes` of them exist at most; `begin` blocks while all are in flight or held
by the consumer (back-pressure). Each device holds one staging buffer of `slot_bytes` more.

`deliver(HostBatch)` runs on the thread calling begin/end/close. The slot returns to the ring when
`HostBatch.release()` is called (from any thread, e.g. a writer pool after writing the rows).

CPU tensors take the same calls: `stage` gathers straight into the host slot and `end` delivers at
once (a synchronous pass-through), so tests exercise the interface the GPU path uses.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from microscope.activations.gather import StagingBuffer


@dataclass
class HostBatch:
    """One forward's captured rows on the host. `rows[name]` is [N, width] in the storage dtype
    (pinned on CUDA machines), valid until `release()`; `fp16_overflow[name]` counts finite values
    that became inf in the float16 cast (0 for other dtypes)."""

    tag: Any
    rows: dict[str, torch.Tensor]
    fp16_overflow: dict[str, int]
    release: Callable[[], None]


@dataclass
class _Slot:
    index: int
    host: StagingBuffer
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    device_counts: dict[torch.device, torch.Tensor] = field(default_factory=dict)  # pinned, per device
    events: list = field(default_factory=list)     # side-stream events: the slot's copies are done
    keep: list = field(default_factory=list)       # device tensors a queued copy still reads
    tag: Any = None
    held: bool = False


class TransferRing:
    """Pinned host slots, one forward each; see the module docstring for the protocol."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype,
                 deliver: Callable[[HostBatch], None], budget_bytes: int = 1 << 30,
                 pin_memory: bool | None = None):
        self.shapes = {name: (int(r), int(w)) for name, (r, w) in shapes.items()}
        self.dtype, self.deliver = dtype, deliver
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self.slot_bytes = sum(r * w for r, w in self.shapes.values()) * itemsize
        self.n_slots = budget_bytes // max(1, self.slot_bytes)
        if self.n_slots < 1:
            raise ValueError(f"a transfer budget of {budget_bytes} bytes is less than one forward's rows "
                             f"({self.slot_bytes} bytes): raise the budget or lower the token budget per batch")
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._slots: list[_Slot] = []
        self._free: deque[_Slot] = deque()
        self._in_flight: deque[_Slot] = deque()
        self._cond = threading.Condition()
        self._current: _Slot | None = None
        self._indices: dict[str | None, torch.Tensor] = {}
        self._device_index: dict[tuple[str | None, torch.device], torch.Tensor] = {}
        self._staging: dict[torch.device, StagingBuffer] = {}
        self._side: dict[torch.device, torch.cuda.Stream] = {}
        self._copied: dict[tuple[torch.device, str], torch.cuda.Event] = {}

    # -- producer side: the thread running the model --------------------------------------------

    def begin(self, index: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
        """Start a forward. index: LongTensor[N] into the flattened B*T axis for every hook, or a
        mapping hook name -> index (e.g. packed attention-pattern rows); key None is the default."""
        if self._current is not None:
            raise RuntimeError("begin() called twice without end(): call end() after each forward")
        self._indices = {None: index} if isinstance(index, torch.Tensor) else dict(index)
        self._device_index = {}
        self._current = self._claim()

    def stage(self, name: str, activation: torch.Tensor) -> None:
        """From a hook: capture `activation` [B, T, *F] rows of this forward for hook `name`."""
        slot = self._current
        if slot is None:
            raise RuntimeError(f"hook {name} fired outside begin()/end(): call ring.begin(index) before the forward")
        device = activation.device
        index = self._index_for(name, device)
        if device.type != "cuda":
            slot.rows[name] = slot.host.stage(name, activation, index)
            return
        host_rows = slot.host.segment(name, index.numel())
        compute = torch.cuda.current_stream(device)
        previous_copy = self._copied.get((device, name))
        if previous_copy is not None:
            compute.wait_event(previous_copy)   # the segment's last copy out must finish first
        rows = self._staging_on(device).stage(name, activation, index)
        side = self._side_on(device)
        side.wait_event(compute.record_event())
        with torch.cuda.stream(side):
            host_rows.copy_(rows, non_blocking=True)
        self._copied[(device, name)] = side.record_event()
        slot.rows[name] = host_rows
        slot.device_counts.setdefault(device, None)

    def end(self, tag: Any = None) -> None:
        """The forward is done: queue the slot; hand every batch whose copies finished to `deliver`."""
        slot = self._current
        if slot is None:
            raise RuntimeError("end() without begin()")
        slot.tag = tag
        for device in list(slot.device_counts):
            slot.device_counts[device] = self._copy_counts(device, slot)
        self._current = None
        self._in_flight.append(slot)
        self._deliver(wait=False)

    def close(self) -> None:
        """Wait for every queued copy and deliver the remaining batches in order."""
        if self._current is not None:
            raise RuntimeError("close() inside a forward: call end() first")
        self._deliver(wait=True)

    def __enter__(self) -> TransferRing:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        self._current = None             # an error: let the copies finish, deliver nothing more
        for slot in self._in_flight:
            for event in slot.events:
                event.synchronize()
        self._in_flight.clear()

    @property
    def outstanding(self) -> int:
        """Slots in use: being filled, in flight, or delivered and not yet released."""
        with self._cond:
            return len(self._slots) - len(self._free)

    # -- internals ------------------------------------------------------------------------------

    def _claim(self) -> _Slot:
        """A free slot, allocating up to `n_slots`; otherwise deliver or wait for a release."""
        while True:
            with self._cond:
                if self._free:
                    slot = self._free.popleft()
                    break
                if len(self._slots) < self.n_slots:
                    slot = _Slot(len(self._slots), StagingBuffer(self.shapes, self.dtype, "cpu", self.pin))
                    self._slots.append(slot)
                    break
                if not self._in_flight:
                    self._cond.wait()    # every slot is held by the consumer: wait for a release
                    continue
            self._deliver(wait=True, limit=1)
        slot.rows, slot.device_counts, slot.events, slot.keep, slot.tag = {}, {}, [], [], None
        slot.host.reset_overflow()
        slot.held = True
        return slot

    def _release(self, slot: _Slot) -> None:
        with self._cond:
            if not slot.held:
                raise RuntimeError("HostBatch.release() called twice")
            slot.held = False
            self._free.append(slot)
            self._cond.notify_all()

    def _deliver(self, wait: bool, limit: int | None = None) -> None:
        """Hand finished slots to `deliver`, oldest first; `wait` blocks on their copies."""
        delivered = 0
        while self._in_flight and (limit is None or delivered < limit):
            slot = self._in_flight[0]
            if not wait and not all(event.query() for event in slot.events):
                return
            for event in slot.events:
                event.synchronize()
            self._in_flight.popleft()
            slot.keep = []
            counts = slot.host.overflow.clone()
            for device_counts in slot.device_counts.values():
                counts += device_counts
            names = list(self.shapes)
            overflow = {name: int(counts[i]) for i, name in enumerate(names) if name in slot.rows}
            self.deliver(HostBatch(slot.tag, slot.rows, overflow, lambda slot=slot: self._release(slot)))
            delivered += 1

    def _copy_counts(self, device: torch.device, slot: _Slot) -> torch.Tensor:
        """Queue the device's fp16 overflow counters to the host and zero them for the next forward."""
        staging = self._staging_on(device)
        compute = torch.cuda.current_stream(device)
        counts = staging.overflow.clone()
        staging.reset_overflow()
        side = self._side_on(device)
        side.wait_event(compute.record_event())
        host_counts = torch.empty_like(counts, device="cpu", pin_memory=self.pin)
        with torch.cuda.stream(side):
            host_counts.copy_(counts, non_blocking=True)
        slot.keep.append(counts)
        slot.events.append(side.record_event())
        return host_counts

    def _index_for(self, name: str, device: torch.device) -> torch.Tensor:
        key = name if name in self._indices else None
        if key not in self._indices:
            raise KeyError(f"no index for hook {name}: pass begin() one index, or a mapping with an entry "
                           "for it (or a None entry as the default)")
        if (key, device) not in self._device_index:
            self._device_index[(key, device)] = self._indices[key].to(device, non_blocking=True)
        return self._device_index[(key, device)]

    def _staging_on(self, device: torch.device) -> StagingBuffer:
        if device not in self._staging:
            self._staging[device] = StagingBuffer(self.shapes, self.dtype, device)
        return self._staging[device]

    def _side_on(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._side:
            self._side[device] = torch.cuda.Stream(device)
        return self._side[device]
