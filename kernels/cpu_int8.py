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

from .cpu_int8_torch_order import WIDE_LANES, matmul_as_torch
from .cpu_threads import numba_threads_as_torch
from .simd import prefetch, vfma, vlane, vload, vload_i8, vsum8x8, vzero

FEATURES_PER_ITEM = 16  # output features per work item handed to a thread
LANES = 8  # K is walked eight elements at a time: it must be a multiple of this


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
        # whether `matmul_as_torch` gives torch's bits here: its AVX-512 kernel is the one
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

    def matmul_as_torch(self, x: torch.Tensor) -> torch.Tensor:
        """torch's `_weight_int8pack_mm(x, qweight, scale)` for bfloat16 rows x [M, K] where
        `rows_as_torch`, bit for bit (`cpu_int8_torch_order`), faster for few rows."""
        return matmul_as_torch(x, self.weight_array, self.scale_array)


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
