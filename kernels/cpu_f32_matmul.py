"""A few float32 rows times a float32 weight, in oneDNN's summation order: decode's matmuls
near memory speed, with the bits of the GEMM that prefill runs.

Why: oneDNN's prepacked float32 GEMM (`pensieve.linear`) is built for many rows; at one row it
read a decode step's 540 MB of weights at ~11 GB/s where the machine reads 27-30 (2-core AMD
Zen 3 EPYC, AVX2; bench/README.md). As for `cpu_bf16_matmul`, another kernel may only take
some of a step's rows if every row keeps the bits oneDNN gives it (`batch_invariant`). oneDNN's
float32 matmul, probed on that CPU, sums each output in one FMA chain over K in order, restarted
every `chunk` elements of K (1024 of 1536, none of 576, found by `onednn_chunk`), the chunks'
sums added in order; these kernels sum the same way, and `few_rows_weight` compares their bits
with oneDNN's on random rows when the weight is packed (a weight that differs, as on a CPU
where oneDNN sums otherwise, stays on oneDNN).

Layout: `blocked` copies the weight [N, K] into units of 32 features, K outermost in a unit:
[N/32, K, 32], so a unit is one contiguous stream and a thread's share of units is too. Rows
go three at a time (twelve `f32x8` accumulators; the unit comes from memory in the first
pass, from L2 in the rest), the last one or two together. Where a unit takes 2-16 passes,
they prefetch the next unit into L2, each pass an even share of its lines. The model's 121
matmuls from memory took 0.61 of oneDNN's time at 1 row, 0.70-0.86 at 2-64 rows and
0.84-0.92 at 128-512, before that prefetch, which then took 6-24 rows to 0.79-0.93 of their
time (bench/README.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from numba import njit, prange

from .cpu_bf16_matmul import FewRowsWeight, Matmul, checked_form
from .simd import prefetch_l2, vadd, vbroadcast, vfma, vload, vstore, vzero

UNIT = 32  # features a work item computes: four f32x8 accumulators a row
LINE = 16  # float32 elements of a 64-byte cache line
# Where a unit takes this many passes of three rows or fewer (6-50 rows), each pass prefetches
# its even share of the next unit's lines: the model's 121 matmuls took 0.76-0.89 of the time
# at 6-24 rows, 0.98 at 64, but 1.12 at 128 rows and 1.36 at 512 (6-8 alternating rounds).
PREFETCH_PASSES = (2, 16)
CHECK_ROWS = 48  # random rows compared with oneDNN's many-row call (threes, then one or two)
# no fastmath: it would let LLVM reorder the chunks' float adds, and the order is the point
_FAST = {"error_model": "numpy", "cache": True, "nogil": True}


def _three_rows_kernel(prefetching: bool):
    """`_three_rows`, with the prefetch or without it (`prefetching` is a constant where it
    compiles: without it, the loop keeps no counter; with the counter even where it never
    came due, 512 rows took 1.17x the time)."""

    @njit(inline="always", **_FAST)
    def three_rows(x, r0, r1, r2, w, start, k_lo, k_hi, ahead, line, debt, passes):
        """Three rows' sums over K [k_lo, k_hi) for the unit at `start`; where prefetching,
        the unit at `ahead` is fetched into L2 meanwhile, its `line`-th line on, one for every
        `passes` / 2 k (`debt`: the share of one already owed, in `passes`ths). Each weight
        vector is loaded once for the three rows: twelve accumulators, three broadcasts and
        one weight vector fill the sixteen registers of AVX2."""
        a00, a01, a02, a03 = vzero(), vzero(), vzero(), vzero()
        a10, a11, a12, a13 = vzero(), vzero(), vzero(), vzero()
        a20, a21, a22, a23 = vzero(), vzero(), vzero(), vzero()
        for k in range(k_lo, k_hi):
            at = start + k * UNIT
            if prefetching:
                debt += 2
                while debt >= passes:
                    prefetch_l2(w, ahead + line * LINE)
                    line += 1
                    debt -= passes
            s0 = vbroadcast(x, r0 + k)
            s1 = vbroadcast(x, r1 + k)
            s2 = vbroadcast(x, r2 + k)
            v = vload(w, at)
            a00, a10, a20 = vfma(s0, v, a00), vfma(s1, v, a10), vfma(s2, v, a20)
            v = vload(w, at + 8)
            a01, a11, a21 = vfma(s0, v, a01), vfma(s1, v, a11), vfma(s2, v, a21)
            v = vload(w, at + 16)
            a02, a12, a22 = vfma(s0, v, a02), vfma(s1, v, a12), vfma(s2, v, a22)
            v = vload(w, at + 24)
            a03, a13, a23 = vfma(s0, v, a03), vfma(s1, v, a13), vfma(s2, v, a23)
        return (a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23)

    return three_rows


_three_rows = _three_rows_kernel(prefetching=False)
_three_rows_prefetching = _three_rows_kernel(prefetching=True)


@njit(inline="always", **_FAST)
def _two_rows(x, r0, r1, w, start, k_lo, k_hi):
    """Two rows' sums over K [k_lo, k_hi) for the unit at `start` (`_three_rows` with two)."""
    a00, a01, a02, a03 = vzero(), vzero(), vzero(), vzero()
    a10, a11, a12, a13 = vzero(), vzero(), vzero(), vzero()
    for k in range(k_lo, k_hi):
        at = start + k * UNIT
        s0 = vbroadcast(x, r0 + k)
        s1 = vbroadcast(x, r1 + k)
        v = vload(w, at)
        a00, a10 = vfma(s0, v, a00), vfma(s1, v, a10)
        v = vload(w, at + 8)
        a01, a11 = vfma(s0, v, a01), vfma(s1, v, a11)
        v = vload(w, at + 16)
        a02, a12 = vfma(s0, v, a02), vfma(s1, v, a12)
        v = vload(w, at + 24)
        a03, a13 = vfma(s0, v, a03), vfma(s1, v, a13)
    return (a00, a01, a02, a03, a10, a11, a12, a13)


