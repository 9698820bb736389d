"""Gather and cast (microscope/activations/gather.py): the kept rows of an activation, in the
storage dtype, bit for bit what a per-row reference gives.

Every case runs on the torch path. The Triton kernel runs the same cases under the Triton
interpreter on CPU tensors: `test_triton_kernel_under_interpreter` reruns this module in a
subprocess with TRITON_INTERPRET=1 (it must be set before triton is imported), where the
`backend` fixture switches to "triton".
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from microscope.activations.gather import count_fp16_overflow, gather_into, gather_rows

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture
def backend() -> str:
    return "triton" if INTERPRETED else "torch"


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    # The interpreter's numpy casts warn on values that overflow to inf, which the tests plant.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        yield


def reference(x: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row by row, independent of the code under test: flat row i is x[i // T, i % T]."""
    t = x.shape[1]
    rows = [x[int(i) // t, int(i) % t].reshape(-1).to(dtype) for i in index]
    width = int(np.prod(x.shape[2:]))
    return torch.stack(rows) if rows else torch.empty((0, width), dtype=dtype)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit patterns, except that a NaN need only be a NaN (torch's own NaN bits vary)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    assert torch.equal(actual.view(INT_VIEW[actual.dtype])[~nan], expected.view(INT_VIEW[expected.dtype])[~nan])


def random_case(seed: int, features: tuple[int, ...], dtype: torch.dtype):
    """An activation [B, T, *F] with wide-ranging values (including inf, NaN and values past the
    float16 range) and the flat index of a random right-padded mask in which some prompt keeps
    nothing and some keeps a single token."""
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(2, 6, (), generator=g))
    t = int(torch.randint(1, 9, (), generator=g))
    x = torch.randn((b, t, *features), generator=g) * torch.exp2(torch.randint(-20, 20, (b, t, *features),
                                                                                generator=g).float())
    flat = x.view(-1)
    flat[:: max(1, flat.numel() // 3)] = float("nan")
    flat[1:: max(1, flat.numel() // 2)] = float("-inf")
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0], lengths[-1] = 0, min(1, t)            # an all-padding row, a single-token prompt
    mask = torch.arange(t)[None, :] < lengths[:, None]
    keep = mask & (torch.rand((b, t), generator=g) < 0.8)   # a positions mode drops a few more
    return x.to(dtype), keep.reshape(-1).nonzero().reshape(-1)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("features", [(12,), (3, 5), (), (33,)], ids=["d", "heads", "scalar", "odd"])
@pytest.mark.parametrize("source_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_rows_matches_per_row_reference(backend, seed, features, source_dtype, dtype):
    x, index = random_case(seed, features, source_dtype)
    assert_same_bits(gather_rows(x, index, dtype, backend=backend), reference(x, index, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(backend, dtype):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, 5, 4, 10, generator=g)
    index = torch.tensor([0, 3, 7, 8, 12, 14], dtype=torch.long)
    views = {
        "pos-major": base[:, :, 0].transpose(0, 1),           # [5, 6, 10], batch stride < pos stride
        "strided features": base[:, :, 1, ::3],                # feature stride 3
        "permuted heads": base.permute(0, 1, 3, 2),            # features that do not merge
        "sliced batch": base[1::2],
    }
    for name, x in views.items():
        assert not x.is_contiguous(), name
        assert_same_bits(gather_rows(x, index, dtype, backend=backend), reference(x, index, dtype))


def test_empty_index_gives_zero_rows(backend):
    x = torch.randn(2, 3, 8)
    out = gather_rows(x, torch.empty(0, dtype=torch.long), torch.bfloat16, backend=backend)
    assert out.shape == (0, 8) and out.dtype == torch.bfloat16


def test_bfloat16_bits_round_to_nearest_even(backend):
    """The uint16 view equals rounding of the float32 bits computed here with numpy: ties go to the
    even mantissa, a carry reaches the exponent, the largest floats round up to inf."""
    bits = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F7FFFFF, 0x7F7FFFFF, 0xFF7F8000,
                     0x00008000, 0x80018001, 0x7F800000, 0x40490FDB], dtype=np.uint32)
    rng = np.random.default_rng(0)
    bits = np.concatenate([bits, rng.integers(0, 2**32, 4000, dtype=np.uint32)])
    bits = bits[~np.isnan(bits.view(np.float32))]
    expected = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    x = torch.from_numpy(bits.view(np.float32).copy()).view(1, -1, 1)
    out = gather_rows(x, torch.arange(x.shape[1]), torch.bfloat16, backend=backend)
    assert np.array_equal(out.view(torch.int16).numpy().view(np.uint16).ravel(), expected)


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp16_overflow_counted_in_the_same_pass(backend, source_dtype):
    # 65519 rounds down to 65504 (no overflow); 65520 and beyond become inf; inf and NaN sources
    # were never finite, so they do not count.
    values = [1.0, 65504.0, 65519.0, -65519.0, 65520.0, -70000.0, 3e5, 1e38, float("inf"), float("nan")]
    source = torch.tensor(values).to(source_dtype)      # in bfloat16, 65519 is already 65536
    x = source.view(2, 5, 1).expand(2, 5, 3)
    planted = sum(1 for v in source.float().tolist() if abs(v) >= 65520 and abs(v) != float("inf")) * 3
    index = torch.arange(10)
    counter = torch.zeros(1, dtype=torch.int32)
    out = gather_into(x, index, torch.empty(10, 3, dtype=torch.float16), counter, backend=backend)
    assert planted > 0 and int(counter) == planted
    assert count_fp16_overflow(reference(x, index, torch.float32), out) == planted
    in_range = (source.float().abs() < 65520).nonzero().reshape(-1)
    gather_into(x, in_range, torch.empty(len(in_range), 3, dtype=torch.float16), counter, backend=backend)
    assert int(counter) == planted, "rows within the float16 range add nothing"


def test_gather_into_writes_only_its_rows_of_a_larger_buffer(backend):
    x = torch.randn(3, 4, 6)
    index = torch.tensor([1, 2, 9])
    big = torch.full((5, 10), 7.0, dtype=torch.float16)
    gather_into(x, index, big[1:4, 2:8], backend=backend)
    assert_same_bits(big[1:4, 2:8].contiguous(), reference(x, index, torch.float16))
    untouched = torch.ones_like(big, dtype=torch.bool)
    untouched[1:4, 2:8] = False
    assert bool((big[untouched] == 7.0).all())


def test_bad_input_says_what_to_do():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="1-D int64"):
        gather_rows(x, torch.tensor([0, 1], dtype=torch.int32), torch.float16)
    with pytest.raises(ValueError, match="storage dtype"):
        gather_rows(x, torch.tensor([0]), torch.int8)
    with pytest.raises(ValueError, match=r"out must be \[2, 4\]"):
        gather_into(x, torch.tensor([0, 1]), torch.empty(2, 5))
    with pytest.raises(ValueError, match=r"\[batch, pos, \*features\]"):
        gather_rows(torch.randn(4), torch.tensor([0]), torch.float16)


@pytest.mark.skipif(not INTERPRETED, reason="runs inside the interpreted run (the driver below)")
def test_dump_store_identical_with_triton_or_torch_gather(tmp_path, monkeypatch):
    """The store pipeline's output does not depend on which gather produced it: the same dump
    (padded batches, all positions, resid_post and an attention pattern) once through the torch
    path and once through the Triton kernel, byte for byte."""
    from test_store_fixtures import assert_stores_identical, make_model_dir, make_prompts

    from microscope.activations import gather
    from microscope.activations.dump import dump

    launches = []
    kernel = gather._triton_gather
    monkeypatch.setattr(gather, "_triton_gather", lambda *args: (launches.append(1), kernel(*args)))
    model_dir = make_model_dir(tmp_path / "model")
    prompts = make_prompts(tmp_path / "p.jsonl", 6)
    hooks = "blocks.*.hook_resid_post,blocks.1.attn.hook_pattern"
    dump(str(model_dir), str(prompts), hooks, str(tmp_path / "triton.zarr"), dtype="bf16", chunk_rows=16,
         batch_tokens=64)
    assert launches, "the dump did not go through the Triton kernel"
    monkeypatch.delenv("TRITON_INTERPRET")                       # CPU tensors take the torch path again
    launched = len(launches)
    dump(str(model_dir), str(prompts), hooks, str(tmp_path / "torch.zarr"), dtype="bf16", chunk_rows=16,
         batch_tokens=64)
    assert len(launches) == launched, "the reference dump must not use the kernel"
    assert_stores_identical(tmp_path / "triton.zarr", tmp_path / "torch.zarr")


@pytest.mark.skipif(INTERPRETED, reason="this test is the driver of the interpreted run")
def test_triton_kernel_under_interpreter():
    """Every test above, again, with the Triton kernel interpreted on CPU tensors."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
                             "-k", "not test_triton_kernel_under_interpreter", "-W", "ignore::RuntimeWarning"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]
