"""Time to first token of a returning conversation after a restart: read from the disk tier vs
recomputed from scratch.

    python -m pensieve.bench.bench_restart [--lengths 512 2048 8192] [--repeats 3] [--dtype auto]

For each history length: one engine with a state directory serves a turn whose history has that
many tokens and stops (its record is committed); a new engine on the same directory serves the
next turn (chunks read back from disk, then restored layer by layer); a third engine without
state serves the same next turn from scratch. Each point is the median of `--repeats` runs
(each run with a fresh directory and fresh engines), with the min and max.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time

from pensieve.config import EngineConfig
from pensieve.engine import Engine
from pensieve.runtime import LoadedModel, load_pretrained
from pensieve.sampling import SamplingParams

ONE = SamplingParams(temperature=0, max_tokens=1)


def history_of(loaded: LoadedModel, tokens: int) -> list[dict[str, str]]:
    """A user message whose chat rendering has about `tokens` tokens."""
    words = "the seven rivers run quietly past the blue house and the red tree".split()
    text, n = [], 0
    while n < tokens - 16:
        text.append(words[len(text) % len(words)])
        n = len(loaded.tokenizer.encode(" ".join(text)))
    return [{"role": "user", "content": " ".join(text)}]


async def ttft(engine: Engine, messages: list[dict[str, str]], cid: str) -> tuple[float, int]:
    started = time.perf_counter()
    stream = engine.chat(messages, cid, ONE)
    async for _ in stream:
        break
    elapsed = time.perf_counter() - started
    await stream.aclose()
    return elapsed, stream.usage.cached_tokens if stream.usage else 0


async def one_run(loaded: LoadedModel, cfg: dict, length: int) -> dict[str, float]:
    # the next turn (reply + question + answer) must still fit the model's window
    messages = history_of(loaded, min(length, loaded.max_context - 64))
    with tempfile.TemporaryDirectory() as state:
        config = EngineConfig(state_dir=state, **cfg)
        async with Engine(config, loaded=loaded) as first:
            stream = first.chat(messages, "c", SamplingParams(temperature=0, max_tokens=8))
            reply = await stream.text()
        follow = [*messages, {"role": "assistant", "content": reply}]
        follow.append({"role": "user", "content": "Summarise that."})
        async with Engine(config, loaded=loaded) as restarted:
            disk_s, cached = await ttft(restarted, follow, "c")
    async with Engine(EngineConfig(**cfg), loaded=loaded) as fresh:
        scratch_s, _ = await ttft(fresh, follow, "c")
    return {"disk_s": disk_s, "scratch_s": scratch_s, "cached_tokens": cached}


async def run(args: argparse.Namespace) -> list[dict[str, float]]:
    cfg = {"model": args.model, "dtype": args.dtype, "device": args.device}
    loaded = load_pretrained(EngineConfig(**cfg))
    engine_cfg = {**cfg, "device_cache_tokens": 2 * max(args.lengths) + 1024}
    rows = []
    for length in args.lengths:
        runs = [await one_run(loaded, engine_cfg, length) for _ in range(args.repeats)]
        row = {"history_tokens": length, "cached_tokens": runs[-1]["cached_tokens"]}
        row["history_tokens"] = min(length, loaded.max_context - 64)
        for key in ("disk_s", "scratch_s"):
            values = [r[key] for r in runs]
            row[key] = statistics.median(values)
            row[key + "_min"], row[key + "_max"] = min(values), max(values)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("history  cached  TTFT from disk (min-max)     TTFT from scratch (min-max)  speedup")
    for r in rows:
        ms = {k: v * 1000 for k, v in r.items() if k.endswith(("_s", "_min", "_max"))}
        print(
            f"{r['history_tokens']:7d} {r['cached_tokens']:7d}  "
            f"{ms['disk_s']:8.0f} ms ({ms['disk_s_min']:.0f}-{ms['disk_s_max']:.0f})"
            f"   {ms['scratch_s']:8.0f} ms ({ms['scratch_s_min']:.0f}-{ms['scratch_s_max']:.0f})"
            f"   {r['scratch_s'] / r['disk_s']:.1f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
