"""`pensieve bench`: sweep arrival rates for stateful, stateless and device-only engines (and a
peer server) on one trace, and write records, summaries, a markdown table and a figure.

Each (system, rate) point gets a fresh Engine (the loaded model and its cost profile are shared),
so no point inherits another's cache or queue; `--reuse-engine` keeps one engine per system
across its rates instead. Runs use distinct conversation ids either way. A short warm-up turn,
not recorded, precedes every run so one-time compilation does not land in the first TTFT.

Default size: 16 ShareGPT conversations of 2-5 turns, replies up to 64 tokens, 2 s think time,
rates 0.2/0.5/1.0 conv/s, three systems. `--budget` (25 min) bounds the whole sweep: each run
stops sending turns at its share of what is left, so a slow engine gives shorter runs, not a
longer sweep.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec

from pensieve.bench.plots import plot_sweep
from pensieve.bench.replay import ReplayConfig, TurnRecord, replay, reply_budget
from pensieve.bench.report import RunSummary, counter_deltas, markdown_table, summarize
from pensieve.bench.targets import (
    EngineTarget,
    MetricsSource,
    OpenAITarget,
    Target,
    describe,
)
from pensieve.bench.traces import Conversation, TraceOptions, load_trace
from pensieve.cli_args import add_engine_arguments, engine_config_from_args

ENGINE_SYSTEMS = ("stateful", "stateless", "device-only")
TargetFactory = Callable[[str], AbstractAsyncContextManager[Target]]
# Smaller than the engine's defaults so that 16 conversations overflow the device tier: that
# pressure is what separates stateful (swap to host) from device-only (drop) and stateless.
BENCH_ENGINE_DEFAULTS = {"device_cache_tokens": 8192, "host_cache_tokens": 32768}


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas: {text}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("rates must be positive")
    return values


def _systems(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in ENGINE_SYSTEMS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown system {bad[0]!r}; choose from {ENGINE_SYSTEMS}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench flags plus the shared engine flags (the engine's --stateless/--device-only are
    ignored here: --systems says which modes run)."""
    g = parser.add_argument_group("sweep")
    g.add_argument("--rates", type=_floats, default=[0.2, 0.5, 1.0], help="conversations/s")
    g.add_argument(
        "--systems",
        type=_systems,
        default=list(ENGINE_SYSTEMS),
        help="engine modes to run, comma-separated ('' for the peer only)",
    )
    g.add_argument("--peer-url", default=None, help="OpenAI-compatible server to compare with")
    g.add_argument("--peer-name", default="peer")
    g.add_argument("--peer-model", default=None, help="model name to send (default: its first)")
    g.add_argument("--peer-api-key", default=None)
    g.add_argument(
        "--peer-session-header",
        action="append",
        default=None,
        metavar="NAME",
        help="header that names the conversation to the peer; repeatable (default: "
        "X-Session-ID; X-SMG-Routing-Key for sglang-router's manual policy)",
    )
    g.add_argument(
        "--no-session-header",
        action="store_true",
        help="name no conversation to the peer: it sees a client that only resends history",
    )
    g.add_argument(
        "--reuse-engine",
        action="store_true",
        help="one engine per system across its rates instead of one per run",
    )
    g.add_argument("--no-warmup", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--out", default=None, help="output folder (default bench/results/<time>)")
    t = parser.add_argument_group("trace")
    t.add_argument(
        "--trace",
        default="sharegpt",
        help="sharegpt, synthetic, synthetic-ultrachat, or a ShareGPT/JSONL path",
    )
    t.add_argument("--conversations", type=int, default=16)
    t.add_argument("--seed", type=int, default=0, help="trace sample, arrivals, think times")
    t.add_argument("--max-turns", type=int, default=5)
    t.add_argument("--min-turns", type=int, default=2)
    t.add_argument(
        "--context-cap",
        type=int,
        default=1024,
        help="drop turns once the history would exceed this many tokens (chars/4)",
    )
    r = parser.add_argument_group("replay")
    r.add_argument("--reply-tokens", type=int, default=None, help="fixed reply length")
    r.add_argument(
        "--max-reply-tokens", type=int, default=64, help="cap on the recorded reply length"
    )
    r.add_argument("--think-time-mean", type=float, default=2.0, help="seconds (paper: 60)")
    r.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds after which no new conversation starts",
    )
    r.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds after which a run sends no new turn",
    )
    r.add_argument(
        "--budget",
        type=float,
        default=1500.0,
        help="wall-clock seconds for the whole sweep, split over the runs still to go: a run "
        "stops sending at its share (replies in flight still finish); 0 or less: no budget",
    )
    add_engine_arguments(parser)
    parser.set_defaults(**BENCH_ENGINE_DEFAULTS)


