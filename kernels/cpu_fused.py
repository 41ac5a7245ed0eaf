"""A decoder layer's small ops on CPU as one Numba call each: RMSNorm and RoPE.

Why: torch runs each as three to eight ops, and on CPU every op pays its dispatch and
allocation, several times over right after a GEMM (measured on a 2-core AMD Zen 4 EPYC,
bfloat16: torch's RMSNorm of one 576-wide row 14 us alone and ~44 us after a linear, where one
Numba call costs ~3 us after it; a 512-row prefill spent ~310 us a call in RMSNorm and ~470 us
in RoPE; bench/README.md, "Zen 4: an L2 prefetch, fused RMSNorm and RoPE").

Every kernel runs on one thread: Numba's parallel regions beside torch's OpenMP team made the
engine slower (bench/README.md, 2026-12-03), and these loops are short. Each row is computed
by the same vectorised loop whatever the batch (a row's reduction never split, its vector
order fixed when it compiles), so a row's values do not depend on its neighbours and the
batch-invariant forward holds. Rounding follows the torch code they replace: RMSNorm
normalises in float32, rounds to the model's dtype, then scales in it (Hugging Face's order);
RoPE rotates in float32 and rounds once. bfloat16 tensors are read as their uint16 bits and
rounded to nearest even.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, types
from numba.extending import overload

from .cpu_tiles import _widen
from .simd import f32_as_i32, i32_as_f32

_FAST = {"fastmath": True, "error_model": "numpy", "cache": True}
SUPPORTED = (torch.float32, torch.bfloat16)


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


@njit(nogil=True, **_FAST)
def _rms_norm(x, w, eps, out):
    h = x.shape[1]
    for t in range(x.shape[0]):
        total = np.float32(0.0)
        for i in range(h):
            v = _load(x, t, i)
            total += v * v
        scale = np.float32(1.0) / np.sqrt(total / np.float32(h) + eps)
        for i in range(h):
            _store(out, t, i, _load(w, 0, i) * _round(_load(x, t, i) * scale, x))


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
    return (
        x.device.type == "cpu" and x.dtype in SUPPORTED and x.dim() == 2 and x.is_contiguous()
    )


def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.dtype == torch.float32 else t.view(torch.uint16).numpy()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * RMSNorm(x) over the last dim of x [T, H] (weight in x's dtype)."""
    out = torch.empty_like(x)
    _rms_norm(_np(x), _np(weight.view(1, -1)), np.float32(eps), _np(out))
    return out


def rope_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate-half RoPE in place on the first `heads` heads of each row of x [T, W] (W >=
    heads * head_dim); cos, sin [T, head_dim // 2] float32, each pair's angle."""
    _ROPE.get(head_dim, _rope_any)(_np(x), heads, head_dim, cos.numpy(), sin.numpy())
