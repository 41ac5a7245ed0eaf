"""The Pensieve retention policy: which cached chunk to swap out or drop first.

A chunk's retention value is V = Cost(l) / T: the time to recompute the chunk given the l
tokens before it, over the time T since its conversation was last active. The lowest value
goes first. Cost grows with l, so a conversation's leading chunk is always its cheapest, and
eviction always takes tokens from the leading end.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


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

    def many(self, contexts: np.ndarray) -> np.ndarray:
        """`self(l)` for an array of contexts (the same interpolation and extrapolation)."""
        xs, ys = self.context_lengths, self.seconds
        out = np.interp(contexts, xs, ys)
        if len(xs) > 1:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            past = contexts > xs[-1]
            out[past] = ys[-1] + slope * (contexts[past] - xs[-1])
        return out

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


class EvictionIndex:
    """Idle conversations' evictable chunks of one kind, to pick the lowest-value ones fast.

    Each conversation contributes one run of chunks [first, first + count) that may leave its
    tier next, with its last-active time. Within a run each chunk costs more than the one before,
    so the n lowest-value chunks overall lie in the n conversations whose first chunk is lowest:
    `lowest` values every run's first chunk at once (numpy, O(conversations)), keeps those at or
    below the n-th, and merges their runs with a heap. Values are computed at the moment of the
    pick, so the order is exact whatever time has passed; nothing is rescanned per step.
    """

    def __init__(self, cost: CostModel, block_size: int, capacity: int = 64):
        self.cost = cost
        self.block_size = block_size
        self._slots: dict[str, int] = {}
        self._ids: list[str | None] = [None] * capacity
        self._first = np.zeros(capacity, dtype=np.int64)
        self._count = np.zeros(capacity, dtype=np.int64)
        self._last = np.zeros(capacity, dtype=np.float64)
        self._free = list(range(capacity - 1, -1, -1))
        self.total = 0  # chunks in all runs

    def __len__(self) -> int:
        return len(self._slots)

    def set(self, cid: str, first: int, count: int, last_active: float) -> None:
        """Record a conversation's run (count 0 removes it)."""
        if count <= 0:
            self.remove(cid)
            return
        slot = self._slots.get(cid)
        if slot is None:
            if not self._free:
                self._grow()
            slot = self._slots[cid] = self._free.pop()
            self._ids[slot] = cid
        self.total += count - int(self._count[slot])
        self._first[slot], self._count[slot], self._last[slot] = first, count, last_active

    def remove(self, cid: str) -> None:
        slot = self._slots.pop(cid, None)
        if slot is not None:
            self.total -= int(self._count[slot])
            self._count[slot] = 0
            self._ids[slot] = None
            self._free.append(slot)

    def _grow(self) -> None:
        old = len(self._ids)
        self._ids += [None] * old
        self._first = np.concatenate([self._first, np.zeros(old, dtype=np.int64)])
        self._count = np.concatenate([self._count, np.zeros(old, dtype=np.int64)])
        self._last = np.concatenate([self._last, np.zeros(old, dtype=np.float64)])
        self._free += list(range(2 * old - 1, old - 1, -1))

    def lowest(self, n: int, now: float) -> list[tuple[str, int]]:
        """The n lowest-value (conversation id, chunk index) pairs, lowest first."""
        if n <= 0 or not self._slots:
            return []
        slots = np.flatnonzero(self._count > 0)
        idle = np.maximum(now - self._last[slots], 1e-6)
        values = self.cost.many(self._first[slots] * self.block_size) / idle
        if len(slots) > n:  # keep ties with the n-th so that the order stays deterministic
            kth = np.partition(values, n - 1)[n - 1]
            keep = values <= kth
            slots, values, idle = slots[keep], values[keep], idle[keep]
        heap = [
            (float(v), self._ids[s], int(self._first[s]), int(self._first[s] + self._count[s]), t)
            for s, v, t in zip(slots.tolist(), values.tolist(), idle.tolist(), strict=True)
        ]
        heapq.heapify(heap)
        out: list[tuple[str, int]] = []
        while heap and len(out) < n:
            _, cid, chunk, end, t = heapq.heappop(heap)
            out.append((cid, chunk))  # type: ignore[arg-type]
            if chunk + 1 < end:
                value = self.cost((chunk + 1) * self.block_size) / t
                heapq.heappush(heap, (value, cid, chunk + 1, end, t))
        return out
