"""The swapper actor: moves KV blocks between the device and host tiers, layer by layer.

Copies run on one worker (a CUDA side stream on a GPU host, a copy thread on a CPU host), in
order, so the two directions never copy at once. A swap-in signals each layer as it lands, so
the executor's attention for layer i waits for layer i only (pipelined restore).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from pensieve.actors.base import Actor, Replies
from pensieve.block_allocator import KVPool
from pensieve.messages import SwapDone, SwapOrder
from pensieve.stats import Counters


class LayerSignals:
    """One event per layer (plus a CUDA event per layer on a GPU host)."""

    def __init__(self, num_layers: int, cuda: bool):
        self.ready = [threading.Event() for _ in range(num_layers)]
        self.cuda_events = [torch.cuda.Event() for _ in range(num_layers)] if cuda else None
        self.error: BaseException | None = None


class Swapper(Actor):
    name = "swapper"

    def __init__(
        self, device_pool: KVPool, host_pool: KVPool | None, replies: Replies, counters: Counters
    ):
        super().__init__()
        self.device_pool, self.host_pool = device_pool, host_pool
        self.replies = replies
        self.counters = counters
        self.num_layers = device_pool.keys.shape[0]
        self.cuda = device_pool.keys.is_cuda
        self.stream = torch.cuda.Stream(device_pool.keys.device) if self.cuda else None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pensieve-copy")
        self.signals: dict[int, LayerSignals] = {}

    async def handle(self, message: SwapOrder) -> None:
        signals = self.signals[message.ticket] = LayerSignals(self.num_layers, self.cuda)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            await loop.run_in_executor(self.worker, self._copy, message, signals)
        except Exception as exc:
            self.replies.fail(message.ticket, exc)
            return
        finally:
            if message.direction == "out":
                self.signals.pop(message.ticket, None)
        blocks = len(message.pairs)
        if message.direction == "in":
            self.counters.swap_in_blocks += blocks
        else:
            self.counters.swap_out_blocks += blocks
        self.replies.resolve(
            message.ticket, SwapDone(message.ticket, blocks, time.perf_counter() - started)
        )

    def _copy(self, order: SwapOrder, signals: LayerSignals) -> None:
        if self.host_pool is None:
            raise RuntimeError("no host tier to swap with")
        src_pool, dst_pool = (
            (self.host_pool, self.device_pool)
            if order.direction == "in"
            else (self.device_pool, self.host_pool)
        )
        device = dst_pool.keys.device
        src_idx = torch.tensor(
            [s for s, _ in order.pairs], dtype=torch.long, device=src_pool.keys.device
        )
        dst_idx = torch.tensor([d for _, d in order.pairs], dtype=torch.long, device=device)
        try:
            for layer in range(self.num_layers):
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        self._copy_layer(src_pool, dst_pool, layer, src_idx, dst_idx)
                        signals.cuda_events[layer].record(self.stream)  # type: ignore[index]
                else:
                    self._copy_layer(src_pool, dst_pool, layer, src_idx, dst_idx)
                signals.ready[layer].set()
            if self.stream is not None:
                self.stream.synchronize()
        except BaseException as exc:
            signals.error = exc
            for event in signals.ready:
                event.set()
            raise

    @staticmethod
    def _copy_layer(
        src: KVPool, dst: KVPool, layer: int, src_idx: torch.Tensor, dst_idx: torch.Tensor
    ) -> None:
        for s, d in ((src.keys, dst.keys), (src.values, dst.values)):
            rows = s[layer].index_select(0, src_idx.to(s.device))
            d[layer].index_copy_(0, dst_idx, rows.to(d.device, non_blocking=True))

    def wait_for_layer(self, ticket: int, layer: int) -> None:
        """Called from the executor's thread: block until layer `layer` of a swap-in landed."""
        signals = self.signals[ticket]
        signals.ready[layer].wait()
        if signals.error is not None:
            raise RuntimeError(f"swap-in failed: {signals.error}")
        if signals.cuda_events is not None:
            torch.cuda.current_stream().wait_event(signals.cuda_events[layer])
        if layer == self.num_layers - 1:
            self.signals.pop(ticket, None)

    async def stop(self) -> None:
        await super().stop()
        self.worker.shutdown(wait=True)
