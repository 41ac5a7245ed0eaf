"""A decoder layer's small ops on CPU as one Numba call each: RMSNorm, RoPE, SiLU-and-multiply.

Why: torch runs each as three to eight ops, and on CPU every op pays its dispatch and
allocation, several times over right after a GEMM (measured on a 2-core AMD Zen 4 EPYC,
bfloat16: torch's RMSNorm of one 576-wide row 14 us alone and ~44 us after a linear, where one
Numba call costs ~3 us after it; a 512-row prefill spent ~310 us a call in RMSNorm and ~470 us
in RoPE; bench/README.md, "Zen 4: an L2 prefetch, fused RMSNorm and RoPE").

Calls of fewer than PARALLEL_ROWS rows run on one thread: Numba's parallel regions beside
torch's OpenMP team made small steps slower (bench/README.md, 2026-12-03); RMSNorm and
SiLU-and-multiply split more rows into one contiguous share a thread (a 512-row prefill
0.97 of the one-thread step, 24 decodes with a 256-token chunk 0.97). Each row is computed
by the same vectorised loop whatever the batch or the share (a row's reduction never split,
its vector order fixed when it compiles), so a row's values do not depend on its neighbours
and the batch-invariant forward holds. Rounding follows the torch code they replace: RMSNorm
normalises in float32, rounds to the model's dtype, then scales in it (Hugging Face's order);
RoPE rotates in float32 and rounds once; SiLU rounds to bfloat16, then the product does.
bfloat16 tensors are read as their uint16 bits and rounded to nearest even.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from .cpu_threads import numba_threads_as_torch
from .cpu_tiles import _vkv, _widen
from .simd import f32_as_i32, i32_as_f32, vadd, vfma, vlane, vzero
from .simd512 import v16load_bf16, v16mul, v16round_bf16, v16store_bf16
from .simd512_math import v16silu

_FAST = {"fastmath": True, "error_model": "numpy", "cache": True}
SUPPORTED = (torch.float32, torch.bfloat16)
PARALLEL_ROWS = 32  # calls of fewer rows run on one thread (see the module's docstring)


@njit(inline="always", **_FAST)
def _load(a, i, j):
    """a[i, j] as float32 (a bfloat16 array holds its uint16 bits)."""
    return _widen(a[i, j])


def _round(x, like):
    """x rounded to the dtype of array `like` (identity for float32), still a float32."""


@overload(_round, inline="always")
def _round_impl(x, like):
    if like.dtype == types.float32:
        return lambda x, like: x

    def round_bits(x, like):
        bits = f32_as_i32(np.float32(x))
        return i32_as_f32((bits + np.int32(0x7FFF) + ((bits >> 16) & 1)) & np.int32(-65536))

    return round_bits


def _store(a, i, j, x):
    """a[i, j] = x, rounded to nearest even where a holds bfloat16 bits."""


@overload(_store, inline="always")
def _store_impl(a, i, j, x):
    if a.dtype == types.float32:

        def store(a, i, j, x):
            a[i, j] = x

        return store

    def store_bits(a, i, j, x):
        a[i, j] = np.uint16((f32_as_i32(_round(x, a)) >> 16) & 0xFFFF)

    return store_bits


@njit(error_model="numpy", cache=True, nogil=True)  # no fastmath: see the docstring
def _rms_norm_row(x, w, eps, out, t):
    """Row t of RMSNorm, its sum of squares in one order written out (four eight-lane FMA
    chains over 32 elements at a time, added as (0 + 1) + (2 + 3), the lanes in order, then
    the tail), compiled without fastmath. With fastmath, inlined into the one-thread and the
    parallel callers, the sum's order and the scaling's form followed the caller: on an AVX2
    Zen 3, a float32 row alone and in a batch of 41 differed in their last bits."""
    h = x.shape[1]
    base = t * h
    a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
    end = h - h % 32
    for i in range(base, base + end, 32):
        v = _vkv(x, i)
        a0 = vfma(v, v, a0)
        v = _vkv(x, i + 8)
        a1 = vfma(v, v, a1)
        v = _vkv(x, i + 16)
        a2 = vfma(v, v, a2)
        v = _vkv(x, i + 24)
        a3 = vfma(v, v, a3)
    lanes = vadd(vadd(a0, a1), vadd(a2, a3))
    total = np.float32(0.0)
    for j in range(8):
        total += vlane(lanes, j)
    for i in range(end, h):
        v = _load(x, t, i)
        total += v * v
    scale = np.float32(1.0) / np.sqrt(total / np.float32(h) + eps)
    for i in range(h):
        _store(out, t, i, _load(w, 0, i) * _round(_load(x, t, i) * scale, x))


@njit(inline="always", **_FAST)
def _rms_norm_rows(x, w, eps, out, lo, hi):
    for t in range(lo, hi):
        _rms_norm_row(x, w, eps, out, t)


@njit(inline="always", **_FAST)
def _rope_rows(x, heads, d, cos, sin):
    half = d // 2
    for t in range(x.shape[0]):
        for head in range(heads):
            base = head * d
            for i in range(half):
                x1 = _load(x, t, base + i)
                x2 = _load(x, t, base + half + i)
                c, s = cos[t, i], sin[t, i]
                _store(x, t, base + i, x1 * c - x2 * s)
                _store(x, t, base + half + i, x2 * c + x1 * s)


@njit(nogil=True, **_FAST)
def _rms_norm(x, w, eps, out):
    _rms_norm_rows(x, w, eps, out, 0, x.shape[0])


@njit(nogil=True, parallel=True, **_FAST)
def _rms_norm_parallel(x, w, eps, out, parts):
    rows = x.shape[0]
    for p in prange(parts):
        _rms_norm_rows(x, w, eps, out, p * rows // parts, (p + 1) * rows // parts)


@njit(inline="always", **_FAST)
def _silu_mul_rows(gu, out, lo, hi):
    """out = silu(gate) * up for rows lo..hi-1 of gu = [gate | up] (bfloat16 bits), each
    product of bfloat16 operands rounded to bfloat16 as torch's two ops round them."""
    n = out.shape[1]
    for t in range(lo, hi):
        for i in range(0, n, 16):
            gate = v16round_bf16(v16silu(v16load_bf16(gu, t * 2 * n + i)))
            v16store_bf16(out, t * n + i, v16mul(gate, v16load_bf16(gu, t * 2 * n + n + i)))


