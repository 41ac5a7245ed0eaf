"""Fused CPU kernels for a decoder layer's small ops: RMSNorm, RoPE and SiLU-and-multiply, each
one Numba call where torch runs three to eight ops.

Why: on a 2-core CPU each torch op costs ~3-8 us of dispatch and allocation, and more right
after a GEMM, whatever its size; a decode step of one row ran ~25 such ops a layer (RMSNorm
alone ~27 us a call, RoPE ~45 us: torch's `rms_norm` on CPU is itself five ops). Here each is
one call of a few microseconds.

Each row is computed by the same code whatever the batch (fixed vector order; a reduction
never split over threads), so a row's values do not depend on its
neighbours: the batch-invariant forward holds. Rounding follows the torch code they replace:
RMSNorm normalises in float32, rounds to the model's dtype, then scales in it (Hugging Face's
order); RoPE rotates in float32 and rounds once; SiLU rounds before the multiply. bfloat16
tensors are read as their uint16 bits and rounded to nearest even.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from .cpu_threads import numba_threads_as_torch
from .simd import exp2, f32_as_i32, i32_as_f32

_FAST = {"fastmath": True, "error_model": "numpy", "cache": True}
SUPPORTED = (torch.float32, torch.bfloat16)
# from this many rows the elementwise kernels (RoPE, SiLU) spread rows over the cores; an
# element's arithmetic is the same on any thread, so its bits do not change with the split.
# RMSNorm, a reduction per row, stays on one thread (45 us for 512 rows here).
PARALLEL_ROWS = 64
_LOG2E = np.float32(1.4426950408889634)


def _load(a, i, j):
    """a[i, j] as float32 (a bfloat16 array holds its uint16 bits)."""


@overload(_load, inline="always")
def _load_impl(a, i, j):
    if a.dtype == types.float32:
        return lambda a, i, j: a[i, j]
    return lambda a, i, j: i32_as_f32(np.int32(np.int32(a[i, j]) << 16))


def _store(a, i, j, x):
    """a[i, j] = x, rounded to nearest even where a holds bfloat16 bits."""


@overload(_store, inline="always")
def _store_impl(a, i, j, x):
    if a.dtype == types.float32:

        def store(a, i, j, x):
            a[i, j] = x

        return store

    def store_bits(a, i, j, x):
        bits = f32_as_i32(np.float32(x))
        bits = bits + np.int32(0x7FFF) + ((bits >> 16) & 1)
        a[i, j] = np.uint16((bits >> 16) & 0xFFFF)

    return store_bits


def _round(x, like):
    """x rounded to the dtype of array `like` (identity for float32)."""


@overload(_round, inline="always")
def _round_impl(x, like):
    if like.dtype == types.float32:
        return lambda x, like: x

    def round_bits(x, like):
        bits = f32_as_i32(np.float32(x))
        bits = (bits + np.int32(0x7FFF) + ((bits >> 16) & 1)) & np.int32(-65536)
        return i32_as_f32(bits)

    return round_bits


@njit(inline="always", **_FAST)
def _norm_row(x, t, w, eps, out):
    h = x.shape[1]
    total = np.float32(0.0)
    for i in range(h):
        v = _load(x, t, i)
        total += v * v
    scale = np.float32(1.0) / np.sqrt(total / np.float32(h) + eps)
    for i in range(h):
        _store(out, t, i, _load(w, 0, i) * _round(_load(x, t, i) * scale, x))


@njit(nogil=True, **_FAST)
def _rms_norm(x, w, eps, out):
    for t in range(x.shape[0]):
        _norm_row(x, t, w, eps, out)


@njit(inline="always", **_FAST)
def _rope_row(x, t, heads, d, cos, sin):
    half = d // 2
    for hd in range(heads):
        base = hd * d
        for i in range(half):
            x1 = _load(x, t, base + i)
            x2 = _load(x, t, base + half + i)
            c, s = cos[t, i], sin[t, i]
            _store(x, t, base + i, x1 * c - x2 * s)
            _store(x, t, base + half + i, x2 * c + x1 * s)


@njit(nogil=True, **_FAST)
def _rope(x, heads, d, cos, sin):
    for t in range(x.shape[0]):
        _rope_row(x, t, heads, d, cos, sin)


@njit(nogil=True, parallel=True, **_FAST)
def _rope_parallel(x, heads, d, cos, sin):
    for t in prange(x.shape[0]):
        _rope_row(x, t, heads, d, cos, sin)


@njit(inline="always", **_FAST)
def _silu_mul_row(gate_up, t, out):
    n = out.shape[1]
    for i in range(n):
        g = _load(gate_up, t, i)
        e = exp2(-abs(g) * _LOG2E)  # exp(-|g|) <= 1: no overflow either side
        sigmoid = np.float32(1.0) / (np.float32(1.0) + e)
        silu = _round(g * (sigmoid if g >= 0 else e * sigmoid), out)
        _store(out, t, i, silu * _load(gate_up, t, n + i))


@njit(nogil=True, **_FAST)
def _silu_mul(gate_up, out):
    for t in range(out.shape[0]):
        _silu_mul_row(gate_up, t, out)


@njit(nogil=True, parallel=True, **_FAST)
def _silu_mul_parallel(gate_up, out):
    for t in prange(out.shape[0]):
        _silu_mul_row(gate_up, t, out)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.dtype == torch.float32 else t.view(torch.uint16).numpy()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * RMSNorm(x) over the last dim of x [T, H]."""
    out = torch.empty_like(x)
    _rms_norm(_np(x), _np(weight.view(1, -1)), np.float32(eps), _np(out))
    return out


def rope_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate-half RoPE in place on the first `heads` heads of each row of x [T, W] (W >=
    heads * head_dim, rows contiguous); cos, sin [T, head_dim // 2] float32."""
    args = (_np(x), heads, head_dim, cos.numpy(), sin.numpy())
    if x.shape[0] < PARALLEL_ROWS:
        _rope(*args)
        return
    with numba_threads_as_torch():
        _rope_parallel(*args)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2N] = [gate | up]."""
    out = gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))
    if out.shape[0] < PARALLEL_ROWS:
        _silu_mul(_np(gate_up), _np(out))
        return out
    with numba_threads_as_torch():
        _silu_mul_parallel(_np(gate_up), _np(out))
    return out
