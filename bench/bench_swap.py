"""Is the pipelined restore real? Time a host->device restore, a forward step, and both
together with layer i's attention waiting only for layer i's copy.

    python -m pensieve.bench.bench_swap [--context 4096] [--query 32] [--dtype float32]

Overlap is real when `both` is well under `restore + compute`.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from pensieve.actors.base import Replies
from pensieve.actors.executor import Executor
from pensieve.actors.swapper import Swapper
from pensieve.block_allocator import KVPool
from pensieve.config import EngineConfig
from pensieve.messages import SequenceRows, StepPlan, SwapOrder
from pensieve.runtime import load_pretrained
from pensieve.sampling import SamplingParams
from pensieve.stats import Counters


async def run(args: argparse.Namespace) -> dict[str, float]:
    loaded = load_pretrained(EngineConfig(model=args.model, dtype=args.dtype, device="cpu"))
    model, mc, bs = loaded.model, loaded.model.config, args.block_size
    n_blocks = -(-(args.context + args.query) // bs)
    shape = (mc.num_hidden_layers, n_blocks, bs, mc.num_key_value_heads, mc.head_dim, model.dtype)
    device_pool = KVPool.empty(*shape, device=model.device)
    host_pool = KVPool.empty(*shape, device=torch.device("cpu"))
    host_pool.keys.normal_()
    host_pool.values.normal_()
    replies, counters = Replies(), Counters()
    swapper = Swapper(device_pool, host_pool, replies, counters)
    executor = Executor(model, device_pool, replies, swapper.wait_for_layer)
    positions = list(range(args.context, args.context + args.query))
    rows = SequenceRows(
        request_id=1,
        tokens=[1] * args.query,
        positions=positions,
        slots=[(p // bs) * bs + p % bs for p in positions],
        block_table=list(range(n_blocks)),
        context_len=positions[-1] + 1,
        sample=True,
        sampling=SamplingParams(temperature=0),
    )
    restore_pairs = [(b, b) for b in range(args.context // bs)]
    loop = asyncio.get_running_loop()

    async def restore() -> float:
        ticket, done = replies.open()
        started = time.perf_counter()
        await swapper.handle(SwapOrder(ticket, "in", restore_pairs))
        await done
        return time.perf_counter() - started

    async def compute(ticket: int | None) -> float:
        started = time.perf_counter()
        await loop.run_in_executor(executor.worker, executor.run_step, StepPlan(0, [rows], ticket))
        return time.perf_counter() - started

    async def both() -> float:
        ticket, done = replies.open()
        started = time.perf_counter()
        copy = asyncio.create_task(swapper.handle(SwapOrder(ticket, "in", restore_pairs)))
        await asyncio.sleep(0)  # let the copy start and register its layer signals
        await compute(ticket)
        await copy
        await done
        return time.perf_counter() - started

    await compute(None)  # warm-up (kernel compilation)
    best = {"restore": 1e9, "compute": 1e9, "both": 1e9}
    for _ in range(args.repeats):
        best["restore"] = min(best["restore"], await restore())
        best["compute"] = min(best["compute"], await compute(None))
        best["both"] = min(best["both"], await both())
    swapper.worker.shutdown()
    executor.worker.shutdown()
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--context", type=int, default=4096, help="restored tokens")
    parser.add_argument("--query", type=int, default=32, help="new prompt tokens in the step")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    t = asyncio.run(run(args))
    total = t["restore"] + t["compute"]
    print(
        f"restore {t['restore'] * 1000:.1f} ms, compute {t['compute'] * 1000:.1f} ms, "
        f"sum {total * 1000:.1f} ms, pipelined {t['both'] * 1000:.1f} ms "
        f"({t['both'] / total:.2f}x of the sum)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
