"""The one thread that runs pensieve's multi-threaded torch work, and helper threads that don't.

Why one: torch's OpenMP runtime (libgomp) keeps a team of worker threads for every thread that
has run a parallel region, for as long as that thread lives, and once it manages more threads
than there are CPUs it spins only briefly between regions: the workers sleep, and each of a
step's hundreds of parallel ops pays for waking them. The engine used to load the model on
asyncio's helper thread, zero its KV pools on the event loop's thread and step on a third: three
teams. Measured on 2 cores (same 16-row decode plans captured from the ShareGPT replay, one
process): ~116-120 ms a step with one team, on the main thread or on another alike, ~150 ms
with a second team alive; in the replay the OpenMP worker went from ~55% busy to ~100%, and
decode steps of 12-16 rows from ~135 to ~100 ms. So loading, profiling, the pools' zero fill
and every step run on this thread; helper threads (copies, disk) and the event loop's copies
(export, import) run torch on one thread (no team).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Torch ops inside run on the calling thread alone: for copies on the event loop's thread
    (export, import), which would otherwise start a team there for as long as it lives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def helper_executor(name: str) -> ThreadPoolExecutor:
    """A one-thread pool for copies or file I/O whose torch ops run on that thread alone, so it
    never starts an OpenMP team (OpenMP's thread count is per thread; threads already running
    keep theirs, and the executor sets its own before every step)."""
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(1,)
    )
