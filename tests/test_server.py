"""The HTTP server on a real engine (default model, float32, small caches), driven by the
official openai client for the happy paths and by raw aiohttp for bad inputs and disconnects.

One engine and one server serve the whole module; tests run in file order and the last one
drains the server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from pensieve.config import EngineConfig
from pensieve.engine import Engine
from pensieve.server import STATE, ServerState, create_app, start_server

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

MAX_BODY = 256 * 1024
FRANCE = "What is the capital of France? Answer in one sentence."
GREEDY = {"temperature": 0, "max_tokens": 16}


@dataclass
class Server:
    engine: Engine
    state: ServerState
    url: str
    client: openai.AsyncOpenAI
    http: aiohttp.ClientSession
    stop: Callable[[], object]

    def chat_url(self) -> str:
        return self.url + "/v1/chat/completions"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(default_model_dir: Path) -> AsyncIterator[Server]:
    config = EngineConfig(
        model=str(default_model_dir),
        dtype="float32",
        device="cpu",
        device_cache_tokens=4096,
        host_cache_tokens=4096,
        profile_cost=False,
    )
    engine = await Engine(config).start()
    app = create_app(engine, max_body_bytes=MAX_BODY)
    runner, port = await start_server(app, shutdown_timeout=0.5)
    url = f"http://127.0.0.1:{port}"
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    async with aiohttp.ClientSession() as http:
        yield Server(engine, app[STATE], url, client, http, runner.cleanup)
    await client.close()
    await runner.cleanup()
    await engine.stop()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out waiting for the engine"
        await asyncio.sleep(0.05)


async def settled(server: Server) -> bool:
    """Nothing runs or waits in the engine, and no generation is in flight in the server."""
    stats = await server.engine.stats()
    idle = stats.requests_running == 0 and stats.requests_waiting == 0
    return idle and server.state.in_flight == 0


async def test_health_and_models(server: Server) -> None:
    async with server.http.get(server.url + "/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"
    models = await server.client.models.list()
    assert [m.id for m in models.data] == [server.engine.model_name]
    model = await server.client.models.retrieve(server.engine.model_name)
    assert model.model_extra["max_model_len"] == server.engine.max_context


async def test_non_streaming_completion(server: Server) -> None:
    raw = await server.client.chat.completions.with_raw_response.create(
        model=server.engine.model_name, messages=user(FRANCE), **GREEDY
    )
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0
    cid = completion.model_extra["conversation_id"]
    assert cid and raw.headers["X-Session-ID"] == cid


async def test_streaming_matches_non_streaming(server: Server) -> None:
    question = user("Name three colours.")
    whole = await server.client.chat.completions.create(
        model=server.engine.model_name, messages=question, temperature=0, max_tokens=8
    )
    stream = await server.client.chat.completions.create(
        messages=question,
        model=server.engine.model_name,
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
        max_tokens=8,
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == whole.choices[0].message.content
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens == 8
    assert len({c.model_extra["conversation_id"] for c in chunks}) == 1


@pytest.mark.parametrize("naming", ["matched", "header", "body"])
async def test_four_turns_resent_in_full_reuse_the_cache(server: Server, naming: str) -> None:
    """Each turn's prompt contains the previous turn's whole prompt, whose KV is reused."""
    extra: dict[str, dict[str, str]] = {}
    if naming == "header":
        extra["extra_headers"] = {"X-Session-ID": "four-turns-header"}
    elif naming == "body":
        extra["extra_body"] = {"conversation_id": "four-turns-body"}
    messages = [{"role": "system", "content": f"You are a helpful assistant ({naming})."}]
    previous_prompt, ids = 0, set()
    for question in ["Name a fruit.", "What colour is it?", "Name another.", "Which is sweeter?"]:
        messages.append({"role": "user", "content": question})
        completion = await server.client.chat.completions.create(
            model=server.engine.model_name, messages=messages, temperature=0, max_tokens=4, **extra
        )
        usage = completion.usage
        assert usage.prompt_tokens_details.cached_tokens >= previous_prompt
        assert usage.prompt_tokens > previous_prompt
        previous_prompt = usage.prompt_tokens
        ids.add(completion.model_extra["conversation_id"])
        messages.append({"role": "assistant", "content": completion.choices[0].message.content})
    assert len(ids) == 1
    cid = ids.pop()
    if naming != "matched":
        assert cid == f"four-turns-{naming}"
    async with server.http.get(f"{server.url}/v1/conversations/{cid}") as resp:
        info = await resp.json()
    assert resp.status == 200 and info["id"] == cid
    assert info["tokens_total"] >= previous_prompt
    assert (
        info["tokens_device"] + info["tokens_host"] + info["tokens_dropped"] <= info["tokens_total"]
    )
    async with server.http.get(server.url + "/v1/conversations") as resp:
        assert cid in [c["id"] for c in (await resp.json())["data"]]


def chat_body(**fields: object) -> dict[str, object]:
    return {"messages": user("Hi"), "max_tokens": 4, "temperature": 0, **fields}


NO_HEADERS: dict[str, str] = {}
# body (JSON value or raw bytes), request headers, status, error param, error code
BAD_CHAT_REQUESTS = [
    pytest.param(b"{oops", NO_HEADERS, 400, None, None, id="malformed-json"),
    pytest.param(b"[1, 2]", NO_HEADERS, 400, None, None, id="not-an-object"),
    pytest.param({"model": "x"}, NO_HEADERS, 400, "messages", None, id="no-messages"),
    pytest.param({"messages": []}, NO_HEADERS, 400, "messages", None, id="empty-messages"),
    pytest.param(
        {"messages": [{"role": "wizard", "content": "x"}]},
        NO_HEADERS,
        400,
        "messages[0].role",
        None,
        id="unknown-role",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": 5}]},
        NO_HEADERS,
        400,
        "messages[0].content",
        None,
        id="mistyped-content",
    ),
    pytest.param(chat_body(max_tokens="ten"), NO_HEADERS, 400, "max_tokens", None, id="type"),
    pytest.param(chat_body(temperature=5), NO_HEADERS, 400, "temperature", None, id="temp"),
    pytest.param(chat_body(top_p=1.5), NO_HEADERS, 400, "top_p", None, id="top-p"),
    pytest.param(chat_body(top_k=-3), NO_HEADERS, 400, "top_k", None, id="top-k"),
    pytest.param(chat_body(n=2), NO_HEADERS, 400, "n", None, id="n"),
    pytest.param(chat_body(stop=list("abcde")), NO_HEADERS, 400, "stop", None, id="stop"),
    pytest.param(
        chat_body(max_tokens=10**6),
        NO_HEADERS,
        400,
        "max_tokens",
        "context_length_exceeded",
        id="max-tokens-beyond-context",
    ),
    pytest.param(
        {"messages": user("hello " * 9000)},
        NO_HEADERS,
        400,
        "messages",
        "context_length_exceeded",
        id="prompt-beyond-context",
    ),
    pytest.param(
        chat_body(model="gpt-4o"), NO_HEADERS, 404, "model", "model_not_found", id="model"
    ),
    pytest.param(
        chat_body(), {"X-Session-ID": "no spaces"}, 400, "X-Session-ID", None, id="session-id"
    ),
    pytest.param(
        chat_body(conversation_id="a"),
        {"X-Session-ID": "b"},
        400,
        "conversation_id",
        None,
        id="conflicting-ids",
    ),
    pytest.param(b"x" * (MAX_BODY + 1), NO_HEADERS, 413, None, "request_too_large", id="oversized"),
]


@pytest.mark.parametrize(("body", "headers", "status", "param", "code"), BAD_CHAT_REQUESTS)
async def test_bad_chat_requests_get_openai_errors(
    server: Server,
    body: object,
    headers: dict[str, str],
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    await expect_error(server, "POST", "/v1/chat/completions", data, headers, status, param, code)


@pytest.mark.parametrize(
    ("method", "path", "status", "param", "code"),
    [
        ("GET", "/v1/chat/completions", 405, None, "method_not_allowed"),
        ("DELETE", "/v1/models", 405, None, "method_not_allowed"),
        ("GET", "/v1/nothing/here", 404, None, "unknown_route"),
        ("GET", "/v1/models/gpt-4o", 404, "model", "model_not_found"),
        ("GET", "/v1/conversations/nope", 404, "conversation_id", None),
        ("DELETE", "/v1/conversations/nope", 404, "conversation_id", None),
    ],
)
async def test_bad_routes_get_openai_errors(
    server: Server, method: str, path: str, status: int, param: str | None, code: str | None
) -> None:
    await expect_error(server, method, path, None, NO_HEADERS, status, param, code)


async def expect_error(
    server: Server,
    method: str,
    path: str,
    data: bytes | None,
    headers: dict[str, str],
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    async with server.http.request(method, server.url + path, data=data, headers=headers) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["param"] == param
    if code is not None:
        assert error["code"] == code


async def test_openai_client_sees_typed_errors_and_server_keeps_serving(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await server.client.chat.completions.create(model="nope", messages=user("Hi"))
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        await server.client.chat.completions.create(
            model=server.engine.model_name, messages=user("Hi"), temperature=-1
        )
    ok = await server.client.chat.completions.create(
        model=server.engine.model_name, messages=user(FRANCE), **GREEDY
    )
    assert ok.choices[0].message.content == "The capital of France is Paris."


async def test_internal_errors_are_500_json(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_chat(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated engine bug")

    monkeypatch.setattr(server.engine, "chat", broken_chat)
    async with server.http.post(server.chat_url(), json=chat_body()) as resp:
        assert resp.status == 500
        error = (await resp.json())["error"]
    assert error["type"] == "server_error" and "simulated" not in error["message"]
    monkeypatch.undo()
    async with server.http.post(server.chat_url(), json=chat_body()) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_cancels_generation_without_leaking(
    server: Server, stream: bool
) -> None:
    engine = server.engine
    for conversation in await engine.conversations():  # start from an empty cache
        async with server.http.delete(f"{server.url}/v1/conversations/{conversation.id}") as resp:
            assert resp.status == 200
    assert (await engine.blocks_in_use()) == 0
    cid = f"disconnect-{stream}"
    body = chat_body(max_tokens=2000, ignore_eos=True, stream=stream)
    generated = (await engine.stats()).generated_tokens_total
    if stream:
        resp = await server.http.post(server.chat_url(), json=body, headers={"X-Session-ID": cid})
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b"data: ")
        resp.close()  # drop the connection mid-stream
    else:
        timeout = aiohttp.ClientTimeout(total=1.5)
        with pytest.raises(asyncio.TimeoutError):
            await server.http.post(
                server.chat_url(), json=body, headers={"X-Session-ID": cid}, timeout=timeout
            )
    await wait_until(lambda: settled(server))
    assert (await engine.stats()).generated_tokens_total - generated < 1000
    # what is left is at most this conversation's cache; dropping it empties the tiers
    if cid in {c.id for c in (await engine.conversations())}:
        await engine.delete_conversation(cid)
    assert (await engine.blocks_in_use()) == 0
    await engine.check_accounting()


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
async def test_penalties_reduce_repeated_tokens(server: Server, penalty: str) -> None:
    """The default model's greedy answer repeats tokens; a penalty changes it and repeats
    fewer (logprobs name the tokens, and the openai client parses their format)."""

    async def tokens(**extra: float) -> list[str]:
        reply = await server.client.chat.completions.create(
            model=server.engine.model_name,
            messages=user("Count from one to twenty."),
            temperature=0,
            max_tokens=24,
            logprobs=True,
            **extra,
        )
        return [t.token for t in reply.choices[0].logprobs.content]

    plain, penalised = await tokens(), await tokens(**{penalty: 2.0})
    assert penalised != plain
    assert len(penalised) - len(set(penalised)) < len(plain) - len(set(plain))


async def test_metrics(server: Server) -> None:
    async with server.http.get(server.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    route = ("route", "/v1/chat/completions")
    assert samples[("pensieve_http_requests_total", (route, ("status", "200")))] >= 10
    assert samples[("pensieve_http_requests_total", (route, ("status", "400")))] >= 10
    assert samples[("pensieve_http_requests_total", (route, ("status", "499")))] >= 1
    assert samples[("pensieve_time_to_first_token_seconds_count", ())] >= 10
    assert samples[("pensieve_time_per_output_token_seconds_count", ())] >= 10
    stats = await server.engine.stats()
    assert samples[("pensieve_prompt_tokens_total", ())] == stats.prompt_tokens_total
    assert samples[("pensieve_cached_prompt_tokens_total", ())] == stats.cached_tokens_total > 0
    assert 0 < samples[("pensieve_cached_token_ratio", ())] < 1
    assert samples[("pensieve_generation_tokens_total", ())] == stats.generated_tokens_total
    device = (("tier", "device"),)
    assert samples[("pensieve_cache_blocks_capacity", device)] == stats.device_blocks_total
    assert ("pensieve_cache_blocks_used", (("tier", "host"),)) in samples
    assert ("pensieve_swapped_blocks_total", (("direction", "out"),)) in samples
    for name in (
        "requests_running",
        "requests_waiting",
        "recomputed_tokens_total",
        "dropped_tokens_total",
    ):
        assert ("pensieve_" + name, ()) in samples


async def test_draining_refuses_new_requests_and_interrupts_past_grace(server: Server) -> None:
    """Shutdown in-process: after the grace period, a stream still running ends with an error
    chunk and [DONE], a non-streamed request with 503; their blocks are freed."""
    engine = server.engine
    body = chat_body(max_tokens=2000, ignore_eos=True, stream=True)
    resp = await server.http.post(server.chat_url(), json=body)
    assert (await resp.content.readline()).startswith(b"data: ")
    whole = asyncio.ensure_future(
        server.http.post(server.chat_url(), json=chat_body(max_tokens=2000, ignore_eos=True))
    )
    await wait_until(lambda: asyncio.sleep(0, server.state.in_flight == 2))
    assert not await server.state.drain(grace_s=0.2)
    events = [line for line in (await resp.read()).decode().splitlines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    async with await whole as interrupted:
        assert interrupted.status == 503
        assert (await interrupted.json())["error"]["code"] == "shutting_down"
    async with server.http.post(server.chat_url(), json=chat_body()) as refused:
        assert refused.status == 503
        assert refused.headers["Retry-After"] == "1"
        assert (await refused.json())["error"]["code"] == "shutting_down"
    async with server.http.get(server.url + "/health") as health:
        assert health.status == 503
    await server.stop()
    await wait_until(lambda: settled(server))
    await engine.check_accounting()
