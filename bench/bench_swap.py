"""Is the pipelined restore real? Time a host->device restore, a forward step, and both
together with layer i's attention waiting only for layer i's copy.

    python -m pensieve.bench.bench_swap [--context 4096] [--query 32] [--dtype float32]
                                        [--device auto]

Overlap is real when `both` is well under `restore + compute`.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from pensieve.actors.executor import Executor
from pensieve.actors.swapper import Swapper
from pensieve.block_allocator import KVPool
from pensieve.config import EngineConfig
from pensieve.messages import LayerProgress, SequenceRows, StepPlan, SwapOrder
from pensieve.runtime import LoadedModel, load_pretrained
from pensieve.sampling import SamplingParams


async def run(args: argparse.Namespace, loaded: LoadedModel | None = None) -> dict[str, float]:
    """Best-of-`repeats` seconds of a restore, a step, and both pipelined."""
    if loaded is None:
        cfg = EngineConfig(model=args.model, dtype=args.dtype, device=args.device)
        loaded = load_pretrained(cfg)
    model, mc, bs = loaded.model, loaded.model.config, args.block_size
    n_blocks = -(-(args.context + args.query) // bs)
    shape = (mc.num_hidden_layers, n_blocks, bs, mc.num_key_value_heads, mc.head_dim, model.dtype)
    device_pool = KVPool.empty(*shape, device=model.device)
    # the host tier as the engine makes it: pinned on a GPU host, so copies run asynchronously
    host_pool = KVPool.empty(*shape, device=torch.device("cpu"), pin_memory=True)
    host_pool.keys.normal_()
    host_pool.values.normal_()
    swapper, executor = Swapper(device_pool, host_pool), Executor(model, device_pool)
    swapper.start()
    executor.start()
    positions = list(range(args.context, args.context + args.query))
    rows = SequenceRows(
        request_id=1,
        tokens=[1] * args.query,
        positions=positions,
        block_table=list(range(n_blocks)),
        context_len=positions[-1] + 1,
        sample=True,
        sampling=SamplingParams(temperature=0),
    )
    restore_pairs = [(b, b) for b in range(args.context // bs)]
    loop = asyncio.get_running_loop()

    def restore_order(progress: LayerProgress | None = None) -> asyncio.Future:
        reply = loop.create_future()
        swapper.send(SwapOrder("in", restore_pairs, reply, progress))
        return reply

    def step(progress: LayerProgress | None) -> asyncio.Future:
        reply = loop.create_future()
        executor.send(StepPlan(0, [rows], reply, progress))
        return reply

    async def timed(*replies: asyncio.Future) -> float:
        started = time.perf_counter()
        for reply in replies:
            result = await reply
            if result.error is not None:
                raise RuntimeError(result.error)
        return time.perf_counter() - started

    await timed(step(None))  # warm-up (kernel compilation)
    best = {"restore": 1e9, "compute": 1e9, "both": 1e9}
    for _ in range(args.repeats):
        best["restore"] = min(best["restore"], await timed(restore_order()))
        best["compute"] = min(best["compute"], await timed(step(None)))
        progress = LayerProgress(mc.num_hidden_layers)
        best["both"] = min(best["both"], await timed(restore_order(progress), step(progress)))
    await swapper.stop()
    await executor.stop()
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
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
