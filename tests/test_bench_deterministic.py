"""bench_deterministic end to end on the tiny model: the replay compares every turn."""

from __future__ import annotations

import argparse

from pensieve.bench.bench_deterministic import run
from pensieve.bench.traces import Conversation, Turn
from pensieve.runtime import LoadedModel


async def test_deterministic_replay_equals_stateless_on_every_turn(tiny: LoadedModel) -> None:
    words = "the rivers of Europe and the cities along them, with dates and names "
    convs = [
        Conversation(id=str(i), turns=tuple(Turn(words * (i + t + 1), "") for t in range(3)))
        for i in range(3)
    ]
    args = argparse.Namespace(device_tokens=640, host_tokens=128, reply_tokens=6)
    results = await run(tiny, convs, args)
    det = results["deterministic"]
    assert det["turns"] == 9 and det["turns_equal"] == 9
    stateful = [r for r in results["runs"] if r["system"] == "stateful"]
    assert all(r["dropped_tokens"] > 0 or r["swapped_out_blocks"] > 0 for r in stateful)
