"""Weight-only int8 matmul on CPUs where torch's has no vector kernel.

torch's `_weight_int8pack_mm` is vectorised for AVX-512 only; on an AVX2 CPU (measured on a
2-core AMD EPYC, float32 activations) it ran a decode step 1.8x slower than float32 at one row
and ~19x slower at 24 rows. This kernel computes the same out = (x @ q.T) * scale: each output
feature's int8 row is widened in registers and dotted with ROWS_PER_PASS activation rows at a
time (each weight element loaded once for them), two output features per pass, groups of
features spread over the cores.

Batch invariance: the activation rows are padded to a multiple of ROWS_PER_PASS with zeros, so
every row runs through the same code and the same order of sums, whatever the row count.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .cpu_threads import numba_threads_as_torch

ROWS_PER_PASS = 4  # activation rows sharing each weight load; fixed by the four accumulators
FEATURES_PER_ITEM = 16  # output features per work item handed to a thread


@njit(parallel=True, nogil=True, fastmath=True, error_model="numpy", cache=True)
def _int8_matmul(x, qweight, scale, out):
    """out[m, n] = scale[n] * sum_k x[m, k] * qweight[n, k]; x has a multiple of 4 rows and
    qweight an even number of rows. Two features x four rows per pass: eight accumulators,
    each weight element loaded once for four rows, each activation once for two features."""
    rows, k_dim = x.shape
    features = qweight.shape[0]
    for item in prange((features + FEATURES_PER_ITEM - 1) // FEATURES_PER_ITEM):
        for n in range(item * FEATURES_PER_ITEM, min(features, (item + 1) * FEATURES_PER_ITEM), 2):
            for m in range(0, rows, ROWS_PER_PASS):
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                b0 = np.float32(0.0)
                b1 = np.float32(0.0)
                b2 = np.float32(0.0)
                b3 = np.float32(0.0)
                for k in range(k_dim):
                    w = np.float32(qweight[n, k])
                    u = np.float32(qweight[n + 1, k])
                    x0, x1, x2, x3 = x[m, k], x[m + 1, k], x[m + 2, k], x[m + 3, k]
                    a0 += x0 * w
                    a1 += x1 * w
                    a2 += x2 * w
                    a3 += x3 * w
                    b0 += x0 * u
                    b1 += x1 * u
                    b2 += x2 * u
                    b3 += x3 * u
                s, t = scale[n], scale[n + 1]
                out[m, n], out[m, n + 1] = a0 * s, b0 * t
                out[m + 1, n], out[m + 1, n + 1] = a1 * s, b1 * t
                out[m + 2, n], out[m + 2, n + 1] = a2 * s, b2 * t
                out[m + 3, n], out[m + 3, n + 1] = a3 * s, b3 * t


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) @ (qweight [N, K] int8 * scale [N]).T -> [M, N] in x's dtype.
    N must be even (two features per pass)."""
    if x.dim() != 2 or x.shape[1] != qweight.shape[1] or scale.shape != qweight.shape[:1]:
        raise ValueError(
            f"int8_matmul: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
            f"scale {tuple(scale.shape)} do not fit [M, K] @ [N, K].T with [N] scales"
        )
    if qweight.shape[0] % 2:
        raise ValueError(
            f"int8_matmul needs an even number of output features, not {qweight.shape[0]}"
        )
    rows = x.shape[0]
    padded = -(-rows // ROWS_PER_PASS) * ROWS_PER_PASS or ROWS_PER_PASS
    xf = torch.zeros((padded, x.shape[1]), dtype=torch.float32)
    xf[:rows] = x.detach()
    out = torch.empty((padded, qweight.shape[0]), dtype=torch.float32)
    with numba_threads_as_torch():
        _int8_matmul(xf.numpy(), qweight.numpy(), scale.float().contiguous().numpy(), out.numpy())
    return out[:rows].to(x.dtype)


def torch_int8_is_vectorised() -> bool:
    """Whether torch's CPU int8 weight-pack matmul has a vector kernel here (AVX-512)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
