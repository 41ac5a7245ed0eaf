"""What does HTTP cost? Time to first token and total time of the same turns through the
in-process library and through `pensieve serve`'s streaming endpoint (same engine, loopback).

    python -m pensieve.bench.bench_http [--turns 20] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from pensieve.bench.targets import EngineTarget, OpenAITarget, TurnResult
from pensieve.config import EngineConfig
from pensieve.engine import Engine
from pensieve.server.app import create_app, start_server


async def timed(
    target: EngineTarget | OpenAITarget, turns: int, max_tokens: int, tag: str
) -> tuple[list[float], list[float]]:
    ttft, total = [], []
    for i in range(turns):
        messages = [{"role": "user", "content": f"Say something about the number {i}."}]
        started = time.perf_counter()
        result: TurnResult = await target.chat(messages, max_tokens, f"{tag}-{i}")
        if result.error or result.first_token_time is None:
            raise RuntimeError(f"turn failed: {result.error}")
        ttft.append(result.first_token_time - started)
        total.append(result.end_time - started)
    return ttft, total


async def run(args: argparse.Namespace) -> None:
    config = EngineConfig(model=args.model, dtype=args.dtype, profile_cost=False)
    async with Engine(config) as engine:
        app = create_app(engine)
        runner, port = await start_server(app, "127.0.0.1", 0)
        try:
            library = EngineTarget(engine)
            async with OpenAITarget(f"http://127.0.0.1:{port}") as http:
                await timed(library, 2, args.max_tokens, "warm-lib")
                await timed(http, 2, args.max_tokens, "warm-http")
                samples: dict[str, tuple[list[float], list[float]]] = {
                    "library": ([], []),
                    "http": ([], []),
                }
                for i in range(args.turns):  # interleaved, so drift hits both paths alike
                    for name, target in (("library", library), ("http", http)):
                        ttft, total = await timed(target, 1, args.max_tokens, f"{name}-{i}")
                        samples[name][0].extend(ttft)
                        samples[name][1].extend(total)
                rows = [
                    (name, statistics.median(t), statistics.median(w))
                    for name, (t, w) in samples.items()
                ]
        finally:
            await runner.cleanup()
    print("| path | TTFT p50 ms | turn p50 ms |")
    print("|---|---|---|")
    for name, ttft, total in rows:
        print(f"| {name} | {ttft * 1000:.1f} | {total * 1000:.1f} |")
    print(
        f"HTTP overhead: TTFT +{(rows[1][1] - rows[0][1]) * 1000:.1f} ms, "
        f"turn +{(rows[1][2] - rows[0][2]) * 1000:.1f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
