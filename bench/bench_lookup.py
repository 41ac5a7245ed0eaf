"""Do lookups scale? Conversation resolution and a step's planning with many stored conversations.

    python -m pensieve.bench.bench_lookup [--conversations 10000] [--tokens 320] [--repeats 200]

Stores N idle conversations in a real TieredCache (block 32), then times, each as the median
and the 10th-90th percentile of `--repeats` runs:
- resolve: finding the conversation a client that resends its history continues (a hit and a
  miss), the work the scheduler does per new request;
- evict: one planning round under pressure: ahead-of-time swap-out of 8 chunks, their copies
  reported done, 8 reclaimed (the cache work of a step that needs room);
- step: a whole scheduler step (8 decode rows, fake executor and swapper) with the device tier
  full, so that every step evicts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable

from pensieve.actors.base import Actor
from pensieve.actors.scheduler import Scheduler
from pensieve.cache import TieredCache
from pensieve.config import EngineConfig
from pensieve.messages import StepPlan, StepResult, Submit, SwapDone, SwapOrder, TokenEvent
from pensieve.policy import CostModel
from pensieve.sampling import SamplingParams

BLOCK = 32


def fill(cache: TieredCache, n: int, tokens: int, rng: random.Random) -> list[list[int]]:
    """n idle conversations of `tokens` tokens each, sharing a system-prompt-like preamble."""
    preamble = [rng.randrange(50_000) for _ in range(24)]
    histories = []
    for i in range(n):
        history = preamble + [rng.randrange(50_000) for _ in range(tokens - len(preamble))]
        cid = f"conv-{i}"
        cache.acquire(cid, i + 1)
        cache.begin(cid)
        cache.commit(cid, cache.admit(cid, history).pending)
        cache.release(cid, i + 1)
        histories.append(history)
    return histories


def percentiles(samples: list[float]) -> dict[str, float]:
    deciles = statistics.quantiles(samples, n=10)
    ms = 1000.0
    return {"median_ms": statistics.median(samples) * ms, "p10_ms": deciles[0] * ms,
            "p90_ms": deciles[-1] * ms}  # fmt: skip


def timed(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


class InstantExecutor(Actor):
    async def handle(self, message: object) -> None:
        if isinstance(message, StepPlan):
            sampled = {r.request_id: 7 for r in message.rows if r.sample}
            message.reply.set_result(StepResult(message.step_id, sampled, 0.0))


class InstantSwapper(Actor):
    async def handle(self, message: SwapOrder) -> None:
        message.reply.set_result(SwapDone(len(message.pairs), 0.0))


class Discard(Actor):
    async def handle(self, message: TokenEvent) -> None:
        pass


async def time_steps(n: int, tokens: int, repeats: int) -> dict[str, float]:
    blocks = n * -(-tokens // BLOCK)
    cfg = EngineConfig(block_size=BLOCK, max_batch_tokens=512, profile_cost=False)
    cache = TieredCache(BLOCK, blocks, blocks, CostModel.linear())
    fill(cache, n, tokens, random.Random(1))
    scheduler = Scheduler(cache, cfg, 100_000, frozenset(), num_layers=30)
    actors = [InstantExecutor(), InstantSwapper(), Discard()]
    scheduler.connect(*actors)
    for actor in actors:
        actor.start()
    sampling = SamplingParams(temperature=0, max_tokens=10**6, ignore_eos=True)
    for i in range(8):  # 8 new conversations that keep decoding while the tier is full
        scheduler.send(Submit(10**7 + i, f"new-{i}", list(range(1, 40)), sampling))
        await scheduler.handle(scheduler.mailbox.get_nowait())
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        await scheduler.step()
        samples.append(time.perf_counter() - started)
    for actor in actors:
        await actor.stop()
    return percentiles(samples[5:])


def run(n: int, tokens: int, repeats: int) -> dict[str, dict[str, float]]:
    rng = random.Random(0)
    blocks = n * -(-tokens // BLOCK)
    cache = TieredCache(BLOCK, blocks + 64, blocks, CostModel.linear())
    histories = fill(cache, n, tokens, rng)
    returning = histories[n // 2] + [1, 2, 3]
    stranger = histories[0][:24] + [rng.randrange(50_000) for _ in range(tokens)]
    assert cache.resolve(returning)[0] == f"conv-{n // 2}"
    assert cache.resolve(stranger)[0] is None

    def evict() -> None:
        copies = cache.plan_swap_out(8)
        cache.swap_out_done(copies, ok=True)
        cache.reclaim(8)

    return {
        "resolve_hit": timed(lambda: cache.resolve(returning), repeats),
        "resolve_miss": timed(lambda: cache.resolve(stranger), repeats),
        "evict": timed(evict, repeats),
        "step": asyncio.run(time_steps(n, tokens, repeats)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=320, help="tokens per stored conversation")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.conversations, args.tokens, args.repeats)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.conversations} stored conversations of {args.tokens} tokens")
    for name, r in result.items():
        print(f"{name:13s} median {r['median_ms']:7.3f} ms  (p10 {r['p10_ms']:.3f}, "
              f"p90 {r['p90_ms']:.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
