"""torch's AVX-512 int8 weight-only matmul for bfloat16 rows, bit for bit, faster for few rows.

Where torch's CPU `_weight_int8pack_mm` is vectorised (AVX-512), `--quantize int8` runs on it:
its rows get the same bits whatever the batch, which the stateful == stateless invariant and
`deterministic` rely on. But it reads a decode step's weights at ~29 GB/s at one row (4x4 tiles,
each weight widened and scaled again for every tile of rows; 2-core AVX-512 EPYC reading 79 GB/s).
These kernels compute each output as torch's kernel does, so a step may take either: each int8
weight vector of 16 widened to float32 and multiplied by its row's scale, sixteen lane-wise FMA
chains over K (x widened exactly from bfloat16), the lanes added by halves (8, 4, 2, 1: the tree
of `_mm512_reduce_add_ps`), rounded to bfloat16 to nearest, ties to even. `matmul_as_torch`
takes one row through `_one_row_at_a_time`, more through `_row_pairs`; tests check the bits
against torch's own on this CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import get_num_threads, njit, prange

from .cpu_threads import numba_threads_as_torch
from .simd import prefetch
from .simd512 import (
    v16fma,
    v16load_bf16,
    v16load_i8,
    v16mul,
    v16splat,
    v16store_bf16,
    v16zero,
    vsum16x16_halves,
)

WIDE_LANES = 16  # K is walked sixteen elements at a time: it must be a multiple of this
ONE_ROW_FEATURES = 16  # features a pass of `_one_row_at_a_time`
PAIR_FEATURES = 8  # features a pass of `_row_pairs` (two rows: sixteen accumulators)
# Up to this many rows these kernels beat torch's; more rows run torch's. The 121 matmuls of
# the default model from memory, ours / torch's (2-core AVX-512 EPYC, 8 alternating rounds):
# 1 row 0.79 (3.90 ms), 2 rows 0.83, 3 0.98, 4 1.01, 8 0.97; a decode step with --quantize
# int8, 6 alternating rounds: 1 row 0.85, 2 rows 0.94, 4 rows 1.03.
FASTER_UP_TO_ROWS = 2


@njit(error_model="numpy", cache=True)  # a call LLVM inlines (Numba's inlining trips parfors)
def _eight_features(n, features, k_dim, scale):
    """Where features n..n+7 start in the flat weight, and their scales as vectors. Past the
    last feature the last one repeats (computed, not stored), so a short last group needs no
    branch in the loop over K."""
    f0, f1 = min(n, features - 1), min(n + 1, features - 1)
    f2, f3 = min(n + 2, features - 1), min(n + 3, features - 1)
    f4, f5 = min(n + 4, features - 1), min(n + 5, features - 1)
    f6, f7 = min(n + 6, features - 1), min(n + 7, features - 1)
    starts = (f0 * k_dim, f1 * k_dim, f2 * k_dim, f3 * k_dim,
              f4 * k_dim, f5 * k_dim, f6 * k_dim, f7 * k_dim)  # fmt: skip
    scales = (v16splat(scale[f0]), v16splat(scale[f1]), v16splat(scale[f2]),
              v16splat(scale[f3]), v16splat(scale[f4]), v16splat(scale[f5]),
              v16splat(scale[f6]), v16splat(scale[f7]))  # fmt: skip
    return starts, scales


@njit(parallel=True, nogil=True, error_model="numpy", cache=True)
def _one_row_at_a_time(x, qweight, scale, out):
    """out = x @ (qweight * scale).T for one row, x [1, K] and out [1, N] bfloat16 bits
    (uint16), with each output's bits as torch's AVX-512 `_weight_int8pack_mm` gives them: the
    weight widened and multiplied by its row's scale, sixteen lane-wise FMA chains over K, the
    lanes added by halves (`_mm512_reduce_add_ps`), rounded to bfloat16 (to nearest, ties to
    even). K a multiple of 16. Sixteen features a pass, the next group's weights prefetched as
    these are read."""
    k_dim = x.shape[1]
    features = qweight.shape[0]
    xf, wf, of = x.ravel(), qweight.ravel(), out.ravel()
    last = wf.size - 1
    for item in prange((features + ONE_ROW_FEATURES - 1) // ONE_ROW_FEATURES):
        n = item * ONE_ROW_FEATURES
        (w0, w1, w2, w3, w4, w5, w6, w7), (s0, s1, s2, s3, s4, s5, s6, s7) = _eight_features(
            n, features, k_dim, scale
        )
        (w8, w9, w10, w11, w12, w13, w14, w15), (s8, s9, s10, s11, s12, s13, s14, s15) = (
            _eight_features(n + 8, features, k_dim, scale)
        )
        ahead = (n + ONE_ROW_FEATURES) * k_dim  # the next group's rows, one contiguous run
        a0, a1, a2, a3 = v16zero(), v16zero(), v16zero(), v16zero()
        a4, a5, a6, a7 = v16zero(), v16zero(), v16zero(), v16zero()
        a8, a9, a10, a11 = v16zero(), v16zero(), v16zero(), v16zero()
        a12, a13, a14, a15 = v16zero(), v16zero(), v16zero(), v16zero()
        for k in range(0, k_dim, WIDE_LANES):
            step = ahead + ONE_ROW_FEATURES * k  # 256 bytes of the next group per 256 of this
            for line in range(0, 256, 64):
                prefetch(wf, min(step + line, last))
            u = v16load_bf16(xf, k)
            a0 = v16fma(u, v16mul(v16load_i8(wf, w0 + k), s0), a0)
            a1 = v16fma(u, v16mul(v16load_i8(wf, w1 + k), s1), a1)
            a2 = v16fma(u, v16mul(v16load_i8(wf, w2 + k), s2), a2)
            a3 = v16fma(u, v16mul(v16load_i8(wf, w3 + k), s3), a3)
            a4 = v16fma(u, v16mul(v16load_i8(wf, w4 + k), s4), a4)
            a5 = v16fma(u, v16mul(v16load_i8(wf, w5 + k), s5), a5)
            a6 = v16fma(u, v16mul(v16load_i8(wf, w6 + k), s6), a6)
            a7 = v16fma(u, v16mul(v16load_i8(wf, w7 + k), s7), a7)
            a8 = v16fma(u, v16mul(v16load_i8(wf, w8 + k), s8), a8)
            a9 = v16fma(u, v16mul(v16load_i8(wf, w9 + k), s9), a9)
            a10 = v16fma(u, v16mul(v16load_i8(wf, w10 + k), s10), a10)
            a11 = v16fma(u, v16mul(v16load_i8(wf, w11 + k), s11), a11)
            a12 = v16fma(u, v16mul(v16load_i8(wf, w12 + k), s12), a12)
            a13 = v16fma(u, v16mul(v16load_i8(wf, w13 + k), s13), a13)
            a14 = v16fma(u, v16mul(v16load_i8(wf, w14 + k), s14), a14)
            a15 = v16fma(u, v16mul(v16load_i8(wf, w15 + k), s15), a15)
        sums = vsum16x16_halves(
            a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15
        )
        if n + ONE_ROW_FEATURES <= features:
            v16store_bf16(of, n, sums)
        else:
            spill = np.empty(ONE_ROW_FEATURES, dtype=np.uint16)  # once a call: the last group
            v16store_bf16(spill, 0, sums)
            for j in range(features - n):
                of[n + j] = spill[j]


@njit(parallel=True, nogil=True, error_model="numpy", cache=True)
def _row_pairs(x, qweight, scale, out, threads):
    """`_one_row_at_a_time`'s sums for two rows at once (the same bits): eight features a
    pass, each weight vector widened and scaled once for both rows, where one row at a time
    does both per row. An odd last row pairs with itself (computed twice, stored once)."""
    rows, k_dim = x.shape
    features = qweight.shape[0]
    xf, wf = x.ravel(), qweight.ravel()
    last = wf.size - 1
    items = (features + PAIR_FEATURES - 1) // PAIR_FEATURES
    lanes = min(threads, items)
    # one prange iteration per thread (`threads`: Numba's count, passed in: get_num_threads
    # called here would keep the kernel out of Numba's cache), each over a contiguous share of
    # the items, so a thread's scratch is allocated once a call, not once an item
    scratch = np.empty((lanes, 2 * PAIR_FEATURES), dtype=np.uint16)
    for lane in prange(lanes):
        spill = scratch[lane]
        for item in range(lane * items // lanes, (lane + 1) * items // lanes):
            n = item * PAIR_FEATURES
            (w0, w1, w2, w3, w4, w5, w6, w7), (s0, s1, s2, s3, s4, s5, s6, s7) = _eight_features(
                n, features, k_dim, scale
            )
            ahead = (n + PAIR_FEATURES) * k_dim  # the next group's rows, one contiguous run
            stored = min(PAIR_FEATURES, features - n)
            for m in range(0, rows, 2):
                x0, x1 = m * k_dim, min(m + 1, rows - 1) * k_dim
                a0, a1, a2, a3 = v16zero(), v16zero(), v16zero(), v16zero()
                a4, a5, a6, a7 = v16zero(), v16zero(), v16zero(), v16zero()
                b0, b1, b2, b3 = v16zero(), v16zero(), v16zero(), v16zero()
                b4, b5, b6, b7 = v16zero(), v16zero(), v16zero(), v16zero()
                for k in range(0, k_dim, WIDE_LANES):
                    if m == 0:  # 128 bytes of the next group per 128 bytes of this one
                        step = ahead + PAIR_FEATURES * k
                        prefetch(wf, min(step, last))
                        prefetch(wf, min(step + 64, last))
                    u, v = v16load_bf16(xf, x0 + k), v16load_bf16(xf, x1 + k)
                    q = v16mul(v16load_i8(wf, w0 + k), s0)
                    a0, b0 = v16fma(u, q, a0), v16fma(v, q, b0)
                    q = v16mul(v16load_i8(wf, w1 + k), s1)
                    a1, b1 = v16fma(u, q, a1), v16fma(v, q, b1)
                    q = v16mul(v16load_i8(wf, w2 + k), s2)
                    a2, b2 = v16fma(u, q, a2), v16fma(v, q, b2)
                    q = v16mul(v16load_i8(wf, w3 + k), s3)
                    a3, b3 = v16fma(u, q, a3), v16fma(v, q, b3)
                    q = v16mul(v16load_i8(wf, w4 + k), s4)
                    a4, b4 = v16fma(u, q, a4), v16fma(v, q, b4)
                    q = v16mul(v16load_i8(wf, w5 + k), s5)
                    a5, b5 = v16fma(u, q, a5), v16fma(v, q, b5)
                    q = v16mul(v16load_i8(wf, w6 + k), s6)
                    a6, b6 = v16fma(u, q, a6), v16fma(v, q, b6)
                    q = v16mul(v16load_i8(wf, w7 + k), s7)
                    a7, b7 = v16fma(u, q, a7), v16fma(v, q, b7)
                # lanes 0-7: row m's eight features, lanes 8-15: row m + 1's
                sums = vsum16x16_halves(
                    a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7
                )
                v16store_bf16(spill, 0, sums)
                for j in range(stored):
                    out[m, n + j] = spill[j]
                    if m + 1 < rows:
                        out[m + 1, n + j] = spill[PAIR_FEATURES + j]


def matmul_as_torch(x: torch.Tensor, qweight: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """x [M, K] bfloat16 @ (qweight [N, K] int8 * scale [N] float32 of bfloat16 values).T ->
    [M, N] bfloat16, with the bits of torch's `_weight_int8pack_mm(x, qweight, scale)`. K a
    multiple of 16."""
    out = np.empty((x.shape[0], qweight.shape[0]), dtype=np.uint16)
    bits = x.contiguous().view(torch.uint16).numpy()
    with numba_threads_as_torch():
        if x.shape[0] == 1:
            _one_row_at_a_time(bits, qweight, scale, out)
        elif x.shape[0]:
            _row_pairs(bits, qweight, scale, out, get_num_threads())
    return torch.from_numpy(out).view(torch.bfloat16)