def replay_config(
    args: argparse.Namespace, rate: float, tag: str, time_limit: float | None
) -> ReplayConfig:
    return ReplayConfig(
        rate=rate,
        think_time_mean=args.think_time_mean,
        seed=args.seed,
        reply_tokens=args.reply_tokens,
        max_reply_tokens=args.max_reply_tokens,
        duration=args.duration,
        time_limit=time_limit,
        tag=tag,
    )


def load_conversations(args: argparse.Namespace) -> list[Conversation]:
    options = TraceOptions(
        conversations=args.conversations,
        seed=args.seed,
        max_turns=args.max_turns,
        min_turns=args.min_turns,
        context_cap=args.context_cap,
    )
    return load_trace(
        args.trace,
        options,
        reply_len=lambda t: reply_budget(t, args.reply_tokens, args.max_reply_tokens),
    )


def session_headers(args: argparse.Namespace) -> list[str]:
    if args.no_session_header:
        return []
    return args.peer_session_header or ["X-Session-ID"]


def target_factory(args: argparse.Namespace) -> TargetFactory:
    """Engines in each mode and the peer.

    The model is loaded, and its chunk cost profiled, once: every Engine after the first gets
    them through its `loaded=` / `cost_model=` arguments, so a fresh engine per run costs no
    start-up (profiling alone takes a minute on a 2-core CPU) yet starts with empty caches.
    """
    base = engine_config_from_args(args)
    shared: dict[str, Any] = {}

    @asynccontextmanager
    async def open_target(system: str) -> AsyncIterator[Target]:
        if system == args.peer_name and args.peer_url:
            peer = OpenAITarget(
                args.peer_url,
                args.peer_model,
                args.peer_api_key,
                session_headers=session_headers(args),
            )
            async with peer:
                yield peer
            return
        from pensieve.engine import Engine  # imported late: tests run the sweep without it

        config = dataclasses.replace(base, mode=system)
        engine = Engine(config, loaded=shared.get("loaded"), cost_model=shared.get("cost"))
        async with engine:
            shared.setdefault("loaded", engine.loaded)
            shared.setdefault("cost", engine.cost_model)
            yield EngineTarget(engine)

    return open_target


async def _metrics(target: Target) -> dict[str, float]:
    if isinstance(target, MetricsSource):
        try:
            return await target.metrics()
        except Exception:
            return {}
    return {}


class SweepOutput:
    """The output folder: data rewritten after every run so an interrupted sweep keeps it."""

    def __init__(self, folder: Path, config: dict[str, Any]):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
        self.records: list[TurnRecord] = []
        self.summaries: list[RunSummary] = []

    def add(self, records: Sequence[TurnRecord], summary: RunSummary) -> None:
        self.records.extend(records)
        self.summaries.append(summary)
        self.write()

    def write(self) -> None:
        f = self.folder
        (f / "turns.json").write_bytes(msgspec.json.format(msgspec.json.encode(self.records)))
        (f / "summary.json").write_bytes(msgspec.json.format(msgspec.json.encode(self.summaries)))
        _write_csv(f / "turns.csv", [msgspec.structs.asdict(r) for r in self.records])
        scalar = [
            {k: v for k, v in msgspec.structs.asdict(s).items() if not isinstance(v, dict)}
            for s in self.summaries
        ]
        _write_csv(f / "summary.csv", scalar)
        (f / "summary.md").write_text(markdown_table(self.summaries))

    def plot(self) -> None:
        if self.summaries:
            plot_sweep(self.summaries, self.folder / "sweep.png")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


