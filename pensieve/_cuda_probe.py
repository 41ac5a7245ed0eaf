"""The kernel `pensieve.cuda_setup` compiles and runs at start-up (imported only on a GPU host
or by the PTX test: importing numba.cuda is kept out of CPU-only processes)."""

from __future__ import annotations

from numba import cuda

SIGNATURE = "void(float32[::1], float32[::1])"
THREADS = 64


def reverse_scale(out, x):  # noqa: ANN001, ANN201
    """out[i] = 2 * x[n - 1 - i] + 1, through shared memory and a barrier."""
    tile = cuda.shared.array(THREADS, dtype="float32")
    i = cuda.threadIdx.x
    if i < x.size:
        tile[i] = x[i]
    cuda.syncthreads()
    if i < x.size:
        out[i] = tile[x.size - 1 - i] * 2.0 + 1.0
