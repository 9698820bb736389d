"""Gather and cast: the kept tokens of a hook's activation, in the store dtype, in one pass.

API (stable; the store pipeline calls it):

    gather_rows(x, index, dtype) -> Tensor[N, W]
        x: Tensor[B, T, *F] (any strides), index: LongTensor[N] into the flattened B*T axis
        (row b*T + t), dtype: the storage dtype. Returns the rows x[b, t] flattened to
        W = prod(F) columns and cast, on x's device.
    gather_into(x, index, out, overflow=None) -> Tensor[N, W]
        The same into a preallocated `out` [N, W] (unit column stride, any row stride: a view
        into a larger staging buffer is fine). When `overflow` (int32 [1] on x's device) is
        given and the cast is to float16, the number of finite values that became inf
        (|x| >= 65520 rounds past 65504) is added to it in the same pass, without a host sync.
    count_fp16_overflow(source, cast) -> int
        The same count computed afterwards, from the source rows and their float16 cast.

Dispatch: CUDA tensors use the Triton kernel; CPU tensors use plain torch (the reference), or the
Triton kernel too when the process runs under TRITON_INTERPRET=1 (set before triton is imported),
which is how the kernel is tested without a GPU. `backend="torch"|"triton"` forces one.

Bit-exactness: casts round to nearest even as torch does. bfloat16 is produced by integer
rounding of the float32 bit pattern (what torch's CPU conversion does), so its uint16 view is
the one torch gives for every non-NaN value. A NaN stays a NaN but its bits are not torch's: torch
itself writes 0x7FC0 (scalar CPU), 0xFFFF (vectorised CPU) or 0x7FFF (CUDA); the kernel always
writes 0x7FC0. Same-dtype gathers copy bits, NaN payloads included.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from microscope.errors import StoreError

FP16_MAX = 65504.0
BACKENDS = ("auto", "torch", "triton")
_INT_VIEW = {2: torch.int16, 4: torch.int32}
_OUT_MODE = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}   # 0: copy bits unchanged
SUPPORTED = tuple(_OUT_MODE)


def gather_rows(x: torch.Tensor, index: torch.Tensor, dtype: torch.dtype, *,
                backend: str = "auto") -> torch.Tensor:
    """Rows `index` of x [B, T, *F] viewed as [B*T, prod(F)], cast to `dtype`: Tensor[N, prod(F)]."""
    _check(x, index, dtype, backend)
    out = torch.empty((index.numel(), _width(x)), dtype=dtype, device=x.device)
    return gather_into(x, index, out, backend=backend)


def gather_into(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor, overflow: torch.Tensor | None = None,
                *, backend: str = "auto") -> torch.Tensor:
    """Write rows `index` of x [B, T, *F], cast to out.dtype, into out [N, prod(F)]; returns out.

    overflow: optional int32 [1] on x's device; float16 casts add their count of finite values
    that became inf to it."""
    _check(x, index, out.dtype, backend)
    n, width = index.numel(), _width(x)
    if out.dim() != 2 or tuple(out.shape) != (n, width) or (width > 1 and out.stride(1) != 1):
        raise StoreError(f"out must be [{n}, {width}] with unit column stride; got shape {tuple(out.shape)} "
                         f"strides {out.stride()}")
    if out.device != x.device:
        raise StoreError(f"out is on {out.device} but x is on {x.device}: stage on the activation's device")
    if overflow is not None and (overflow.dtype != torch.int32 or overflow.numel() != 1
                                 or overflow.device != x.device):
        raise StoreError("overflow must be an int32 tensor of one element on x's device")
    if n == 0:
        return out
    index = index.to(x.device, non_blocking=True)
    if _use_triton(x, backend):
        _triton_gather(x, index, out, overflow)
    else:
        _torch_gather(x, index, out, overflow)
    return out


def has_non_finite(x: torch.Tensor) -> bool:
    """Whether x holds an inf or a NaN: one min/max pass, no mask allocated."""
    if x.numel() == 0:
        return False
    lo, hi = torch.aminmax(x)
    return not bool(torch.isfinite(lo) & torch.isfinite(hi))


def count_fp16_overflow(source: torch.Tensor, cast: torch.Tensor) -> int:
    """How many finite values of `source` became inf in `cast` (its float16 cast, same shape)."""
    if cast.dtype != torch.float16:
        return 0
    return int((torch.isinf(cast) & torch.isfinite(source.to(cast.device).reshape(cast.shape))).sum())


def _check(x: torch.Tensor, index: torch.Tensor, dtype: torch.dtype, backend: str) -> None:
    if backend not in BACKENDS:
        raise StoreError(f"backend {backend!r}: choose one of {BACKENDS}")
    if x.dim() < 2:
        raise StoreError(f"x must be [batch, pos, *features]; got shape {tuple(x.shape)}")
    if dtype not in SUPPORTED:
        raise StoreError(f"storage dtype {dtype} not supported: choose one of {SUPPORTED}")
    if x.dtype not in SUPPORTED:
        raise StoreError(f"activation dtype {x.dtype} not supported: expected one of {SUPPORTED}")
    if index.dim() != 1 or index.dtype != torch.int64:
        raise StoreError(f"index must be a 1-D int64 tensor; got {index.dtype} of shape {tuple(index.shape)}")


def _width(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


def _torch_gather(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor, overflow: torch.Tensor | None) -> None:
    """The reference: select the rows, then torch's own cast inside `copy_`. A contiguous x is read
    as [B*T, width] with index_select; any other goes through advanced indexing (flattening it
    would copy it whole)."""
    t = x.shape[1]
    if x.is_contiguous():
        rows = x.view(x.shape[0] * t, -1).index_select(0, index)
    else:
        rows = x[index // t, index % t].reshape(index.numel(), -1)
    out.copy_(rows)
    if overflow is not None and out.dtype == torch.float16 and rows.dtype != out.dtype:
        overflow += (torch.isinf(out) & torch.isfinite(rows)).sum().to(torch.int32)


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend != "auto":
        return backend == "triton"
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _features_2d(x: torch.Tensor) -> torch.Tensor:
    """x as [B, T, W] without copying when its feature dims merge into one stride; else a copy."""
    b, t = x.shape[:2]
    if x.dim() == 2:
        return x.unsqueeze(-1)
    try:
        return x.view(b, t, -1)
    except RuntimeError:  # features that do not merge (a permuted view): one copy
        return x.contiguous().view(b, t, -1)


def _triton_gather(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor, overflow: torch.Tensor | None) -> None:
    import triton

    kernel = _kernel()
    x3 = _features_2d(x)
    n, width = out.shape
    mode = 0 if x.dtype == out.dtype else _OUT_MODE[out.dtype]
    # Same dtype: move the bits as integers. bfloat16 output: written as int16 bits.
    src = x3.view(_INT_VIEW[x.element_size()]) if mode == 0 else x3
    dst = out.view(_INT_VIEW[out.element_size()]) if mode in (0, 3) else out
    check = overflow is not None and mode == 2
    block_c = min(256, triton.next_power_of_2(width))
    block_r = max(1, min(64, 4096 // block_c))
    grid = (triton.cdiv(n, block_r), triton.cdiv(width, block_c))
    kernel[grid](src, index, dst, overflow if check else index, n, width, x3.shape[1],
                 x3.stride(0), x3.stride(1), x3.stride(2), out.stride(0),
                 BLOCK_R=block_r, BLOCK_C=block_c, MODE=mode, CHECK_OVERFLOW=check)


@functools.cache
def _kernel():
    """Compile (or, under TRITON_INTERPRET=1, interpret) the gather-and-cast kernel on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def gather_cast(src, index, out, overflow, n_rows, width, seq_len, stride_b, stride_t, stride_f,
                    out_stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, MODE: tl.constexpr,
                    CHECK_OVERFLOW: tl.constexpr):
        # One program: BLOCK_R kept rows x BLOCK_C features. MODE 0 copies bits (same dtype),
        # 1 casts to float32, 2 to float16 (round to nearest even), 3 to bfloat16 bits.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < width)[None, :]
        flat = tl.load(index + rows, mask=row_ok, other=0)
        src_row = (flat // seq_len) * stride_b + (flat % seq_len) * stride_t
        values = tl.load(src + src_row[:, None] + cols[None, :].to(tl.int64) * stride_f, mask=mask, other=0)
        if MODE == 0:
            cast = values
        elif MODE == 1:
            cast = values.to(tl.float32)
        elif MODE == 2:
            cast = values.to(tl.float32).to(tl.float16)
        else:
            # torch's round_to_nearest_even on the float32 bits; NaN -> 0x7FC0.
            wide = values.to(tl.float32)
            bits = wide.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            cast = tl.where(wide != wide, 0x7FC0, rounded).to(tl.uint16).to(tl.int16, bitcast=True)
        tl.store(out + rows[:, None].to(tl.int64) * out_stride + cols[None, :], cast, mask=mask)
        if CHECK_OVERFLOW:
            wide = values.to(tl.float32)
            became_inf = mask & (tl.abs(cast.to(tl.float32)) == float("inf")) & (tl.abs(wide) < float("inf"))
            tl.atomic_add(overflow, tl.sum(tl.sum(became_inf.to(tl.int32), axis=1), axis=0))

    return gather_cast
