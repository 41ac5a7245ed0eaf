"""The sweep's figure: throughput against normalized latency, and TTFT by turn index."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pensieve.bench.report import RunSummary  # noqa: E402


def plot_sweep(summaries: Sequence[RunSummary], path: str | Path) -> Path:
    """Left: the paper's curve, one line per system over arrival rates. Right: TTFT p50 by turn
    index at the highest rate all systems ran (where re-prefilling the history hurts most)."""
    systems = list(dict.fromkeys(s.system for s in summaries))
    common = set.intersection(*({s.rate for s in summaries if s.system == n} for n in systems))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in systems:
        points = sorted((s for s in summaries if s.system == system), key=lambda s: s.rate)
        xs = [s.requests_per_s for s in points if s.norm_latency_mean is not None]
        ys = [s.norm_latency_mean * 1000 for s in points if s.norm_latency_mean is not None]
        left.plot(xs, ys, marker="o", label=system)
        top = [s for s in points if not common or s.rate == max(common)][-1]
        turns = sorted(top.ttft_by_turn)
        p50 = [top.ttft_by_turn[t].p50 for t in turns]
        right.plot(turns, p50, marker="o", label=f"{system} @ {top.rate:g} conv/s")
    left.set(
        xlabel="throughput (requests/s)",
        ylabel="normalized latency (ms / output token)",
        title="throughput vs normalized latency",
    )
    right.set(xlabel="turn index", ylabel="TTFT p50 (s)", title="time to first token by turn")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