@njit(nogil=True, **_FAST)
def _silu_mul(gu, out):
    _silu_mul_rows(gu, out, 0, out.shape[0])


@njit(nogil=True, parallel=True, **_FAST)
def _silu_mul_parallel(gu, out, parts):
    rows = out.shape[0]
    for p in prange(parts):
        _silu_mul_rows(gu, out, p * rows // parts, (p + 1) * rows // parts)


# the head dim as a literal where it is 64 or 128: LLVM then vectorises the 32 or 64 pairs of a
# head whole (read at run time, the short loop stayed scalar: 512 rows 438 -> 46 us, bfloat16)
@njit(nogil=True, **_FAST)
def _rope64(x, heads, d, cos, sin):
    _rope_rows(x, heads, 64, cos, sin)


@njit(nogil=True, **_FAST)
def _rope128(x, heads, d, cos, sin):
    _rope_rows(x, heads, 128, cos, sin)


@njit(nogil=True, **_FAST)
def _rope_any(x, heads, d, cos, sin):
    _rope_rows(x, heads, d, cos, sin)


_ROPE = {64: _rope64, 128: _rope128}


def runs_fused(x: torch.Tensor) -> bool:
    """Whether these kernels take x: a contiguous float32 or bfloat16 matrix on the CPU."""
    return x.device.type == "cpu" and x.dtype in SUPPORTED and x.dim() == 2 and x.is_contiguous()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.dtype == torch.float32 else t.view(torch.uint16).numpy()


def _run_rows(serial, parallel, rows: int, *args) -> None:
    """serial(*args) for fewer than PARALLEL_ROWS rows, else parallel(*args, n) on torch's n
    threads, each a contiguous share of the rows."""
    if rows < PARALLEL_ROWS:
        serial(*args)
        return
    with numba_threads_as_torch():
        parallel(*args, torch.get_num_threads())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * RMSNorm(x) over the last dim of x [T, H] (weight in x's dtype)."""
    out = torch.empty_like(x)
    args = (_np(x), _np(weight.view(1, -1)), np.float32(eps), _np(out))
    _run_rows(_rms_norm, _rms_norm_parallel, x.shape[0], *args)
    return out


def runs_silu_mul(gate_up: torch.Tensor) -> bool:
    """Whether `silu_mul` takes gate_up: a contiguous bfloat16 [T, 2n] CPU matrix, n % 16 ==
    0 (float32 stays on torch's ops, whose last bits these sums do not reproduce)."""
    return runs_fused(gate_up) and gate_up.dtype == torch.bfloat16 and gate_up.shape[1] % 32 == 0


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] [T, 2n] in bfloat16 (`runs_silu_mul`): one
    pass where torch's SiLU of the strided half and its multiply took ~0.6 ms a layer at 512
    rows after the GEMM (2-core Zen 4); torch's bits on the finite inputs tested."""
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    _run_rows(_silu_mul, _silu_mul_parallel, gate_up.shape[0], _np(gate_up), _np(out))
    return out


def rope_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate-half RoPE in place on the first `heads` heads of each row of x [T, W] (W >=
    heads * head_dim); cos, sin [T, head_dim // 2] float32, each pair's angle."""
    _ROPE.get(head_dim, _rope_any)(_np(x), heads, head_dim, cos.numpy(), sin.numpy())