@njit(inline="always", **_FAST)
def _one_row(x, r0, w, start, k_lo, k_hi):
    """One row's sums over K [k_lo, k_hi) for the unit at `start`."""
    a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
    for k in range(k_lo, k_hi):
        at = start + k * UNIT
        s = vbroadcast(x, r0 + k)
        a0 = vfma(s, vload(w, at), a0)
        a1 = vfma(s, vload(w, at + 8), a1)
        a2 = vfma(s, vload(w, at + 16), a2)
        a3 = vfma(s, vload(w, at + 24), a3)
    return a0, a1, a2, a3


@njit(inline="always", **_FAST)
def _sums(x, m, count, k_dim, w, start, k_lo, k_hi, ahead, passes):
    """Rows m..m+count-1's sums (count 1-3) over K [k_lo, k_hi) for the unit at `start`:
    twelve vectors, four a row, zeros past `count`. Each of the `passes` passes of three rows
    prefetches its share of the next unit (at `ahead`): pass m / 3 the lines from
    (m / 3 * K + k_lo) * 2 / passes on; with `passes` 0, none."""
    r0 = m * k_dim
    if count == 3 and passes:
        line, debt = divmod((m // 3 * k_dim + k_lo) * 2, passes)
        return _three_rows_prefetching(x, r0, r0 + k_dim, r0 + 2 * k_dim, w, start, k_lo, k_hi,
                                       ahead, line, debt, passes)  # fmt: skip
    if count == 3:
        return _three_rows(x, r0, r0 + k_dim, r0 + 2 * k_dim, w, start, k_lo, k_hi, 0, 0, 0, 1)
    z = vzero()
    if count == 2:
        return _two_rows(x, r0, r0 + k_dim, w, start, k_lo, k_hi) + (z, z, z, z)
    return _one_row(x, r0, w, start, k_lo, k_hi) + (z, z, z, z, z, z, z, z)


@njit(inline="always", **_FAST)
def _add(t, s):
    """t + s, twelve vectors lane by lane."""
    return (vadd(t[0], s[0]), vadd(t[1], s[1]), vadd(t[2], s[2]), vadd(t[3], s[3]),
            vadd(t[4], s[4]), vadd(t[5], s[5]), vadd(t[6], s[6]), vadd(t[7], s[7]),
            vadd(t[8], s[8]), vadd(t[9], s[9]), vadd(t[10], s[10]), vadd(t[11], s[11]))  # fmt: skip


@njit(**_FAST)
def _unit(x, w, out, k_dim, n_dim, chunk, unit, ahead_unit):
    """out[:, unit's 32 features] = x @ W.T: rows three at a time, chunk by chunk of K (each
    chunk's sums from zero, added to the chunks' before it in order)."""
    rows = x.shape[0]
    start = unit * k_dim * UNIT
    ahead = ahead_unit * k_dim * UNIT
    passes = rows // 3
    if not PREFETCH_PASSES[0] <= passes <= PREFETCH_PASSES[1]:
        passes = 0
    for m in range(0, rows, 3):
        count = min(3, rows - m)
        t = _sums(x, m, count, k_dim, w, start, 0, min(chunk, k_dim), ahead, passes)
        for lo in range(chunk, k_dim, chunk):
            s = _sums(x, m, count, k_dim, w, start, lo, min(lo + chunk, k_dim), ahead, passes)
            t = _add(t, s)
        for i in range(count):
            o = (m + i) * n_dim + unit * UNIT
            for j in range(4):
                vstore(out, o + 8 * j, t[4 * i + j])


@njit(parallel=True, **_FAST)
def _matmul(x, w, out, k_dim, n_dim, chunk, threads):
    """out = x @ W.T (float32, C-contiguous; w flat), the units split into one
    contiguous share a thread: one stream from memory, which the hardware prefetcher follows
    where a unit is read in one pass (prefetching the next unit in software as well, in every
    pass, took 1.1x the time at 1-3 rows)."""
    units = n_dim // UNIT
    for t in prange(threads):
        hi = units * (t + 1) // threads
        for unit in range(units * t // threads, hi):
            _unit(x, w, out, k_dim, n_dim, chunk, unit, unit + 1 if unit + 1 < hi else unit)


def fits(weight: torch.Tensor) -> bool:
    """Whether these kernels take this weight: float32 [N, K] on CPU, N a multiple of 32."""
    return (
        weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.shape[0] % UNIT == 0
    )


def blocked(weight: torch.Tensor) -> np.ndarray:
    """The weight [N, K] as the kernels read it: [N/32, K, 32] float32, flat."""
    n_dim, k_dim = weight.shape
    tiles = weight.detach().contiguous().view(n_dim // UNIT, UNIT, k_dim).permute(0, 2, 1)
    return tiles.contiguous().numpy().reshape(-1)


class FewRowsF32Weight(FewRowsWeight):
    """A weight's blocked copy and oneDNN's K chunk for it: `matmul` of a few float32 rows
    with the bits oneDNN gives them."""

    __slots__ = ()
    dtype = torch.float32
    bits = torch.float32
    np_bits = np.float32
    layout = staticmethod(blocked)
    kernel = staticmethod(_matmul)


def few_rows_weight(
    weight: torch.Tensor, onednn: Callable[[torch.Tensor], Matmul]
) -> FewRowsF32Weight | None:
    """The weight for these kernels, where it `fits` and `checked_form` passes it."""
    return checked_form(FewRowsF32Weight, weight, onednn, CHECK_ROWS) if fits(weight) else None
