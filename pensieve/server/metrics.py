"""Prometheus metrics for one server app.

Each app owns a CollectorRegistry (never the global one) so that tests can run several apps in
one process. The server records what only it sees (HTTP status, time to first token, time per
output token); engine counters are asked of the engine at scrape time and exported by a custom
collector, so they are never double-counted and cost nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

PREFIX = "pensieve_"

# (metric name, EngineStats field, help): monotonically increasing engine counters.
ENGINE_COUNTERS = [
    ("engine_requests", "requests_total", "Requests admitted by the engine."),
    ("prompt_tokens", "prompt_tokens_total", "Prompt tokens of all requests."),
    ("cached_prompt_tokens", "cached_tokens_total", "Prompt tokens whose KV cache was reused."),
    ("computed_prompt_tokens", "computed_prompt_tokens_total", "Prompt tokens prefilled."),
    ("recomputed_tokens", "recomputed_tokens_total", "Dropped history tokens recomputed."),
    ("generation_tokens", "generated_tokens_total", "Tokens generated."),
    ("dropped_tokens", "dropped_tokens_total", "History tokens whose KV was dropped."),
    ("preemptions", "preemptions_total", "Running requests suspended to free device memory."),
    ("engine_steps", "steps_total", "Forward steps run."),
    ("disk_writes", "disk_writes_total", "KV chunk files written to the disk tier."),
    ("disk_reads", "disk_reads_total", "KV chunk files read back from the disk tier."),
    ("disk_checksum_failures", "disk_checksum_failures_total", "Chunk files found corrupt."),
]

# (metric name, EngineStats field, help): point-in-time engine gauges.
ENGINE_GAUGES = [
    ("requests_running", "requests_running", "Requests in the running batch."),
    ("requests_waiting", "requests_waiting", "Requests queued for admission."),
    ("conversations", "conversations", "Conversations whose history is kept."),
    ("block_size_tokens", "block_size", "Tokens per KV block."),
    ("commit_lag_seconds", "commit_lag_seconds", "The last commit: turn end to record on disk."),
]

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class EngineCollector(Collector):
    """Exports the engine's stats taken for this scrape; nothing while no engine is loaded."""

    def __init__(self) -> None:
        self.stats: Any = None

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        if stats is None:
            return
        for name, field, doc in ENGINE_COUNTERS:
            yield CounterMetricFamily(PREFIX + name, doc, value=getattr(stats, field))
        for name, field, doc in ENGINE_GAUGES:
            yield GaugeMetricFamily(PREFIX + name, doc, value=getattr(stats, field))
        swaps = CounterMetricFamily(
            PREFIX + "swapped_blocks", "KV blocks copied between tiers.", labels=["direction"]
        )
        swaps.add_metric(["out"], stats.swap_out_blocks_total)
        swaps.add_metric(["in"], stats.swap_in_blocks_total)
        yield swaps
        used = GaugeMetricFamily(
            PREFIX + "cache_blocks_used", "KV blocks in use per tier.", labels=["tier"]
        )
        capacity = GaugeMetricFamily(
            PREFIX + "cache_blocks_capacity", "KV blocks available per tier.", labels=["tier"]
        )
        for tier in ("device", "host", "disk"):
            used.add_metric([tier], getattr(stats, f"{tier}_blocks_used"))
            capacity.add_metric([tier], getattr(stats, f"{tier}_blocks_total"))
        yield used
        yield capacity
        prompt = stats.prompt_tokens_total
        ratio = stats.cached_tokens_total / prompt if prompt else 0.0
        doc = "Share of all prompt tokens served from cache."
        yield GaugeMetricFamily(PREFIX + "cached_token_ratio", doc, value=ratio)


class ServerMetrics:
    """The metrics of one app: HTTP outcomes and latencies plus the engine collector."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            PREFIX + "http_requests",
            "HTTP requests by route and status (499: client disconnected).",
            ["route", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "From request arrival to the first generated text.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request.",
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.engine = EngineCollector()
        self.registry.register(self.engine)

    def observe_request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def observe_generation(self, ttft_s: float, decode_s: float, completion_tokens: int) -> None:
        self.ttft.observe(ttft_s)
        if completion_tokens > 1:
            self.tpot.observe(decode_s / (completion_tokens - 1))

    def render(self, engine_stats: Any = None) -> bytes:
        """The exposition text, with `engine_stats` (an EngineStats, or None) as engine metrics."""
        self.engine.stats = engine_stats
        return generate_latest(self.registry)
