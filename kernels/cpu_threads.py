"""Numba's parallel CPU kernels on torch's thread count, leaving torch's setting as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from numba import config, get_parallel_chunksize, set_num_threads, set_parallel_chunksize


@contextmanager
def numba_threads_as_torch(chunksize: int = 0) -> Iterator[None]:
    """Run the enclosed Numba `prange` loops on as many threads as torch is set to use, handing
    out `chunksize` iterations at a time (0: Numba's default split).

    Numba's OpenMP layer, when it starts in a thread, sets that thread's OpenMP count to its
    own, which would silently change torch's (and with it the order of torch's parallel
    reductions): read first, restored after."""
    threads = torch.get_num_threads()
    previous = get_parallel_chunksize()
    try:
        set_parallel_chunksize(chunksize)
        set_num_threads(min(threads, config.NUMBA_NUM_THREADS))
        yield
    finally:
        set_parallel_chunksize(previous)
        torch.set_num_threads(threads)
