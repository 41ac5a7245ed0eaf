"""The swapper actor: moves KV blocks between the device and host tiers, layer by layer.

Orders run one at a time on one worker thread, so the two directions never copy at once. The
copies go straight between the two pools (pinned host memory on a GPU host), as runs of
adjacent blocks (`pensieve.block_copy`), on the swapper's own CUDA stream on a GPU host. One
code path serves both hosts: on a CPU host a copy has landed when its call returns, on a GPU
host when its stream says so.

Race-free by construction:
- A swap-in with a LayerProgress copies layer by layer; after issuing layer i it records a CUDA
  event on the copy stream, stores it in the progress and only then sets layer i's signal, so
  the executor's attention for layer i (`LayerProgress.wait`) orders its stream after exactly
  that copy, and never looks up a signal that does not exist yet (the scheduler made them).
- Every order ends with the copy stream synchronised, failed orders too, before its SwapDone is
  sent. The cache marks a host copy valid (or a restored device block usable, or a failed
  copy's blocks free) only on SwapDone, so no CPU code reads a host block, and no block is
  reused, while a copy may still touch it.
- An order that fails (a bad block id, a runtime error) answers SwapDone(error=...) and fails
  its LayerProgress; none of its pairs counts, and the scheduler keeps the chunks where they
  were.

Blocks being copied out were written by steps that already ended (the executor synchronises its
device after every step), and blocks being restored are fresh, so the copy stream never needs
to wait for the compute stream (which would serialise the overlap away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import torch

from pensieve.actors.base import Actor
from pensieve.block_allocator import KVPool
from pensieve.block_copy import BlockCopier, check_runs, coalesce, pick_copier
from pensieve.compute_thread import helper_executor
from pensieve.messages import LayerProgress, SwapDone, SwapOrder

log = logging.getLogger("pensieve.swapper")


class Swapper(Actor):
    name = "swapper"

    def __init__(
        self, device_pool: KVPool, host_pool: KVPool | None, copier: BlockCopier | None = None
    ):
        super().__init__()
        self.device_pool, self.host_pool = device_pool, host_pool
        self.num_layers = device_pool.keys.shape[0]
        device = device_pool.keys.device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.copier = copier or pick_copier(device, self.stream)
        if self.stream is not None and host_pool is not None and not host_pool.keys.is_pinned():
            log.warning("the host tier is not pinned: swaps will be synchronous and slow")
        self.worker = helper_executor("pensieve-copy")

    async def handle(self, message: SwapOrder) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            await loop.run_in_executor(self.worker, self.copy, message)
            done = SwapDone(len(message.pairs), time.perf_counter() - started)
        except Exception as exc:
            log.exception("swap-%s failed", message.direction)
            done = SwapDone(0, time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}")
        if not message.reply.done():
            message.reply.set_result(done)

    def copy(self, order: SwapOrder) -> None:
        """Copy every pair; return only once every byte has landed (or raise, likewise)."""
        progress = order.progress
        try:
            try:
                self._issue(order, progress)
            finally:
                self._drain()  # nothing may still read or write either pool after this
        except BaseException as exc:
            if progress is not None:
                progress.fail(f"{type(exc).__name__}: {exc}")
            raise

    def _issue(self, order: SwapOrder, progress: LayerProgress | None) -> None:
        if self.host_pool is None:
            raise RuntimeError("no host tier to swap with")
        if order.direction not in ("in", "out"):
            raise ValueError(f"unknown swap direction {order.direction!r}")
        src, dst = (
            (self.host_pool, self.device_pool)
            if order.direction == "in"
            else (self.device_pool, self.host_pool)
        )
        runs = coalesce(order.pairs)
        check_runs(src, dst, runs)
        self.copier.begin()
        with self._on_stream():
            if progress is None:  # nobody waits per layer: all layers of a run at once
                self.copier.copy(src, dst, runs, range(self.num_layers))
                return
            for layer in range(self.num_layers):
                self.copier.copy(src, dst, runs, range(layer, layer + 1))
                progress.cuda_events[layer] = self._record()
                progress.ready[layer].set()

    def _on_stream(self) -> contextlib.AbstractContextManager:
        return (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        )

    def _record(self) -> torch.cuda.Event | None:
        """An event after the copies issued so far (None on a CPU host: they have landed)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def _drain(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    async def stop(self) -> None:
        await super().stop()
        self.worker.shutdown(wait=True)
