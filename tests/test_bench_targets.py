"""The bench's targets: the in-process Engine adapter and the OpenAI-compatible HTTP client."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from pensieve.bench.targets import EngineTarget, OpenAITarget, SSEState, parse_prometheus


class FakeStream:
    def __init__(self, deltas):
        self.deltas = deltas
        self.usage = None
        self.finish_reason = None

    async def __aiter__(self):
        for d in self.deltas:
            yield d
        self.usage = type(
            "Usage",
            (),
            dict(prompt_tokens=9, completion_tokens=3, cached_tokens=4, recomputed_tokens=1),
        )()
        self.finish_reason = "length"


class FakeEngine:
    def __init__(self):
        self.seen = None

    def chat(self, messages, conversation_id=None, sampling=None):
        self.seen = (conversation_id, sampling)
        return FakeStream(["a", "b", "c"])

    def stats(self):
        return {"swap_out_blocks_total": 2, "mode": "stateful", "ok": True}


async def test_engine_target_uses_the_engine_api():
    engine = FakeEngine()
    result = await EngineTarget(engine).chat([{"role": "user", "content": "x"}], 3, "conv")
    assert (result.text, result.prompt_tokens, result.cached_tokens) == ("abc", 9, 4)
    assert (result.completion_tokens, result.recomputed_tokens, result.error) == (3, 1, None)
    cid, sampling = engine.seen
    assert cid == "conv" and sampling.ignore_eos and sampling.max_tokens == 3
    assert sampling.temperature == 0
    assert await EngineTarget(engine).metrics() == {"swap_out_blocks_total": 2.0}


def test_sse_state_with_and_without_usage():
    def chunk(delta: str, **kw: object) -> str:
        return "data: " + json.dumps({"choices": [{"delta": {"content": delta}, **kw}]})

    state = SSEState()
    lines = [": ping", chunk("Hel"), "", chunk("lo", finish_reason="length")]
    usage = {
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    lines.append("data: " + json.dumps({"choices": [], "usage": usage}))
    assert not any(state.feed(line) for line in lines)
    assert state.feed("data: [DONE]")
    r = state.finish()
    assert (r.text, r.prompt_tokens, r.cached_tokens, r.completion_tokens) == ("Hello", 12, 8, 5)
    assert r.finish_reason == "length" and r.first_token_time is not None

    state = SSEState()  # llama.cpp: no usage chunk
    for line in (chunk("a"), chunk(""), chunk("b")):
        state.feed(line)
    r = state.finish()
    assert (r.text, r.completion_tokens, r.cached_tokens, r.prompt_tokens) == ("ab", 2, None, None)

    state = SSEState()
    assert state.feed('data: {"error": {"message": "boom"}}')
    assert state.finish().error == "boom"


def test_parse_prometheus():
    text = (
        "# HELP x_total things\n# TYPE x_total counter\n"
        'x_total{kind="a"} 3\nx_total{kind="b"} 4.5\nx_created 1.7e9\ny 2 1700000000\nz NaN\n'
    )
    assert parse_prometheus(text) == {"x_total": 7.5, "y": 2.0}


async def test_openai_target_against_a_local_server(aiohttp_server_factory):
    seen = {}

    async def completions(request):
        body = await request.json()
        seen.update(
            body=body,
            session=request.headers.get("X-Session-ID"),
            routing_key=request.headers.get("X-SMG-Routing-Key"),
        )
        if body["messages"][-1]["content"] == "fail":
            return web.json_response({"error": {"message": "bad"}}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in ("Hi", " there"):
            data = {"choices": [{"delta": {"content": piece}}]}
            await resp.write(f"data: {json.dumps(data)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def models(request):
        return web.json_response({"data": [{"id": "tiny"}]})

    async def metrics(request):
        return web.Response(text="pensieve_swap_in_blocks_total 3\n")

    url = await aiohttp_server_factory(
        [
            ("POST", "/v1/chat/completions", completions),
            ("GET", "/v1/models", models),
            ("GET", "/metrics", metrics),
        ]
    )
    async with OpenAITarget(url) as target:
        result = await target.chat([{"role": "user", "content": "x"}], 6, "conv-1")
        assert (result.text, result.completion_tokens, result.error) == ("Hi there", 2, None)
        body = seen["body"]
        assert body["model"] == "tiny" and body["max_tokens"] == body["min_tokens"] == 6
        assert body["ignore_eos"] and body["stream_options"] == {"include_usage": True}
        assert seen["session"] == "conv-1"
        failed = await target.chat([{"role": "user", "content": "fail"}], 6, "conv-1")
        assert failed.error.startswith("HTTP 400") and failed.text == ""
        assert await target.metrics() == {"pensieve_swap_in_blocks_total": 3.0}
    async with OpenAITarget(url, session_headers=["X-SMG-Routing-Key"]) as keyed:
        await keyed.chat([{"role": "user", "content": "x"}], 6, "conv-2")
        assert (seen["session"], seen["routing_key"]) == (None, "conv-2")
    async with OpenAITarget(url, session_headers=()) as anonymous:  # history only
        await anonymous.chat([{"role": "user", "content": "x"}], 6, "conv-3")
        assert (seen["session"], seen["routing_key"]) == (None, None)
    async with OpenAITarget("http://127.0.0.1:9/v1", model="m") as dead:
        result = await dead.chat([{"role": "user", "content": "x"}], 6, "c")
        assert result.error and result.text == ""
        assert await dead.metrics() == {}


@pytest.fixture
async def aiohttp_server_factory():
    runners = []

    async def start(routes) -> str:
        app = web.Application()
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()
