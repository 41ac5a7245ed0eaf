"""One compute thread runs loading, profiling and steps; helper threads stay single-threaded."""

from __future__ import annotations

import asyncio
import threading

import torch

from pensieve import compute_thread


def test_jobs_share_one_thread_and_run_inline_there() -> None:
    compute_thread.compute_executor()  # started (the main thread runs jobs itself until then)
    seen = {compute_thread.on_compute_thread(threading.get_ident) for _ in range(3)}
    assert len(seen) == 1 and threading.get_ident() not in seen
    # asked from the compute thread itself, a job runs inline (no deadlock on a one-thread pool)
    nested = compute_thread.on_compute_thread(compute_thread.on_compute_thread, threading.get_ident)
    assert nested in seen
    assert asyncio.run(compute_thread.run_on_compute_thread(threading.get_ident)) in seen


def test_compute_thread_keeps_the_callers_thread_count() -> None:
    assert compute_thread.on_compute_thread(torch.get_num_threads) == torch.get_num_threads()


def test_helper_threads_run_torch_single_threaded() -> None:
    before = torch.get_num_threads()
    helper = compute_thread.helper_executor("test-helper")
    try:
        assert helper.submit(torch.get_num_threads).result() == 1
    finally:
        helper.shutdown()
    assert torch.get_num_threads() == before  # this thread keeps its own count
