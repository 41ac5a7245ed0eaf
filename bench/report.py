"""The paper's figures from turn records: pure functions, so they are tested on hand-made data.

Throughput is measured over the busy period (first send to last reply), normalized latency is
end-to-end latency divided by output tokens (the paper's y axis), and time to first token is
split by turn index because that is where keeping state pays off: later turns skip re-prefill.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import msgspec
import numpy as np

from pensieve.bench.replay import TurnRecord

# Substrings of the engine counters (EngineStats fields, /metrics names) worth a delta per run.
COUNTER_WORDS = (
    "recomputed",
    "swap",
    "drop",
    "cached",
    "prompt",
    "generated",
    "request",
    "preempt",
)
_NOT_COUNTS = ("_bucket", "_sum", "_count", "_created")
_GAUGES = ("seconds", "ratio", "running", "waiting")


class Dist(msgspec.Struct):
    """Summary of a sample; None statistics when it is empty."""

    n: int
    mean: float | None
    p50: float | None
    p90: float | None


class RunSummary(msgspec.Struct, kw_only=True):
    """One (system, arrival rate) point of the sweep."""

    system: str
    rate: float
    turns: int
    failures: int
    busy_s: float
    requests_per_s: float
    output_tokens_per_s: float
    norm_latency_mean: float | None  # seconds per output token
    norm_latency_p90: float | None
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_later_p50: float | None  # turns with index >= 1
    cached_share: float | None  # cached / prompt tokens, over turns that report both
    prompt_tokens: int | None
    recomputed_tokens: float | None
    swapped_blocks: float | None
    dropped_tokens: float | None
    ttft_by_turn: dict[int, Dist] = msgspec.field(default_factory=dict)
    errors: dict[str, int] = msgspec.field(default_factory=dict)
    counters: dict[str, float] = msgspec.field(default_factory=dict)


def dist(values: Iterable[float]) -> Dist:
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return Dist(0, None, None, None)
    p50, p90 = np.percentile(arr, [50, 90])
    return Dist(int(arr.size), float(arr.mean()), float(p50), float(p90))


def busy_period(records: Sequence[TurnRecord]) -> float:
    """Seconds from the first send to the last reply end (0 without records)."""
    if not records:
        return 0.0
    return max(r.end_time for r in records) - min(r.send_time for r in records)


def ttft(record: TurnRecord) -> float | None:
    return None if record.first_token_time is None else record.first_token_time - record.send_time


def normalized_latencies(records: Iterable[TurnRecord]) -> list[float]:
    """End-to-end latency per output token of each successful turn."""
    return [
        (r.end_time - r.send_time) / r.completion_tokens
        for r in records
        if r.ok and r.completion_tokens > 0
    ]


def ttft_by_turn(records: Iterable[TurnRecord]) -> dict[int, Dist]:
    by_turn: dict[int, list[float]] = {}
    for r in records:
        t = ttft(r)
        if r.ok and t is not None:
            by_turn.setdefault(r.turn_index, []).append(t)
    return {i: dist(v) for i, v in sorted(by_turn.items())}


def cached_share(records: Iterable[TurnRecord]) -> float | None:
    """Share of prompt tokens served from cache; None when no turn reports both counts."""
    known = [r for r in records if r.ok and r.prompt_tokens and r.cached_tokens is not None]
    prompt = sum(r.prompt_tokens or 0 for r in known)
    return sum(r.cached_tokens or 0 for r in known) / prompt if prompt else None


def counter_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """How much each cache/traffic counter grew during a run (gauges and histograms left out)."""
    return {
        name: value - before.get(name, 0.0)
        for name, value in sorted(after.items())
        if any(w in name for w in COUNTER_WORDS)
        and not name.endswith(_NOT_COUNTS)
        and not any(g in name for g in _GAUGES)
    }


def pick(counters: Mapping[str, float], word: str, *, unit: str | None = None) -> float | None:
    """Sum of the counters whose name contains `word` (and `unit`); None when there are none."""
    names = [n for n in counters if word in n and (unit is None or unit in n)]
    return float(sum(counters[n] for n in names)) if names else None


def summarize(
    records: Sequence[TurnRecord],
    system: str,
    rate: float,
    counters: Mapping[str, float] | None = None,
) -> RunSummary:
    """Every figure of one run; `counters` are the engine's counter deltas, when known."""
    counters = dict(counters or {})
    ok = [r for r in records if r.ok]
    busy = busy_period(records)
    norm = dist(normalized_latencies(ok))
    first = dist(t for r in ok if (t := ttft(r)) is not None)
    later = dist(t for r in ok if r.turn_index >= 1 and (t := ttft(r)) is not None)
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    per_turn_recomputed = [r.recomputed_tokens for r in ok if r.recomputed_tokens is not None]
    recomputed = pick(counters, "recomputed")
    if recomputed is None and per_turn_recomputed:
        recomputed = float(sum(per_turn_recomputed))
    return RunSummary(
        system=system,
        rate=rate,
        turns=len(records),
        failures=len(records) - len(ok),
        busy_s=busy,
        requests_per_s=len(ok) / busy if busy > 0 else 0.0,
        output_tokens_per_s=sum(r.completion_tokens for r in ok) / busy if busy > 0 else 0.0,
        norm_latency_mean=norm.mean,
        norm_latency_p90=norm.p90,
        ttft_p50=first.p50,
        ttft_p90=first.p90,
        ttft_later_p50=later.p50,
        cached_share=cached_share(ok),
        prompt_tokens=sum(prompts) if prompts else None,
        recomputed_tokens=recomputed,
        swapped_blocks=pick(counters, "swap", unit="block"),
        dropped_tokens=pick(counters, "drop", unit="token"),
        ttft_by_turn=ttft_by_turn(ok),
        errors=dict(Counter((r.error or "")[:120] for r in records if not r.ok).most_common(10)),
        counters=counters,
    )


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(summaries: Sequence[RunSummary]) -> str:
    """The sweep as a GitHub markdown table (one row per system and rate) for the README."""
    header = (
        "| system | rate (conv/s) | turns | failed | req/s | output tok/s | norm. latency "
        "mean / p90 (ms/tok) | TTFT p50 / p90 (s) | TTFT p50 turn>=1 (s) | cached share "
        "| recomputed tok | swapped blocks | dropped tok |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for s in summaries:
        ms = [None if v is None else v * 1000 for v in (s.norm_latency_mean, s.norm_latency_p90)]
        cached = None if s.cached_share is None else s.cached_share * 100
        cells = [
            s.system,
            _fmt(s.rate),
            str(s.turns),
            str(s.failures),
            _fmt(s.requests_per_s),
            _fmt(s.output_tokens_per_s, ".1f"),
            f"{_fmt(ms[0], '.1f')} / {_fmt(ms[1], '.1f')}",
            f"{_fmt(s.ttft_p50)} / {_fmt(s.ttft_p90)}",
            _fmt(s.ttft_later_p50),
            "-" if cached is None else f"{cached:.0f}%",
            _fmt(s.recomputed_tokens, ".0f"),
            _fmt(s.swapped_blocks, ".0f"),
            _fmt(s.dropped_tokens, ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
