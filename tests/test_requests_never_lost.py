"""No request is ever lost: the same conversation twice at once, an exception while admitting,
and copies that fail, through the real engine (tiny model) and the real HTTP server."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from pensieve.actors.scheduler import scoped
from pensieve.actors.swapper import Swapper
from pensieve.config import EngineConfig
from pensieve.engine import Engine
from pensieve.errors import EngineError
from pensieve.messages import SwapOrder
from pensieve.policy import CostModel
from pensieve.reference import reference_generate
from pensieve.runtime import LoadedModel
from pensieve.sampling import SamplingParams
from pensieve.server.app import create_app, start_server

GREEDY = SamplingParams(temperature=0, max_tokens=6)


def engine_for(tiny: LoadedModel, **overrides: object) -> Engine:
    config = EngineConfig(block_size=16, profile_cost=False, **overrides)  # type: ignore[arg-type]
    return Engine(config, loaded=tiny, cost_model=CostModel.linear())


async def stream_chat(http: aiohttp.ClientSession, url: str, text: str, cid: str) -> str:
    """One streamed chat completion; returns its text (raises on a bad status or no [DONE])."""
    body = {"messages": [{"role": "user", "content": text}], "stream": True, "max_tokens": 6}
    body["temperature"] = 0
    async with http.post(url, json=body, headers={"X-Session-ID": cid}) as resp:
        assert resp.status == 200, await resp.text()
        parts, done = [], False
        async for raw in resp.content:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                parts += [c["delta"].get("content") or "" for c in chunk["choices"]]
        assert done
        return "".join(parts)


@pytest.mark.parametrize("mode", ["stateless", "stateful"])
async def test_two_streams_on_one_session_id_are_both_served(tiny: LoadedModel, mode: str) -> None:
    """The reported hang: `serve --stateless`, two streams at once with the same X-Session-ID.
    The second waits for the first and then runs; both complete."""
    engine = await engine_for(tiny, mode=mode).start()
    runner, port = await start_server(create_app(engine), shutdown_timeout=0.5)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        async with aiohttp.ClientSession() as http:
            texts = await asyncio.wait_for(
                asyncio.gather(
                    stream_chat(http, url, "tell me about rivers", "same"),
                    stream_chat(http, url, "tell me about trees", "same"),
                ),
                60,
            )
            assert all(texts)
            third = await stream_chat(http, url, "and one more", "same")  # still serving
            assert third
        stats = await engine.stats()
        assert stats.requests_running == stats.requests_waiting == 0
        await engine.check_accounting()
        if mode == "stateless":
            assert await engine.blocks_in_use() == 0
    finally:
        await runner.cleanup()
        await engine.stop()


async def test_exception_in_admission_fails_one_turn_and_the_rest_are_served(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine_for(tiny) as engine:
        cache = engine._scheduler.cache  # the fault is injected where only the scheduler looks
        real = cache.plan_admission

        def plan_admission(cid: str, target: list[int]) -> tuple[int, int]:
            if cid == scoped("", "doomed"):
                raise RuntimeError("injected admission fault")
            return real(cid, target)

        monkeypatch.setattr(cache, "plan_admission", plan_admission)

        async def turn(cid: str, text: str) -> str:
            return await engine.chat([{"role": "user", "content": text}], cid, GREEDY).text()

        results = await asyncio.wait_for(
            asyncio.gather(
                turn("a", "one two three"),
                turn("doomed", "four five"),
                turn("b", "six seven"),
                return_exceptions=True,
            ),
            60,
        )
        assert isinstance(results[1], EngineError) and "injected" in str(results[1])
        assert isinstance(results[0], str) and isinstance(results[2], str)
        assert await turn("c", "still there?")
        await engine.check_accounting()


async def test_failing_copies_never_change_a_greedy_reply(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every other swap-out fails under pressure: chunks stay on device (or are recomputed), and
    every turn still equals the stateless oracle; the cache accounting stays exact."""
    real = Swapper.copy
    calls = {"out": 0}

    def flaky_copy(self: Swapper, order: SwapOrder) -> None:
        if order.direction == "out":
            calls["out"] += 1
            if calls["out"] % 2:
                raise OSError("injected copy failure")
        real(self, order)

    monkeypatch.setattr(Swapper, "copy", flaky_copy)
    async with engine_for(tiny, device_cache_tokens=320, host_cache_tokens=4096) as engine:
        records = []
        for round_ in range(3):
            for i in range(4):
                history = [{"role": "user", "content": f"conversation {i} " * (6 + round_ * 4)}]
                stream = engine.chat(history, f"c{i}", GREEDY)
                await stream.text()
                records.append((engine.tokenizer.encode_chat(history), stream.token_ids))
        stats = await engine.stats()
        await engine.check_accounting()
    assert calls["out"] >= 2 and stats.swap_out_blocks_total > 0  # failures and successes
    eos = tiny.tokenizer.eos_token_ids
    for prompt, generated in records:
        assert generated == reference_generate(tiny.model, prompt, GREEDY, eos)
