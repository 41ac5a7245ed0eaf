"""The write_kv kernel: copy each new token's K and V rows into its pool slot.

A token's [Hkv, D] K (or V) row is contiguous in the step's projection and in its pool slot
(slot s starts at word s * Hkv * words_per_row), so one thread moves one 16-byte vector of K and
one of V with `ld4`/`st4`; the word-by-word variant serves rows whose bytes are not 16-aligned.
The token of a thread is a division by a compile-time constant, once per thread.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import cuda

from .cuda_plan import words_per_row
from .cuda_prims import ld4, st4


def write_source(fmt: str, head_dim: int, hkv: int, vector: bool) -> Callable:
    """The kernel's Python function: thread i copies unit i (a vector or a word) of K and V."""
    ROW = hkv * words_per_row(fmt, head_dim)  # words of one token's K (or V)
    UNIT = 4 if vector else 1
    UNITS = ROW // UNIT  # units per token

    def write_kv(k, ks, v, vs, kc, vc, slots, n):
        gid = np.int32(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x)
        t = np.int32(gid // UNITS)
        if t >= n:
            return
        slot = slots[np.uint64(t)]
        if slot < 0:
            return
        c = np.int32((gid - t * UNITS) * UNIT)
        dst = np.int32(slot * ROW + c)
        if UNIT == 4:
            w0, w1, w2, w3 = ld4(k, np.int32(t * ks + c))
            st4(kc, dst, w0, w1, w2, w3)
            w0, w1, w2, w3 = ld4(v, np.int32(t * vs + c))
            st4(vc, dst, w0, w1, w2, w3)
        else:
            kc[np.uint64(dst)] = k[np.uint64(t * ks + c)]
            vc[np.uint64(dst)] = v[np.uint64(t * vs + c)]

    return write_kv
