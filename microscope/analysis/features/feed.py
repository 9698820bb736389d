"""Training batches from an activation store: an endless, seeded, resumable stream of token rows.

    feed = StoreFeed(store, "blocks.1.hook_resid_post", batch_size=1024, seed=0)
    for step, (x, y) in feed.from_step(0):      # x: inputs [batch, d_in]; y: targets (x itself for an SAE)
        ...

Epoch e is `store.batches(..., seed=seed + e, drop_last=True)`: shuffled within a bounded buffer
of chunks, every kept token once (local folder or fsspec URL alike). Global batch g is batch
g mod `batches_per_epoch` of epoch g // `batches_per_epoch`. Under data parallelism rank r of W
takes global batches step * W + r, so a run resumed at any step with the same world size sees
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from microscope.errors import AnalysisInputError


class StoreFeed:
    """Rows of `hook` (and `target`, for a transcoder) from `store`, in float32."""

    def __init__(self, store, hook: str, batch_size: int, *, target: str | None = None, seed: int = 0,
                 buffer_chunks: int = 8):
        for name in (hook, target or hook):
            if name not in store:
                raise AnalysisInputError(f"{name!r} is not in the store {store.path}; it holds: "
                                         f"{', '.join(store.hooks)}")
            if len(store[name].feature_shape) != 1:
                raise AnalysisInputError(f"{name} has rows of shape {store[name].feature_shape}; "
                                         "dictionaries train on flat [token, width] hooks")
        if batch_size > store.n_tokens:
            raise AnalysisInputError(f"batch size {batch_size} exceeds the store's {store.n_tokens} tokens")
        self.store, self.hook, self.target = store, hook, target or hook
        self.batch_size, self.seed, self.buffer_chunks = batch_size, seed, buffer_chunks

    @property
    def batches_per_epoch(self) -> int:
        return self.store.n_tokens // self.batch_size

    @property
    def d_in(self) -> int:
        return self.store[self.hook].feature_shape[0]

    @property
    def d_out(self) -> int:
        return self.store[self.target].feature_shape[0]

    def _epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        names = list(dict.fromkeys([self.hook, self.target]))
        for batch in self.store.batches(names, self.batch_size, seed=self.seed + epoch,
                                        buffer_chunks=self.buffer_chunks, drop_last=True):
            yield batch[self.hook].float(), batch[self.target].float()

    def global_batches(self, start: int = 0, stride: int = 1) -> Iterator[tuple[int, tuple]]:
        """(g, (x, y)) for global batches g = start, start + stride, ... without end. Batches
        before `start` in its epoch are read and dropped (the price of an exact resume)."""
        epoch = start // self.batches_per_epoch
        g, target = epoch * self.batches_per_epoch, start
        while True:
            for batch in self._epoch(epoch):
                if g == target:
                    yield g, batch
                    target += stride
                g += 1
            epoch += 1

    def steps(self, first_step: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, tuple]]:
        """(step, (x, y)): this rank's batch of every step from `first_step` on."""
        for g, batch in self.global_batches(first_step * world_size + rank, world_size):
            yield g // world_size, batch
