"""The swapper actor: moves KV blocks between the device and host tiers, layer by layer.

Copies run on one worker (a CUDA side stream on a GPU host, a copy thread on a CPU host), in
order, so the two directions never copy at once. A swap-in signals its LayerProgress as each
layer lands, so the executor's attention for layer i waits for layer i only (pipelined
restore). Every order is answered with a SwapDone: all pairs copied, or an error and none
counts (the scheduler then keeps the chunks where they were).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from pensieve.actors.base import Actor
from pensieve.block_allocator import KVPool
from pensieve.messages import LayerProgress, SwapDone, SwapOrder

log = logging.getLogger("pensieve.swapper")


class Swapper(Actor):
    name = "swapper"

    def __init__(self, device_pool: KVPool, host_pool: KVPool | None):
        super().__init__()
        self.device_pool, self.host_pool = device_pool, host_pool
        self.num_layers = device_pool.keys.shape[0]
        device = device_pool.keys.device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pensieve-copy")

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
        """Copy every pair, layer by layer, signalling `order.progress` per layer."""
        progress = order.progress or LayerProgress(self.num_layers)
        try:
            if self.host_pool is None:
                raise RuntimeError("no host tier to swap with")
            src_pool, dst_pool = (
                (self.host_pool, self.device_pool)
                if order.direction == "in"
                else (self.device_pool, self.host_pool)
            )
            src_idx = torch.tensor([s for s, _ in order.pairs], dtype=torch.long)
            dst_idx = torch.tensor([d for _, d in order.pairs], dtype=torch.long)
            for layer in range(self.num_layers):
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        self.copy_layer(src_pool, dst_pool, layer, src_idx, dst_idx)
                        event = torch.cuda.Event()
                        event.record(self.stream)
                        progress.cuda_events[layer] = event
                else:
                    self.copy_layer(src_pool, dst_pool, layer, src_idx, dst_idx)
                progress.ready[layer].set()
            if self.stream is not None:
                self.stream.synchronize()
        except BaseException as exc:
            progress.fail(f"{type(exc).__name__}: {exc}")
            raise

    @staticmethod
    def copy_layer(
        src: KVPool, dst: KVPool, layer: int, src_idx: torch.Tensor, dst_idx: torch.Tensor
    ) -> None:
        for s, d in ((src.keys, dst.keys), (src.values, dst.values)):
            rows = s[layer].index_select(0, src_idx.to(s.device))
            d[layer].index_copy_(0, dst_idx.to(d.device), rows.to(d.device, non_blocking=True))

    async def stop(self) -> None:
        await super().stop()
        self.worker.shutdown(wait=True)
