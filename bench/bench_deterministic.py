"""Does a stateful server give the replies of a stateless one? A ShareGPT replay, turn by turn.

The same conversations are served by a stateful engine under heavy cache pressure (small device
and host tiers: swaps, drops and recomputation on most returning turns) and by a stateless one,
both with or without `--deterministic`, in the dtype `--dtype auto` picks. Each turn's history
is the conversation's recorded user messages plus the replies that engine gave, so the first
differing reply makes the rest of that conversation differ too; both counts are reported.
Throughput per engine shows the cost of the batch-invariant forward.

    python -m pensieve.bench.bench_deterministic [--conversations 8] [--turns 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from pensieve.config import EngineConfig
from pensieve.engine import Engine
from pensieve.model import cpu_has_native_bf16
from pensieve.runtime import LoadedModel, load_pretrained
from pensieve.sampling import SamplingParams

from .traces import Conversation, TraceOptions, load_trace

Replies = dict[tuple[int, int], list[int]]


async def serve(engine: Engine, convs: list[Conversation], reply_tokens: int) -> Replies:
    """Every conversation at once, turn after turn; the token ids of every reply."""
    replies: Replies = {}

    async def conversation(i: int, conv: Conversation) -> None:
        history: list[dict] = []
        for t, turn in enumerate(conv.turns):
            history.append({"role": "user", "content": turn.user})
            sampling = SamplingParams(temperature=0, max_tokens=reply_tokens)
            stream = engine.chat(history, f"conv-{i}", sampling)
            text = await stream.text()
            replies[(i, t)] = stream.token_ids
            history.append({"role": "assistant", "content": text})

    await asyncio.gather(*(conversation(i, c) for i, c in enumerate(convs)))
    return replies


async def run(loaded: LoadedModel, convs: list[Conversation], args: argparse.Namespace) -> dict:
    pressure = dict(device_cache_tokens=args.device_tokens, host_cache_tokens=args.host_tokens)
    systems = {
        "stateful": EngineConfig(block_size=32, max_batch_tokens=256, **pressure),
        "stateless": EngineConfig(block_size=32, max_batch_tokens=256, mode="stateless"),
    }
    results: dict = {"runs": []}
    for deterministic in (False, True):
        served: dict[str, Replies] = {}
        for name, base in systems.items():
            config = EngineConfig(**{**base.__dict__, "deterministic": deterministic})
            async with Engine(config, loaded=loaded) as engine:
                started = time.perf_counter()
                served[name] = await serve(engine, convs, args.reply_tokens)
                seconds = time.perf_counter() - started
                stats = await engine.stats()
            tokens = sum(len(r) for r in served[name].values())
            results["runs"].append({
                "system": name, "deterministic": deterministic, "seconds": round(seconds, 2),
                "reply_tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
                "swapped_out_blocks": stats.swap_out_blocks_total,
                "dropped_tokens": stats.dropped_tokens_total,
            })  # fmt: skip
        a, b = served["stateful"], served["stateless"]
        first = {}
        for i, t in sorted(a):
            if a[(i, t)] != b[(i, t)] and i not in first:
                first[i] = t
        results["deterministic" if deterministic else "default"] = {
            "turns": len(a),
            "turns_equal": sum(a[k] == b[k] for k in a),
            "conversations_diverging": len(first),
            "first_divergence": {str(i): t for i, t in first.items()},
        }
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--reply-tokens", type=int, default=48)
    p.add_argument("--context-cap", type=int, default=1500)
    p.add_argument("--device-tokens", type=int, default=2048, help="stateful device tier")
    p.add_argument("--host-tokens", type=int, default=1024, help="stateful host tier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    loaded = load_pretrained(EngineConfig(model=args.model, dtype=args.dtype))
    options = TraceOptions(
        conversations=args.conversations, seed=args.seed, max_turns=args.turns,
        min_turns=min(2, args.turns), context_cap=args.context_cap,
    )  # fmt: skip
    convs = load_trace("sharegpt", options, lambda text: len(loaded.tokenizer.encode(text)))
    results = asyncio.run(run(loaded, convs, args))
    results["dtype"] = str(loaded.model.dtype).removeprefix("torch.")
    results["cpu_native_bf16"] = cpu_has_native_bf16()
    for mode in ("default", "deterministic"):
        r = results[mode]
        print(
            f"{mode:>13}: {r['turns_equal']}/{r['turns']} turns equal to stateless, "
            f"{r['conversations_diverging']} conversations diverge"
        )
    for r in results["runs"]:
        print(
            f"  {r['system']:>9} det={r['deterministic']!s:5} {r['tokens_per_s']:7.1f} tok/s "
            f"({r['seconds']} s, swapped {r['swapped_out_blocks']} blocks, "
            f"dropped {r['dropped_tokens']} tokens)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
