"""Load and faults over loopback, bounded: a few hundred concurrent streams from two keys on the
tiny model under cache pressure, with random client disconnects, cancellations, deletes of
conversations mid-stream and non-streamed requests. Afterwards every block belongs to a live
conversation, the metrics agree with the engine and with what the clients sent, and a new
request is served."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from tiny_server import TinyServer, auth, chat, read_events, serve_tiny, wait_until

from pensieve.runtime import LoadedModel
from pensieve.server.state import ServerOptions

REQUESTS = 300
KEYS = ("load-key-a", "load-key-b")
ACTIONS = ["finish"] * 8 + ["disconnect"] * 4 + ["cancel"] * 3 + ["delete"] * 3 + ["whole"] * 2
WORDS = "river tree stone cloud bird lamp road hill sea wind fire snow".split()
CHAT = "/v1/chat/completions"


def check_ending(events: list[object]) -> str:
    """A complete stream ends in a finish chunk or, if its conversation was deleted, an error."""
    assert events and events[-1] == "[DONE]", events[-3:]
    last = events[-2]
    assert isinstance(last, dict)
    if "error" in last:
        assert last["error"]["code"] == "cancelled", last
        return "cancelled"
    assert last["choices"][0]["finish_reason"] in ("stop", "length"), last
    return last["choices"][0]["finish_reason"]


async def client(server: TinyServer, i: int, rng: random.Random, outcomes: Counter) -> None:
    key, action = KEYS[i % 2], rng.choice(ACTIONS)
    cid = f"conv-{rng.randrange(40)}" if rng.random() < 0.7 or action == "delete" else None
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 40)))
    body = chat(text, temperature=rng.choice([0, 0.8]), max_tokens=rng.randrange(4, 24))
    body["stream"] = action != "whole"
    headers = auth(key, **({"X-Session-ID": cid} if cid else {}))
    url = server.url + CHAT
    if action == "whole":
        timeout = aiohttp.ClientTimeout(total=rng.uniform(0.2, 20))
        try:
            async with server.http.post(url, json=body, headers=headers, timeout=timeout) as resp:
                assert resp.status in (200, 409), await resp.text()
                await resp.read()
                outcomes[f"whole-{resp.status}"] += 1
        except asyncio.TimeoutError:
            outcomes["whole-timeout"] += 1
        return
    async with server.http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        first = await read_events(resp, limit=1)
        assert first and "choices" in first[0]
        if action == "disconnect":
            await read_events(resp, limit=rng.randrange(0, 4))
            resp.close()
            outcomes["disconnected"] += 1
            return
        if action == "cancel":
            try:
                await asyncio.wait_for(read_events(resp), rng.uniform(0.01, 0.5))
                outcomes["cancel-too-late"] += 1
            except asyncio.TimeoutError:
                resp.close()
                outcomes["cancelled"] += 1
            return
        if action == "delete":
            cid = first[0]["conversation_id"]
            async with server.http.delete(
                f"{server.url}/v1/conversations/{cid}", headers=auth(key)
            ) as deleted:
                assert deleted.status in (200, 404)
                outcomes[f"delete-{deleted.status}"] += 1
        outcomes[check_ending(first + await read_events(resp))] += 1


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_hundreds_of_streams_with_faults_leave_exact_accounting(tiny: LoadedModel) -> None:
    options = ServerOptions(api_keys=KEYS)
    async with serve_tiny(
        tiny,
        options,
        connections=0,  # no client-side cap: every stream is open at once
        device_cache_tokens=2048,
        host_cache_tokens=4096,
        max_running=32,
        max_queue=1024,
    ) as server:
        rng, outcomes = random.Random(20251202), Counter()
        seeds = [rng.random() for _ in range(REQUESTS)]
        clients = [client(server, i, random.Random(s), outcomes) for i, s in enumerate(seeds)]
        await asyncio.wait_for(asyncio.gather(*clients), 240)
        engine, state = server.engine, server.state

        async def settled() -> bool:
            stats = await engine.stats()
            return stats.requests_running == stats.requests_waiting == state.in_flight == 0

        await wait_until(settled)
        await engine.check_accounting()  # every used block: one chunk of a live conversation
        stats = await engine.stats()
        assert stats.swap_out_blocks_total > 0  # the load did pressure the cache

        # every request the server saw is counted once: all but whole ones the client gave up on
        # (those may have left before the server read them)
        reached = REQUESTS - outcomes["whole-timeout"]

        async def chat_requests_counted() -> bool:
            async with server.http.get(server.url + "/metrics") as resp:
                counted = samples(await resp.text())
            total = sum(v for (name, labels), v in counted.items()
                        if name == "pensieve_http_requests_total"
                        and ("route", CHAT) in labels)  # fmt: skip
            assert total <= REQUESTS
            return total >= reached

        await wait_until(chat_requests_counted, timeout=10)
        async with server.http.get(server.url + "/metrics") as resp:
            scraped = samples(await resp.text())
        stats = await engine.stats()
        for metric, value in [
            ("pensieve_engine_requests_total", stats.requests_total),
            ("pensieve_generation_tokens_total", stats.generated_tokens_total),
            ("pensieve_prompt_tokens_total", stats.prompt_tokens_total),
            ("pensieve_conversations", stats.conversations),
            ("pensieve_requests_running", 0),
            ("pensieve_requests_waiting", 0),
        ]:
            assert scraped[(metric, ())] == value, metric
        used = ("pensieve_cache_blocks_used", (("tier", "device"),))
        assert scraped[used] == stats.device_blocks_used
        statuses = {
            dict(labels)["status"]: int(v)
            for (name, labels), v in scraped.items()
            if name == "pensieve_http_requests_total" and ("route", CHAT) in labels
        }
        assert set(statuses) <= {"200", "409", "499"}, statuses
        left = outcomes["disconnected"] + outcomes["cancelled"] + outcomes["whole-timeout"]
        assert statuses.get("499", 0) <= left
        assert stats.requests_total <= REQUESTS

        # only live conversations hold blocks: dropping them all empties both tiers
        for key in KEYS:
            async with server.http.get(server.url + "/v1/conversations", headers=auth(key)) as r:
                conversations = (await r.json())["data"]
            assert not any(c["active"] for c in conversations)
            for conversation in conversations:
                target = f"{server.url}/v1/conversations/{conversation['id']}"
                async with server.http.delete(target, headers=auth(key)) as deleted:
                    assert deleted.status == 200
        left = await engine.stats()
        assert left.conversations == 0, "conversations no tenant can list or delete"
        assert left.device_blocks_used == left.host_blocks_used == 0
        await engine.check_accounting()

        status, reply, _ = await server.post(CHAT, chat("still there?", max_tokens=4), KEYS[0])
        assert status == 200 and reply["usage"]["completion_tokens"] > 0
    assert outcomes["disconnected"] and outcomes["cancelled"] and outcomes["delete-200"]
    assert outcomes["length"] + outcomes["stop"] > REQUESTS // 4, outcomes
