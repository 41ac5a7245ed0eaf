"""Numba's parallel CPU kernels on torch's thread count, leaving torch's setting as it was."""

from __future__ import annotations

import threading

import torch
from numba import config, set_num_threads, set_parallel_chunksize

_applied = threading.local()  # per thread: the (threads, chunksize) Numba was last set to


class numba_threads_as_torch:  # noqa: N801 - used as a function: `with numba_threads_as_torch():`
    """Run the enclosed Numba `prange` loops on as many threads as torch is set to use, handing
    out `chunksize` iterations at a time (0: Numba's default split).

    Both settings are Numba's per thread and cost microseconds to make, which a decode step
    would pay ~150 times (measured ~15 us a kernel call on a 2-core EPYC), so they are made only
    when they change. The chunk size stays set for the thread afterwards: only these kernels
    use Numba's parallel loops. Numba's OpenMP layer, when it starts in a thread, sets that
    thread's OpenMP count to its own, which would silently change torch's (and with it the
    order of torch's parallel reductions): checked after every kernel, restored if changed."""

    __slots__ = ("threads",)

    def __init__(self, chunksize: int = 0) -> None:
        self.threads = torch.get_num_threads()
        wanted = (self.threads, chunksize)
        if getattr(_applied, "setting", None) != wanted:
            set_parallel_chunksize(chunksize)
            set_num_threads(min(self.threads, config.NUMBA_NUM_THREADS))
            _applied.setting = wanted

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