class Budget:
    """Splits the sweep's wall-clock budget over the runs still to go, so that a sweep ends in
    time however slow a system is; a run that ends early leaves its share to later ones."""

    def __init__(self, total_s: float | None, runs: int):
        self.deadline = None if total_s is None else time.monotonic() + total_s
        self.runs_left = runs

    def next_limit(self, cap: float | None) -> float | None:
        """Seconds the next run may keep sending turns (None: unbounded)."""
        limits = [] if cap is None else [cap]
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            limits.append(max(0.0, remaining / max(1, self.runs_left)))
        self.runs_left -= 1
        return min(limits) if limits else None

    def skip(self, runs: int) -> None:
        self.runs_left -= runs


async def run_sweep(
    args: argparse.Namespace,
    conversations: Sequence[Conversation],
    factory: TargetFactory,
    output: SweepOutput,
) -> list[RunSummary]:
    """Every (system, rate) run, in order; the model-free core that tests drive with fakes."""
    systems = list(args.systems) + ([args.peer_name] if args.peer_url else [])
    groups = [list(args.rates)] if args.reuse_engine else [[rate] for rate in args.rates]
    total = args.budget if args.budget and args.budget > 0 else None
    budget = Budget(total, len(systems) * len(args.rates))
    try:
        for system in systems:
            for rates in groups:
                done = 0
                try:
                    async with factory(system) as target:
                        for rate in rates:
                            limit = budget.next_limit(args.time_limit)
                            done += 1
                            await _one_run(args, conversations, target, system, rate, limit, output)
                except Exception as exc:  # a system that cannot start must not cost the others
                    budget.skip(len(rates) - done)
                    print(f"{system}: {describe(exc)}", file=sys.stderr)
    finally:
        output.plot()  # also after Ctrl-C, from the runs that finished
    return output.summaries


async def _one_run(
    args: argparse.Namespace,
    conversations: Sequence[Conversation],
    target: Target,
    system: str,
    rate: float,
    time_limit: float | None,
    output: SweepOutput,
) -> None:
    tag = f"{system}-r{rate:g}-s{args.seed}"
    if not args.no_warmup:
        await target.chat([{"role": "user", "content": "Say hello."}], 4, f"{tag}-warmup")
    before = await _metrics(target)
    config = replay_config(args, rate, tag, time_limit)
    records = await replay(
        target, conversations, config, system=system, progress=not args.no_progress
    )
    summary = summarize(records, system, rate, counter_deltas(before, await _metrics(target)))
    output.add(records, summary)
    planned = sum(len(c.turns) for c in conversations)
    limit = "" if time_limit is None else f" (send limit {time_limit:.0f} s)"
    print(
        f"{system} @ {rate:g} conv/s: {summary.turns} of {planned} turns sent{limit}, "
        f"{summary.failures} failed, {summary.requests_per_s:.3g} req/s",
        file=sys.stderr,
    )


def _json_safe(args: argparse.Namespace) -> dict[str, Any]:
    return {
        k: v
        for k, v in vars(args).items()
        if isinstance(v, (str, int, float, bool, list)) or v is None
    }


def run(args: argparse.Namespace, factory: TargetFactory | None = None) -> int:
    """Run the sweep; 0 when some turn succeeded, 1 when every turn failed."""
    if not args.systems and not args.peer_url:
        print("nothing to run: give --systems or --peer-url", file=sys.stderr)
        return 2
    try:
        conversations = load_conversations(args)
    except (OSError, ValueError) as exc:
        print(f"cannot load trace {args.trace!r}: {exc}", file=sys.stderr)
        return 2
    if not conversations:
        print("the trace has no conversation within the limits", file=sys.stderr)
        return 2
    turns = sum(len(c.turns) for c in conversations)
    print(f"trace {args.trace}: {len(conversations)} conversations, {turns} turns", file=sys.stderr)
    folder = Path(args.out or Path("bench") / "results" / time.strftime("%Y%m%d-%H%M%S"))
    output = SweepOutput(folder, _json_safe(args))
    try:
        summaries = asyncio.run(
            run_sweep(args, conversations, factory or target_factory(args), output)
        )
    except KeyboardInterrupt:
        print(f"interrupted; the finished runs are in {folder}/", file=sys.stderr)
        return 130
    print(markdown_table(summaries))
    print(f"results in {folder}/ (turns.json/csv, summary.json/csv/md, sweep.png)", file=sys.stderr)
    return 0 if any(s.turns > s.failures for s in summaries) else 1
