"""The Pensieve retention policy: which cached chunk to swap out or drop first.

A chunk's retention value is V = Cost(l) / T: the time to recompute the chunk given the l
tokens before it, over the time T since its conversation was last active. The lowest value
goes first. Cost grows with l, so a conversation's leading chunk is always its cheapest, and
eviction always takes tokens from the leading end.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class CostModel:
    """Recompute cost (seconds) of one chunk at context l, interpolated between profiled points."""

    context_lengths: list[int]
    seconds: list[float]

    def __post_init__(self) -> None:
        if not self.context_lengths or len(self.context_lengths) != len(self.seconds):
            raise ValueError("CostModel needs matching, non-empty profile points")

    def __call__(self, context: int) -> float:
        xs, ys = self.context_lengths, self.seconds
        if context <= xs[0] or len(xs) == 1:
            return ys[0]
        i = bisect.bisect_left(xs, context)
        if i >= len(xs):  # extrapolate linearly past the last point
            i = len(xs) - 1
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (context - x0) / (x1 - x0)

    @classmethod
    def linear(cls, base: float = 1.0, per_token: float = 0.001) -> CostModel:
        """A stand-in with the right shape (constant part + attention growing with l)."""
        xs = [0, 1024, 4096]
        return cls(xs, [base + per_token * x for x in xs])

    @classmethod
    def profile(
        cls,
        time_chunk_at: Callable[[int], float],
        max_context: int,
        points: tuple[int, ...] = (512, 2048, 8192),
    ) -> CostModel:
        """Time a chunk at context 0 and at each of `points` up to max_context."""
        xs = [0] + [n for n in points if n <= max_context]
        seconds = [time_chunk_at(x) for x in xs]
        for i in range(1, len(seconds)):  # noise must not make a longer context look cheaper
            seconds[i] = max(seconds[i], seconds[i - 1])
        return cls(xs, seconds)


def retention_value(cost: float, idle_seconds: float) -> float:
    """V = Cost / T; a conversation active right now is worth keeping at any cost."""
    return cost / max(idle_seconds, 1e-6)


@dataclass(frozen=True)
class Candidate:
    """One evictable chunk: conversation id, chunk index, and its retention value."""

    conversation_id: str
    chunk: int
    value: float


def rank_candidates(
    leading: Sequence[tuple[str, int, int, float]],
    cost: CostModel,
    block_size: int,
    now: float | None = None,
) -> list[Candidate]:
    """Order candidate chunks by value, lowest first.

    `leading` holds (conversation id, first eligible chunk, number of eligible chunks in a row,
    last active time). Within a conversation the chunks are taken
    from the leading end, each one costlier than the one before.
    """
    now = time.monotonic() if now is None else now
    out: list[Candidate] = []
    for cid, first, count, last_active in leading:
        idle = now - last_active
        for c in range(first, first + count):
            out.append(Candidate(cid, c, retention_value(cost(c * block_size), idle)))
    out.sort(key=lambda c: (c.value, c.conversation_id, c.chunk))
    return out
