"""Numba's parallel CPU kernels on torch's thread count, leaving torch's setting as it was."""

from __future__ import annotations

import threading

import torch
from numba import config, set_num_threads

_applied = threading.local()  # per thread: the thread count Numba was last set to


class numba_threads_as_torch:  # noqa: N801 - used as a function: `with numba_threads_as_torch():`
    """Run the enclosed Numba `prange` loops on as many threads as torch is set to use.

    The setting is Numba's per thread and costs microseconds to make, which a decode step would
    pay ~150 times (measured ~15 us a kernel call on a 2-core EPYC), so it is made only when it
    changes. (Numba's `set_parallel_chunksize` is not used: with its OpenMP and workqueue
    layers here, `prange` still split its range into equal contiguous parts, one per thread.)
    Numba's OpenMP layer, when it starts in a thread, sets that thread's OpenMP count to its
    own, which would silently change torch's (and with it the order of torch's parallel
    reductions): checked after every kernel, restored if changed."""

    __slots__ = ("threads",)

    def __init__(self) -> None:
        self.threads = torch.get_num_threads()
        if getattr(_applied, "threads", None) != self.threads:
            set_num_threads(min(self.threads, config.NUMBA_NUM_THREADS))
            _applied.threads = self.threads

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
