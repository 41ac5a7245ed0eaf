"""Affinity through a router: `pensieve bench --peer-url ROUTER` against fresh local clusters.

    python -m pensieve.bench.bench_cluster --repeats 3 --out bench/results/cluster \\
        [--points NAME,...] [-- pensieve bench flags]

Every (point, repeat) starts its own `pensieve cluster` (so no run inherits another's cache),
replays the same ShareGPT sample through the router with `pensieve bench --systems ''
--peer-url`, and stops the cluster. Repeat r uses trace and arrival seed r for every point, so
the points are compared on the same workloads; the table gives the mean and the min-max over
the repeats. The figures that matter: affinity hits (the share of later turns that found at
least their previous prompt cached, i.e. reached the replica holding their conversation) and
the cached share (cached / prompt tokens over all turns); one replica is the ceiling, round
robin the contrast. kv_aware routes on the KV events the workers publish (`pensieve cluster`
wires them). Throughput is printed too, but
on a machine where the replicas share the same cores it is not a scaling figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from pensieve.cluster import Cluster, ClusterConfig


@dataclass(frozen=True)
class Point:
    """One cluster shape and how the client names its conversations."""

    name: str
    replicas: int
    router: str
    policy: str
    headers: tuple[str, ...]  # session headers the client sends; () = history only


POINTS = {
    p.name: p
    for p in [
        Point("1x sglang", 1, "sglang", "cache_aware", ()),
        Point("2x sglang cache_aware (history)", 2, "sglang", "cache_aware", ()),
        Point("2x sglang manual (routing key)", 2, "sglang", "manual", ("X-SMG-Routing-Key",)),
        Point("2x sglang round_robin", 2, "sglang", "round_robin", ()),
        Point("1x vllm", 1, "vllm", "cache_aware", ()),
        Point("2x vllm consistent_hash (session)", 2, "vllm", "consistent_hash", ("X-Session-ID",)),
        Point("2x vllm cache_aware (history)", 2, "vllm", "cache_aware", ()),
        Point("2x vllm kv_aware (history)", 2, "vllm", "kv_aware", ()),
        Point("2x vllm round_robin", 2, "vllm", "round_robin", ()),
    ]
}
# Workers: the bench's cache sizes (the sample fits in device + host, so misses are routing's)
# and no start-up profiling.
SERVE_ARGS = ["--device-cache-tokens", "8192", "--host-cache-tokens", "32768", "--no-profile-cost"]
# The replay: small enough for a 2-core CPU (about a minute a run), long enough for 3-4 turns.
BENCH_ARGS = [
    "--conversations", "8", "--min-turns", "3", "--max-turns", "4", "--rates", "0.25",
    "--max-reply-tokens", "32", "--think-time-mean", "1", "--context-cap", "768",
    "--budget", "0", "--no-progress",
]  # fmt: skip


def slug(name: str) -> str:
    """name as a folder name and a conversation id prefix (ids allow letters, digits, . _ : -)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def bench_command(url: str, point: Point, seed: int, out: Path, extra: list[str]) -> list[str]:
    headers = [a for h in point.headers for a in ("--peer-session-header", h)]
    return [
        sys.executable, "-m", "pensieve.cli", "bench", "--systems", "",
        "--peer-url", url, "--peer-name", slug(point.name), "--seed", str(seed),
        "--out", str(out),
        *(headers or ["--no-session-header"]), *BENCH_ARGS, *extra,
    ]  # fmt: skip


async def run_point(point: Point, seed: int, out: Path, extra: list[str]) -> dict:
    """One fresh cluster, one replay through its router; the replay's summary."""
    config = ClusterConfig(
        replicas=point.replicas,
        router=point.router,
        policy=point.policy,
        serve_args=SERVE_ARGS,
        log_dir=out / "logs",
    )
    async with Cluster(config) as cluster:
        command = bench_command(cluster.url, point, seed, out, extra)
        proc = await asyncio.create_subprocess_exec(*command)
        if await proc.wait() != 0:
            raise RuntimeError(f"pensieve bench failed for {point.name} seed {seed}")
    return read_run(out)


def read_run(out: Path) -> dict:
    """A finished replay's summary, with its affinity hit rate added."""
    (summary,) = json.loads((out / "summary.json").read_text())
    summary["affinity_hits"] = affinity_hits(json.loads((out / "turns.json").read_text()))
    return summary


def affinity_hits(turns: list[dict]) -> float | None:
    """Share of later turns that found at least their previous prompt cached: the turns the
    router sent to the replica holding their conversation."""
    by_conversation: dict[str, dict[int, dict]] = {}
    for turn in turns:
        by_conversation.setdefault(turn["conversation_id"], {})[turn["turn_index"]] = turn
    hits = later = 0
    for conversation in by_conversation.values():
        for index, turn in conversation.items():
            before = conversation.get(index - 1)
            if index == 0 or before is None or turn["error"] or before["error"]:
                continue
            later += 1
            hits += (turn["cached_tokens"] or 0) >= (before["prompt_tokens"] or 1)
    return hits / later if later else None


def spread(values: list[float]) -> str:
    """mean (min-max) of the repeats."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "| point | runs | failed turns | affinity hits | cached share | later-turn TTFT p50 s "
        "| output tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        hits = [r["affinity_hits"] for r in runs if r.get("affinity_hits") is not None]
        cached = [r["cached_share"] for r in runs if r["cached_share"] is not None]
        ttft = [r["ttft_later_p50"] for r in runs if r["ttft_later_p50"] is not None]
        rate = [r["output_tokens_per_s"] for r in runs]
        failed = sum(r["failures"] for r in runs)
        lines.append(
            f"| {name} | {len(runs)} | {failed} | {spread(hits)} | {spread(cached)} "
            f"| {spread(ttft)} | {spread(rate)} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace, extra: list[str]) -> int:
    names = [n.strip() for n in args.points.split(",")] if args.points else list(POINTS)
    unknown = [n for n in names if n not in POINTS]
    if unknown:
        print(f"unknown point {unknown[0]!r}; choose from: {', '.join(POINTS)}", file=sys.stderr)
        return 2
    results: dict[str, list[dict]] = {name: [] for name in names}
    for seed in range(args.repeats):  # repeat-major: a slow drift hits every point alike
        for name in names:
            out = args.out / f"seed{seed}" / slug(name)
            if (args.report_only or args.resume) and (out / "summary.json").exists():
                results[name].append(read_run(out))
                continue
            if args.report_only:
                continue
            try:
                results[name].append(await run_point(POINTS[name], seed, out, extra))
            except Exception as exc:  # one failed point must not cost the others
                print(f"{name}, seed {seed}: {exc}", file=sys.stderr)
                continue
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
            run = results[name][-1]
            print(
                f"{name}, seed {seed}: affinity hits {run['affinity_hits']}, "
                f"cached share {run['cached_share']}"
            )
    report = table(results)
    (args.out / "table.md").write_text(report + "\n")
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--points", default="", help="comma-separated names (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cluster"))
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the table from --out, run nothing"
    )
    parser.add_argument("--resume", action="store_true", help="keep the runs --out already has")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    return asyncio.run(main_async(args, extra))


if __name__ == "__main__":
    sys.exit(main())
