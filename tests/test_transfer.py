"""The transfer ring (microscope/activations/transfer.py) on its CPU fallback: the same calls the
CUDA path takes, delivering every forward's rows in order, with a bounded number of slots in use.
The CUDA path itself (side stream, events, pinned memory) needs a GPU: benchmarks/gpu_capture.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from microscope.activations.transfer import TransferRing
from tests.conftest import tiny_model


def forwards(n: int, seed: int = 0):
    """n fake forwards: (activation [B, T, 6], index of kept rows), kept counts varying, one empty."""
    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        x = torch.randn(3, 4, 6, generator=g)
        keep = torch.rand(12, generator=g) < (0.0 if k == 1 else 0.6)
        yield x, keep.nonzero().reshape(-1)


def test_delivers_every_forward_in_order_with_its_rows():
    delivered = []

    def deliver(batch):
        delivered.append((batch.tag, {k: v.clone() for k, v in batch.rows.items()}, batch.fp16_overflow))
        batch.release()

    cases = list(forwards(6))
    with TransferRing({"a": (12, 6), "b": (12, 6)}, torch.float16, deliver, budget_bytes=1 << 20) as ring:
        for k, (x, index) in enumerate(cases):
            ring.begin(index)
            ring.stage("a", x)
            ring.stage("b", x * 1e5)
            ring.end(tag=k)
    assert [tag for tag, _, _ in delivered] == list(range(6))
    for (tag, rows, overflow), (x, index) in zip(delivered, cases):
        flat = x.reshape(12, 6)[index]
        assert torch.equal(rows["a"], flat.half())
        assert torch.equal(rows["b"], (flat * 1e5).half())
        assert overflow == {"a": 0, "b": int(((flat * 1e5).abs() >= 65520).sum())}
    assert any(o["b"] > 0 for _, _, o in delivered)


def test_slots_in_use_stay_within_the_budget_while_the_consumer_is_slow():
    held, in_use, order = [], [], []
    lock = threading.Lock()

    def deliver(batch):
        order.append(batch.tag)
        with lock:
            held.append(batch)

    def slow_writer(stop):
        while not stop.is_set() or held:
            time.sleep(0.005)
            with lock:
                batch = held.pop(0) if held else None
            if batch is not None:
                batch.release()

    slot_bytes = 12 * 6 * 2
    ring = TransferRing({"a": (12, 6)}, torch.float16, deliver, budget_bytes=2 * slot_bytes + 5)
    assert ring.n_slots == 2 and ring.slot_bytes == slot_bytes
    stop = threading.Event()
    writer = threading.Thread(target=slow_writer, args=(stop,))
    writer.start()
    try:
        with ring:
            for k, (x, index) in enumerate(forwards(20, seed=1)):
                ring.begin(index)
                in_use.append(ring.outstanding)
                ring.stage("a", x)
                ring.end(tag=k)
    finally:
        stop.set()
        writer.join()
    assert order == list(range(20))
    assert max(in_use) == 2, "the producer waited for the writer instead of taking a third slot"
    assert ring.outstanding == 0


def test_one_index_per_hook_for_mixed_row_axes():
    got = {}
    ring = TransferRing({"tokens": (8, 4), "pattern": (20, 2)}, torch.bfloat16,
                        lambda b: (got.update(b.rows), b.release()))
    tokens, pattern = torch.randn(2, 4, 4), torch.randn(2, 16, 2)
    ring.begin({None: torch.tensor([0, 5]), "pattern": torch.tensor([1, 17, 30])})
    ring.stage("tokens", tokens)
    ring.stage("pattern", pattern)
    ring.end()
    assert torch.equal(got["tokens"], tokens.reshape(8, 4)[[0, 5]].bfloat16())
    assert torch.equal(got["pattern"], pattern.reshape(32, 2)[[1, 17, 30]].bfloat16())


def test_captures_a_real_model_forward_like_hidden_states():
    """Forward hooks on a tiny OPT's decoder layers stage resid_post; rows equal output_hidden_states."""
    model = tiny_model("pre_ln")
    layers = model.model.decoder.layers
    names = [f"blocks.{i}.hook_resid_post" for i in range(len(layers))]
    ids = torch.randint(3, 90, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    index = mask.reshape(-1).nonzero().reshape(-1)
    got = {}
    ring = TransferRing({n: (21, 32) for n in names}, torch.float32,
                        lambda b: (got.update({k: v.clone() for k, v in b.rows.items()}), b.release()))
    handles = [layer.register_forward_hook(
        lambda mod, args, out, name=name: ring.stage(name, out[0] if isinstance(out, tuple) else out))
        for layer, name in zip(layers, names)]
    try:
        with torch.no_grad(), ring:
            ring.begin(index)
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            ring.end()
    finally:
        for h in handles:
            h.remove()
    for i, name in enumerate(names):
        expected = hidden[i + 1].reshape(21, 32)[index]
        if i == len(names) - 1:
            continue  # HF applies the final LayerNorm to the last hidden state
        assert torch.equal(got[name], expected)
    assert got[names[-1]].shape == (len(index), 32)


def test_misuse_gets_clear_errors():
    ring = TransferRing({"a": (4, 2)}, torch.float16, lambda b: None)
    with pytest.raises(RuntimeError, match="call ring.begin"):
        ring.stage("a", torch.zeros(1, 4, 2))
    ring.begin(torch.tensor([0]))
    with pytest.raises(RuntimeError, match="begin\\(\\) called twice"):
        ring.begin(torch.tensor([0]))
    with pytest.raises(ValueError, match="raise the budget"):
        TransferRing({"a": (4096, 4096)}, torch.float16, lambda b: None, budget_bytes=1 << 20)
    batches = []
    ring2 = TransferRing({"a": (4, 2)}, torch.float16, batches.append)
    ring2.begin(torch.tensor([0]))
    ring2.stage("a", torch.zeros(1, 4, 2))
    ring2.end()
    batches[0].release()
    with pytest.raises(RuntimeError, match="twice"):
        batches[0].release()
