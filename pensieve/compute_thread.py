"""The one thread that runs pensieve's multi-threaded torch work, and helper threads that don't.

Why one: torch's OpenMP runtime (libgomp) keeps a team of worker threads for every thread that
has run a parallel region, for as long as that thread lives, and once it manages more threads
than there are CPUs it spins only briefly between regions: the workers sleep, and each of a
step's hundreds of parallel ops pays for waking them. Measured on 2 cores (same 16-row decode
steps, same process): ~100 ms, and ~130 ms once a second live thread had run one 2-thread
matmul. The engine used to load and profile the model on asyncio's helper thread and step on
its own: two teams. So loading, profiling and every step run on this one thread, and helper
threads (copies, disk) run torch on one thread (no team). Not solved by this: a master that is
not the process's main thread still counts one thread over 2 CPUs (steps measured ~1.4x those
run on the main thread); see bench/README.md.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
THREAD_NAME = "pensieve-compute"

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_compute_ident: int | None = None  # the thread that runs compute, once known


def compute_executor() -> ThreadPoolExecutor:
    """The process's compute thread, started at first use and shared by every engine (on one
    machine their steps compete for the same cores anyway); it starts with the thread count of
    the thread that first asked for it."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=THREAD_NAME,
                initializer=_become_compute_thread,
                initargs=(torch.get_num_threads(),),
            )
        return _executor


def _become_compute_thread(threads: int) -> None:
    global _compute_ident
    _compute_ident = threading.get_ident()
    torch.set_num_threads(threads)


def on_compute_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) run on the compute thread and waited for; run here if this is it,
    or if this is the main thread and no compute thread has started (one-shot scripts)."""
    here = threading.get_ident()
    if here == _compute_ident or (_executor is None and here == threading.main_thread().ident):
        return fn(*args, **kwargs)
    return compute_executor().submit(fn, *args, **kwargs).result()


async def run_on_compute_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """Await fn(*args, **kwargs) on the compute thread; the event loop keeps running."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(compute_executor(), functools.partial(fn, *args, **kwargs))


def single_torch_thread() -> None:
    """Initializer of helper threads: torch runs their ops on the calling thread alone, so they
    never start an OpenMP team of their own (OpenMP's thread count is per thread; threads that
    already run keep theirs, and the executor sets its own before every step)."""
    torch.set_num_threads(1)


def helper_executor(name: str) -> ThreadPoolExecutor:
    """A one-thread pool for copies or file I/O whose torch ops stay single-threaded."""
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix=name, initializer=single_torch_thread
    )
