"""Weight-only int8 matmul on CPUs where torch's has no vector kernel.

torch's `_weight_int8pack_mm` is vectorised for AVX-512 only; on an AVX2 CPU (measured on a
2-core AMD EPYC, float32 activations) it ran a decode step 1.8x slower than float32 at one row
and ~19x slower at 24 rows. This kernel computes the same out = (x @ q.T) * scale as a
register-blocked micro-kernel on `f32x8` values (`kernels/simd.py`): four output features x two
activation rows per pass, eight accumulators of eight lanes each in registers, each int8 weight
widened in a register and used for both rows, each activation for all four features. Groups of
features are spread over the cores, so each core streams its own contiguous slice of weights.

Each k step also prefetches the next group's weights at the rate they are consumed: a group's
rows are only K bytes (576 for the default model), too short a stream for the hardware
prefetcher to pick up, and without it one decode row read cold weights at ~8 GB/s; with it ~16
(120 calls over a layer stack's weights, one row, 2-core EPYC).

One activation row (a one-sequence decode step) runs `_int8_matvec` instead: eight features
a pass, where the two-row pass computed the row twice (the 121 one-row matmuls of the default
model 6.3-6.7 -> 5.4-5.6 ms, 2-core AVX2 EPYC). `Int8Weight` checks and converts a weight once,
not on every call.

Batch invariance by construction: every output is summed in one order, eight lane-wise FMA
chains over K then one fixed tree (`vsum8x8`), whichever row or feature it is paired with; a
last odd row or feature group reuses a valid row in the spare lanes and does not store them.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .cpu_threads import numba_threads_as_torch
from .simd import prefetch, vfma, vlane, vload, vload_i8, vsum8x8, vzero
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

FEATURES_PER_ITEM = 16  # output features per work item handed to a thread
LANES = 8  # K is walked eight elements at a time: it must be a multiple of this
WIDE_FEATURES = WIDE_LANES = 16  # `_int8_rows_torch_order`: features a pass, K a step


@njit(parallel=True, nogil=True, error_model="numpy", cache=True)
def _int8_matmul(x, qweight, scale, out):
    """out[m, n] = (sum_k x[m, k] * qweight[n, k]) * scale[n]; K a multiple of 8.

    x, qweight and out are C-contiguous; flat views keep the index arithmetic in one place."""
    rows, k_dim = x.shape
    features = qweight.shape[0]
    xf, wf = x.ravel(), qweight.ravel()
    last = wf.size - 1
    for item in prange((features + FEATURES_PER_ITEM - 1) // FEATURES_PER_ITEM):
        for n in range(item * FEATURES_PER_ITEM, min(features, (item + 1) * FEATURES_PER_ITEM), 4):
            w0 = n * k_dim  # spare features of a last partial group repeat the last one
            w1 = min(n + 1, features - 1) * k_dim
            w2 = min(n + 2, features - 1) * k_dim
            w3 = min(n + 3, features - 1) * k_dim
            ahead = (n + 4) * k_dim  # the next group's four rows, one contiguous run
            for m in range(0, rows, 2):
                x0 = m * k_dim
                x1 = min(m + 1, rows - 1) * k_dim  # an odd last row pairs with itself
                a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
                b0, b1, b2, b3 = vzero(), vzero(), vzero(), vzero()
                for k in range(0, k_dim, LANES):
                    prefetch(wf, min(ahead + 4 * k, last))  # 32 bytes of it per step
                    u, v = vload(xf, x0 + k), vload(xf, x1 + k)
                    q0, q1 = vload_i8(wf, w0 + k), vload_i8(wf, w1 + k)
                    q2, q3 = vload_i8(wf, w2 + k), vload_i8(wf, w3 + k)
                    a0, a1 = vfma(q0, u, a0), vfma(q1, u, a1)
                    a2, a3 = vfma(q2, u, a2), vfma(q3, u, a3)
                    b0, b1 = vfma(q0, v, b0), vfma(q1, v, b1)
                    b2, b3 = vfma(q2, v, b2), vfma(q3, v, b3)
                sums = vsum8x8(a0, a1, a2, a3, b0, b1, b2, b3)  # lanes: 4 features of m, of m+1
                for j in range(min(4, features - n)):
                    out[m, n + j] = vlane(sums, j) * scale[n + j]
                    if m + 1 < rows:
                        out[m + 1, n + j] = vlane(sums, 4 + j) * scale[n + j]


@njit(parallel=True, nogil=True, error_model="numpy", cache=True)
def _int8_matvec(x, qweight, scale, out):
    """`_int8_matmul` for one activation row (a one-sequence decode step): eight features a
    pass, where the two-row pass would compute the row twice. Every output keeps its sums'
    order (its own lane-wise FMA chain over K, then `vsum8x8`'s tree, which adds every
    vector's lanes alike), so a row gets the same bits here as in a batch."""
    k_dim = x.shape[1]
    features = qweight.shape[0]
    xf, wf = x.ravel(), qweight.ravel()
    last = wf.size - 1
    for item in prange((features + FEATURES_PER_ITEM - 1) // FEATURES_PER_ITEM):
        for n in range(item * FEATURES_PER_ITEM, min(features, (item + 1) * FEATURES_PER_ITEM), 8):
            w0 = n * k_dim  # spare features of a last partial group repeat the last one
            w1 = min(n + 1, features - 1) * k_dim
            w2 = min(n + 2, features - 1) * k_dim
            w3 = min(n + 3, features - 1) * k_dim
            w4 = min(n + 4, features - 1) * k_dim
            w5 = min(n + 5, features - 1) * k_dim
            w6 = min(n + 6, features - 1) * k_dim
            w7 = min(n + 7, features - 1) * k_dim
            ahead = (n + 8) * k_dim  # the next group's eight rows, one contiguous run
            a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
            a4, a5, a6, a7 = vzero(), vzero(), vzero(), vzero()
            for k in range(0, k_dim, LANES):
                prefetch(wf, min(ahead + 8 * k, last))  # 64 bytes of it per step
                u = vload(xf, k)
                a0 = vfma(vload_i8(wf, w0 + k), u, a0)
                a1 = vfma(vload_i8(wf, w1 + k), u, a1)
                a2 = vfma(vload_i8(wf, w2 + k), u, a2)
                a3 = vfma(vload_i8(wf, w3 + k), u, a3)
                a4 = vfma(vload_i8(wf, w4 + k), u, a4)
                a5 = vfma(vload_i8(wf, w5 + k), u, a5)
                a6 = vfma(vload_i8(wf, w6 + k), u, a6)
                a7 = vfma(vload_i8(wf, w7 + k), u, a7)
            sums = vsum8x8(a0, a1, a2, a3, a4, a5, a6, a7)  # lane j: feature n + j
            for j in range(min(8, features - n)):
                out[0, n + j] = vlane(sums, j) * scale[n + j]


@njit(parallel=True, nogil=True, error_model="numpy", cache=True)
def _int8_rows_torch_order(x, qweight, scale, out):
    """out = x @ (qweight * scale).T, x and out bfloat16 bits (uint16), with each output's bits
    as torch's AVX-512 `_weight_int8pack_mm` gives them: the weight widened and multiplied by
    its row's scale, sixteen lane-wise FMA chains over K, the lanes added by halves
    (`_mm512_reduce_add_ps`), rounded to bfloat16 (to nearest, ties to even). K a multiple of 16.

    Sixteen features a pass, each row of x in turn over the same sixteen weight rows (they
    stay in L1), the next group's weights prefetched as these are read."""
    rows, k_dim = x.shape
    features = qweight.shape[0]
    xf, wf = x.ravel(), qweight.ravel()
    last = wf.size - 1
    for item in prange((features + WIDE_FEATURES - 1) // WIDE_FEATURES):
        n = item * WIDE_FEATURES
        # a short last group repeats its last feature (computed, not stored)
        f0 = min(n + 0, features - 1)
        f1 = min(n + 1, features - 1)
        f2 = min(n + 2, features - 1)
        f3 = min(n + 3, features - 1)
        f4 = min(n + 4, features - 1)
        f5 = min(n + 5, features - 1)
        f6 = min(n + 6, features - 1)
        f7 = min(n + 7, features - 1)
        f8 = min(n + 8, features - 1)
        f9 = min(n + 9, features - 1)
        f10 = min(n + 10, features - 1)
        f11 = min(n + 11, features - 1)
        f12 = min(n + 12, features - 1)
        f13 = min(n + 13, features - 1)
        f14 = min(n + 14, features - 1)
        f15 = min(n + 15, features - 1)
        w0, w1, w2, w3 = f0 * k_dim, f1 * k_dim, f2 * k_dim, f3 * k_dim
        w4, w5, w6, w7 = f4 * k_dim, f5 * k_dim, f6 * k_dim, f7 * k_dim
        w8, w9, w10, w11 = f8 * k_dim, f9 * k_dim, f10 * k_dim, f11 * k_dim
        w12, w13, w14, w15 = f12 * k_dim, f13 * k_dim, f14 * k_dim, f15 * k_dim
        s0, s1 = v16splat(scale[f0]), v16splat(scale[f1])
        s2, s3 = v16splat(scale[f2]), v16splat(scale[f3])
        s4, s5 = v16splat(scale[f4]), v16splat(scale[f5])
        s6, s7 = v16splat(scale[f6]), v16splat(scale[f7])
        s8, s9 = v16splat(scale[f8]), v16splat(scale[f9])
        s10, s11 = v16splat(scale[f10]), v16splat(scale[f11])
        s12, s13 = v16splat(scale[f12]), v16splat(scale[f13])
        s14, s15 = v16splat(scale[f14]), v16splat(scale[f15])
        ahead = (n + WIDE_FEATURES) * k_dim  # the next group's rows, one contiguous run
        for m in range(rows):
            x0 = m * k_dim
            a0, a1, a2, a3 = v16zero(), v16zero(), v16zero(), v16zero()
            a4, a5, a6, a7 = v16zero(), v16zero(), v16zero(), v16zero()
            a8, a9, a10, a11 = v16zero(), v16zero(), v16zero(), v16zero()
            a12, a13, a14, a15 = v16zero(), v16zero(), v16zero(), v16zero()
            for k in range(0, k_dim, WIDE_LANES):
                if m == 0:  # 256 bytes of the next group per 256 bytes of this one
                    step = ahead + WIDE_FEATURES * k
                    for line in range(0, 256, 64):
                        prefetch(wf, min(step + line, last))
                u = v16load_bf16(xf, x0 + k)
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
            if n + WIDE_FEATURES <= features:
                v16store_bf16(out.ravel(), m * features + n, sums)
            else:
                spill = np.empty(WIDE_FEATURES, dtype=np.uint16)
                v16store_bf16(spill, 0, sums)
                for j in range(features - n):
                    out[m, n + j] = spill[j]


class Int8Weight:
    """An int8 weight [N, K] and its scales [N] as the kernels take them, checked and converted
    once: a one-row decode step makes ~120 matmuls, and doing both on every call cost ~15-20 us
    of a ~30-50 us call (2-core AVX2 EPYC). `qweight` and `scale` are kept so that a holder
    can tell whether it still has these tensors."""

    __slots__ = ("qweight", "scale", "weight_array", "scale_array", "rows_as_torch")

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        if qweight.dim() != 2 or scale.shape != qweight.shape[:1]:
            raise ValueError(
                f"int8_matmul: qweight {tuple(qweight.shape)} and scale {tuple(scale.shape)} "
                "do not fit [N, K] with [N] scales"
            )
        if not fits_int8_matmul(qweight):
            raise ValueError(
                f"int8_matmul needs input features in multiples of {LANES}, not {qweight.shape[1]}"
            )
        self.qweight, self.scale = qweight, scale
        self.weight_array = qweight.detach().contiguous().numpy()
        self.scale_array = _float32_numpy(scale)
        # whether `one_row_as_torch` gives torch's bits here: its AVX-512 kernel is the one
        # whose bits to give, it takes the scales in x's dtype (bfloat16), K in steps of 16
        self.rows_as_torch = (
            TORCH_INT8_VECTORISED
            and scale.dtype == torch.bfloat16
            and qweight.shape[1] % WIDE_LANES == 0
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (any float dtype) @ (qweight * scale).T -> [M, N] in x's dtype."""
        features, k_dim = self.weight_array.shape
        if x.dim() != 2 or x.shape[1] != k_dim:
            raise ValueError(
                f"int8_matmul: x {tuple(x.shape)}, qweight {tuple(self.qweight.shape)}, "
                f"scale {tuple(self.scale.shape)} do not fit [M, K] @ [N, K].T with [N] scales"
            )
        out = np.empty((x.shape[0], features), dtype=np.float32)
        if x.shape[0]:
            kernel = _int8_matvec if x.shape[0] == 1 else _int8_matmul
            with numba_threads_as_torch():
                kernel(_float32_numpy(x), self.weight_array, self.scale_array, out)
        result = torch.from_numpy(out)
        return result if x.dtype == torch.float32 else result.to(x.dtype)

    def one_row_as_torch(self, x: torch.Tensor) -> torch.Tensor:
        """torch's `_weight_int8pack_mm(x, qweight, scale)` for one bfloat16 row x [1, K] where
        `rows_as_torch`, bit for bit and ~1.3x faster: a decode step of one sequence reads
        every weight through it (121 matmuls of the default model: 4.5 -> 3.6 ms, 2-core
        AVX-512 EPYC), and rows in batches keep torch's kernel, whose bits these are."""
        out = np.empty((1, self.weight_array.shape[0]), dtype=np.uint16)
        with numba_threads_as_torch():
            _int8_rows_torch_order(
                x.contiguous().view(torch.uint16).numpy(),
                self.weight_array,
                self.scale_array,
                out,
            )
        return torch.from_numpy(out).view(torch.bfloat16)


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) @ (qweight [N, K] int8 * scale [N]).T -> [M, N] in x's dtype.
    K must be a multiple of 8 (`fits_int8_matmul`). `Int8Weight` converts a weight once for
    many calls."""
    return Int8Weight(qweight, scale).matmul(x)


def _float32_numpy(t: torch.Tensor) -> np.ndarray:
    """t as a C-contiguous float32 array, without a copy where it already is one."""
    t = t.detach()
    if t.dtype != torch.float32 or not t.is_contiguous():
        t = t.to(torch.float32).contiguous()
    return t.numpy()


def fits_int8_matmul(qweight: torch.Tensor) -> bool:
    """Whether `int8_matmul` takes this [N, K] weight: K a multiple of its eight lanes."""
    return qweight.shape[1] % LANES == 0


def torch_int8_is_vectorised() -> bool:
    """Whether torch's CPU int8 weight-pack matmul has a vector kernel here (AVX-512)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


# torch's int8 weight-pack matmul is vectorised for AVX-512 only; elsewhere ours runs
TORCH_INT8_VECTORISED = torch_int8_is_vectorised()
