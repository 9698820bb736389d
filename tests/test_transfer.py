"""The capture pipeline's staging and transfer (capture.py, pipeline.py) on its CPU path: the same
calls the CUDA path takes, staging every unit's kept rows in order, counting fp16 overflows, and
keeping the bytes waiting for the writer within their bound. The CUDA path itself (side stream,
events, pinned memory) needs a GPU: benchmarks/gpu_capture.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import microscope
from microscope.activations import pipeline
from microscope.activations.capture import BufferPool, Capture, HostCopies, UnitStaging, make_batch
from microscope.activations.pipeline import BackgroundWriter, capture_units
from microscope.activations.planning import make_plan
from microscope.activations.schema import open_group
from microscope.activations.settings import DumpSettings
from microscope.activations.writer import create_store
from microscope.errors import Fp16OverflowError
from microscope.names import layer_names
from microscope.prompts import Prompt
from tests.test_store import synthetic_plan
from tests.test_store_fixtures import make_model_dir


def hook(name: str) -> SimpleNamespace:
    return SimpleNamespace(name=name)


def test_stages_every_unit_in_order_like_hidden_states(tmp_path):
    """capture_units on a tiny OPT: each unit's rows of resid_post equal output_hidden_states."""
    scope = microscope.load(str(make_model_dir(tmp_path / "model")))
    names = layer_names("resid_post", scope.config.num_hidden_layers)[:-1]  # the last gets HF's final norm
    prompts = [Prompt(" ".join(["stone river lamp"] * k)) for k in (1, 4, 2, 7, 3)]
    plan, _ = make_plan(scope, prompts, names, DumpSettings(dtype="fp32", chunk_rows=8))
    stagings = list(capture_units(scope, plan, range(len(plan.units)), 16, BufferPool()))
    assert [s.unit.index for s in stagings] == list(range(len(plan.units))) and len(stagings) > 1
    for staging in stagings:
        assert staging.done_events == []
        for p in staging.unit.prompts:
            ids = torch.from_numpy(plan.prompt_tokens[p].astype(np.int64))[None]
            with torch.no_grad():
                hidden = scope.model(input_ids=ids, output_hidden_states=True).hidden_states
            row = int(plan.kept_offsets[p] - staging.unit.token_start)
            for layer, name in enumerate(names):
                got = staging.buffers[name][row:row + ids.shape[1]]
                torch.testing.assert_close(got, hidden[layer + 1][0], rtol=1e-5, atol=1e-5)


def test_token_and_pattern_hooks_share_a_batch_on_their_own_row_axes():
    plan = synthetic_plan("bfloat16")
    unit = plan.units[0]
    staging = UnitStaging(plan, unit)
    batch = make_batch(plan, unit, unit.prompt_start, unit.prompt_stop, pad_id=1)
    b, t = batch.input_ids.shape
    tokens, z, pattern = torch.randn(b, t, 6), torch.randn(b, t, 2, 3), torch.rand(b, 2, t, t)
    capture = Capture(plan)
    capture.start(batch, staging)
    fns = capture.fns()
    fns["blocks.0.hook_resid_post"](tokens, hook("blocks.0.hook_resid_post"))
    fns["blocks.0.attn.hook_z"](z, hook("blocks.0.attn.hook_z"))
    fns["blocks.0.attn.hook_pattern"](pattern, hook("blocks.0.attn.hook_pattern"))
    capture.finish()
    n, m = len(batch.token_index), len(batch.pattern_index)
    assert torch.equal(staging.buffers["blocks.0.hook_resid_post"][:n],
                       tokens.reshape(b * t, 6)[batch.token_index].bfloat16())
    assert torch.equal(staging.buffers["blocks.0.attn.hook_z"][:n],
                       z.reshape(b * t, 6)[batch.token_index].bfloat16())
    packed = pattern.permute(0, 2, 3, 1).reshape(b * t * t, 2)[batch.pattern_index]
    assert torch.equal(staging.buffers["blocks.0.attn.hook_pattern"][:m], packed.bfloat16())


def test_fp16_overflow_is_counted_per_hook_and_refused():
    plan = synthetic_plan("float16", pattern=False)
    unit = plan.units[0]
    batch = make_batch(plan, unit, unit.prompt_start, unit.prompt_stop, pad_id=1)
    b, t = batch.input_ids.shape
    x = torch.randn(b, t, 6, generator=torch.Generator().manual_seed(0)) * 1e5
    capture = Capture(plan)
    capture.start(batch, UnitStaging(plan, unit))
    capture.fns()["blocks.0.hook_resid_post"](x, hook("blocks.0.hook_resid_post"))
    capture.fns()["blocks.0.attn.hook_z"](x.reshape(b, t, 2, 3) * 1e-5, hook("blocks.0.attn.hook_z"))
    expected = int((x.reshape(b * t, 6)[batch.token_index].abs() >= 65520).sum())
    assert expected > 0
    with pytest.raises(Fp16OverflowError, match=f"blocks.0.hook_resid_post \\({expected} values\\)") as err:
        capture.finish()
    assert "hook_z" not in str(err.value)


def test_host_copies_fall_back_to_a_plain_copy_off_cuda():
    copies, target = HostCopies(), torch.empty(3, 4, dtype=torch.float16)
    rows = torch.randn(3, 4).half()
    copies.copy(rows, target)
    assert torch.equal(target, rows) and copies.done() == []


def test_pending_bytes_stay_within_the_bound_while_the_disk_is_slow(tmp_path, monkeypatch):
    plan = synthetic_plan("float16", pattern=False)
    group = open_group(str(tmp_path / "s.zarr"), mode="w")
    n = len(plan.kept)
    create_store(group, plan, [""] * n, [{}] * n, [], {})
    unit_bytes = UnitStaging(plan, plan.units[0]).nbytes
    writer = BackgroundWriter(group, plan, max_pending_bytes=unit_bytes, threads=2)
    seen, lock = [], threading.Lock()
    write_hook = pipeline.write_hook

    def slow_write(*args):
        with lock:
            seen.append(writer.pending_bytes)
        time.sleep(0.01)
        write_hook(*args)

    monkeypatch.setattr(pipeline, "write_hook", slow_write)
    pool = BufferPool()
    for unit in plan.units:
        writer.submit(UnitStaging(plan, unit, pool))
    writer.close()
    assert writer.units_committed == len(plan.units) and writer.pending_bytes == 0
    assert max(seen) <= max(unit_bytes, max(UnitStaging(plan, u).nbytes for u in plan.units))


def test_misuse_gets_clear_errors():
    plan = synthetic_plan("float16", pattern=False)
    unit = plan.units[0]
    capture = Capture(plan)
    capture.start(make_batch(plan, unit, unit.prompt_start, unit.prompt_stop, pad_id=1), UnitStaging(plan, unit))
    with pytest.raises(RuntimeError, match="did not fire"):
        capture.finish()
