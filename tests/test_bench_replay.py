"""The replay and the sweep, driven by fake targets (no model is loaded)."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import time
from contextlib import asynccontextmanager
from itertools import islice

import pytest

from pensieve.bench import sweep
from pensieve.bench.arrivals import think_times
from pensieve.bench.replay import ReplayConfig, replay, reply_budget
from pensieve.bench.targets import EngineTarget, TurnResult
from pensieve.bench.traces import Conversation, Turn

TOL = 0.005  # asyncio timers may fire a little early


class FakeTarget:
    """Replies "<conversation:turn>" after `delay` seconds; can fail chosen turns."""

    def __init__(self, delay: float = 0.01, empty=(), raises=()):
        self.delay, self.empty, self.raises = delay, set(empty), set(raises)
        self.calls: list[tuple[str, list[dict[str, str]], int]] = []
        self.active = self.max_active = 0
        self.tokens = 0

    async def chat(self, messages, max_tokens, conversation_id):
        self.calls.append((conversation_id, messages, max_tokens))
        key = (conversation_id.split("-")[-1], len(messages) // 2)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay / 2)
            if key in self.raises:
                raise ConnectionResetError("peer went away")
            first = time.perf_counter()
            await asyncio.sleep(self.delay / 2)
        finally:
            self.active -= 1
        self.tokens += max_tokens
        text = "" if key in self.empty else reply_text(conversation_id, len(messages) // 2)
        prompt = sum(len(m["content"]) for m in messages)
        return TurnResult(
            text=text,
            first_token_time=first,
            end_time=time.perf_counter(),
            prompt_tokens=prompt,
            cached_tokens=prompt // 2,
            completion_tokens=max_tokens if text else 0,
        )

    async def metrics(self):
        return {"fake_generated_tokens_total": float(self.tokens)}


def reply_text(cid: str, turn: int) -> str:
    return f"<{cid}:{turn}>"


def convs(n: int, turns: int) -> list[Conversation]:
    return [
        Conversation(f"c{i}", tuple(Turn(f"q{i}.{t}", "r" * 40, 7 + t) for t in range(turns)))
        for i in range(n)
    ]


# ---------------------------------------------------------------- replay


async def test_replay_sequential_turns_own_history_and_think_times():
    target = FakeTarget(delay=0.02)
    cfg = ReplayConfig(rate=200.0, think_time_mean=0.03, seed=3, max_reply_tokens=8)
    records = await replay(target, convs(4, 3), cfg, system="fake", progress=False)
    assert len(records) == 12 and all(r.ok for r in records)
    assert target.max_active > 1  # conversations overlap
    by_conv: dict[str, list] = {}
    for r in records:
        by_conv.setdefault(r.conversation_id, []).append(r)
    for index, cid in enumerate(sorted(by_conv)):
        turns = sorted(by_conv[cid], key=lambda r: r.turn_index)
        assert [r.turn_index for r in turns] == [0, 1, 2]
        expected = [0.0, *islice(think_times(0.03, 3, index), 2)]
        assert [r.think_s for r in turns] == pytest.approx(expected)
        for prev, nxt in zip(turns, turns[1:], strict=False):
            assert nxt.send_time >= prev.end_time + nxt.think_s - TOL
        for r in turns:
            assert r.send_time <= r.first_token_time <= r.end_time
            assert r.requested_tokens == min(7 + r.turn_index, 8)
    for cid, messages, _ in target.calls:
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) + [
            "user"
        ]
        for j in range(len(messages) // 2):  # the history holds the target's own replies
            assert messages[2 * j + 1]["content"] == reply_text(cid, j)
        i = cid.split("-")[-1][1:]
        assert messages[-1]["content"] == f"q{i}.{len(messages) // 2}"


async def test_replay_failures_are_recorded_and_stop_the_conversation():
    target = FakeTarget(empty={("c0", 1)}, raises={("c1", 0)})
    cfg = ReplayConfig(rate=1000.0, think_time_mean=0.0, reply_tokens=5)
    records = await replay(target, convs(3, 3), cfg, progress=False)
    errors = {(r.conversation_id.split("-")[-1], r.turn_index): r.error for r in records}
    assert errors[("c0", 1)] == "empty reply"
    assert errors[("c1", 0)] == "ConnectionResetError: peer went away"
    assert ("c0", 2) not in errors and ("c1", 1) not in errors
    assert sum(e is None for e in errors.values()) == 1 + 3
    assert all(r.requested_tokens == 5 for r in records)


async def test_replay_bounds_in_time_and_count():
    slow = ReplayConfig(rate=20.0, think_time_mean=0.0, seed=1, duration=0.0)
    records = await replay(FakeTarget(), convs(5, 2), slow, progress=False)
    assert {r.conversation_id.split("-")[-1] for r in records} == {"c0"}  # only the one at t=0

    capped = ReplayConfig(rate=1000.0, think_time_mean=0.0, max_requests=4)
    assert len(await replay(FakeTarget(), convs(3, 3), capped, progress=False)) == 4

    limited = ReplayConfig(rate=1000.0, think_time_mean=0.0, time_limit=0.05)
    records = await replay(FakeTarget(delay=0.02), convs(2, 50), limited, progress=False)
    assert 2 <= len(records) < 20
    assert max(r.send_time for r in records) < 0.05 + TOL


def test_reply_budget():
    assert reply_budget(Turn("q", "r", 500), None, 64) == 64
    assert reply_budget(Turn("q", "r", 12), None, 64) == 12
    assert reply_budget(Turn("q", "abcdefgh", None), None, 64) == 2
    assert reply_budget(Turn("q", "r", 12), 30, 64) == 30


# ---------------------------------------------------------------- sweep


def sweep_args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    return parser.parse_args(
        [
            "--trace",
            "synthetic",
            "--conversations",
            "3",
            "--max-turns",
            "3",
            "--rates",
            "200,400",
            "--think-time-mean",
            "0.01",
            "--max-reply-tokens",
            "8",
            "--no-progress",
            "--out",
            str(tmp_path / "out"),
            *extra,
        ]
    )


def fake_factory(opened: list[str], broken: str | None = None):
    @asynccontextmanager
    async def open_target(system):
        if system == broken:
            raise RuntimeError("no engine today")
        opened.append(system)
        yield FakeTarget(delay=0.005)

    return open_target


def test_sweep_writes_records_summaries_and_figure(tmp_path, capsys):
    args = sweep_args(tmp_path, "--systems", "stateful,stateless", "--peer-url", "http://x")
    opened: list[str] = []
    assert sweep.run(args, fake_factory(opened)) == 0
    assert opened == ["stateful"] * 2 + ["stateless"] * 2 + ["peer"] * 2  # fresh per rate
    out = tmp_path / "out"
    for name in (
        "turns.json",
        "turns.csv",
        "summary.json",
        "summary.csv",
        "summary.md",
        "sweep.png",
        "config.json",
    ):
        assert (out / name).stat().st_size > 0, name
    summaries = json.loads((out / "summary.json").read_text())
    assert [(s["system"], s["rate"]) for s in summaries] == [
        (system, rate) for system in ("stateful", "stateless", "peer") for rate in (200, 400)
    ]
    assert all(s["failures"] == 0 and s["turns"] > 0 for s in summaries)
    assert all(s["counters"]["fake_generated_tokens_total"] > 0 for s in summaries)
    turns = json.loads((out / "turns.json").read_text())
    with open(out / "turns.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(turns) == sum(s["turns"] for s in summaries)
    assert len({t["conversation_id"] for t in turns}) == 3 * 6  # distinct per run
    assert "| peer | 400 |" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["device_cache_tokens"] == 8192


def test_sweep_survives_a_system_that_cannot_start(tmp_path, capsys):
    args = sweep_args(
        tmp_path, "--systems", "stateful,device-only", "--reuse-engine", "--no-warmup"
    )
    opened: list[str] = []
    assert sweep.run(args, fake_factory(opened, broken="stateful")) == 0
    assert opened == ["device-only"]  # one engine for both rates
    assert "stateful: RuntimeError: no engine today" in capsys.readouterr().err
    summaries = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["system"] for s in summaries] == ["device-only", "device-only"]


def test_sweep_rejects_bad_arguments(tmp_path):
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    for bad in (["--rates", "0"], ["--rates", "x"], ["--systems", "vllm"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    args = sweep_args(tmp_path, "--systems", "")
    assert sweep.run(args, fake_factory([])) == 2


def test_engine_factory_loads_the_model_once(tmp_path, monkeypatch):
    made = []

    class Engine:
        def __init__(self, config, *, loaded=None, cost_model=None):
            made.append((config.mode, loaded, cost_model))
            self.loaded, self.cost_model = loaded or "model", cost_model or "cost"

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return None

    monkeypatch.setattr("pensieve.engine.Engine", Engine)
    args = sweep_args(tmp_path, "--device-cache-tokens", "4096")
    factory = sweep.target_factory(args)

    async def open_all():
        for system in ("stateful", "stateless", "device-only"):
            async with factory(system) as target:
                assert isinstance(target, EngineTarget)

    asyncio.run(open_all())
    assert made == [
        ("stateful", None, None),
        ("stateless", "model", "cost"),
        ("device-only", "model", "cost"),
    ]


def test_budget_splits_the_time_left_over_the_runs_to_go():
    budget = sweep.Budget(10.0, 3)
    assert budget.next_limit(None) == pytest.approx(10 / 3, abs=0.01)
    assert budget.next_limit(1.0) == 1.0  # the per-run cap wins when smaller
    budget.skip(1)
    assert budget.runs_left == 0
    assert budget.next_limit(None) == pytest.approx(10.0, abs=0.01)  # the rest, to the last run
    assert sweep.Budget(None, 2).next_limit(None) is None
    assert sweep.Budget(-1.0, 1).next_limit(None) == 0.0
