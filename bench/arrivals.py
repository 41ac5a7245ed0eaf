"""Seeded arrival and think-time processes, as in the paper's evaluation.

Conversations start as a Poisson process; between a reply and the next question a user "thinks"
for an exponential time. Each conversation draws its think times from its own seeded stream, so
the times do not depend on how the replay interleaves conversations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Start times (seconds from 0) of n conversations arriving at `rate` per second.

    The first conversation starts at 0 so a run does not open with idle time; the gaps after it
    are exponential with mean 1/rate. An infinite rate starts everything at once.
    """
    if n <= 0:
        return []
    if rate <= 0:
        raise ValueError("arrival rate must be > 0")
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def think_times(mean: float, seed: int = 0, stream: int = 0) -> Iterator[float]:
    """Endless exponential think times with the given mean (0: no thinking) for one conversation."""
    if mean < 0:
        raise ValueError("think time mean must be >= 0")
    rng = np.random.default_rng([seed, 1, stream])
    while True:
        yield float(rng.exponential(mean)) if mean > 0 else 0.0
