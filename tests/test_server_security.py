"""A server safe to expose, on the tiny model: API keys, conversations bound to their key's
tenant on every route, model aliases, the context cap, CORS and request ids."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re

import pytest
from tiny_server import chat, serve_tiny, wait_until

from pensieve.runtime import LoadedModel
from pensieve.server.auth import ApiKeys, AuthenticationError, parse_keys, tenant_id
from pensieve.server.state import ServerOptions

KEY_A, KEY_B = "sk-alpha-0123456789", "sk-bravo-9876543210"
KEYS = ServerOptions(api_keys=(KEY_A, KEY_B))
GREEDY = {"temperature": 0, "max_tokens": 4}
V1_ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/tiny-random"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/conversations"),
    ("GET", "/v1/conversations/x"),
    ("DELETE", "/v1/conversations/x"),
    ("GET", "/v1/no/such/route"),
]


def test_keys_are_compared_in_constant_time_against_every_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = ApiKeys(["k1", "a-much-longer-key-2", "k3"])
    for header in ("Bearer k1", "Bearer k3", "Bearer nope", "Bearer a-much-longer-key-2"):
        calls.clear()
        try:
            keys.tenant_for(header)
        except AuthenticationError:
            pass
        assert calls == [(32, 32)] * 3  # digests of equal length, every key, no early exit
    assert keys.tenant_for("bearer k3") == tenant_id("k3") != tenant_id("k1")
    assert re.fullmatch(r"[0-9a-f]{16}", tenant_id("k1"))
    assert "k1" not in repr(keys) and "k1" not in repr(ServerOptions(api_keys=("k1",)))
    assert parse_keys(["a, b", "", "b,c"]) == ("a", "b", "c")


async def test_without_a_key_every_v1_route_is_401_and_health_stays_open(
    tiny: LoadedModel,
) -> None:
    async with serve_tiny(tiny, KEYS) as server:
        for method, path in V1_ROUTES:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY_A}):
                async with server.http.request(
                    method, server.url + path, json=chat("hi"), headers=headers
                ) as resp:
                    assert resp.status == 401, (method, path, headers)
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                    error = (await resp.json())["error"]
                assert error["code"] == "invalid_api_key"
                assert error["type"] == "invalid_request_error" and error["message"]
        assert (await server.get("/health"))[0] == 200
        assert (await server.get("/metrics"))[0] == 200
        assert (await server.get("/openapi.json"))[0] == 200
        status, models = await server.get("/v1/models", KEY_B)
        assert status == 200 and models["data"][0]["id"] == "tiny-random"


async def test_metrics_can_require_a_key(tiny: LoadedModel) -> None:
    options = ServerOptions(api_keys=(KEY_A,), metrics_auth=True)
    async with serve_tiny(tiny, options) as server:
        assert (await server.get("/metrics"))[0] == 401
        assert (await server.get("/metrics", KEY_A))[0] == 200
        assert (await server.get("/health"))[0] == 200


async def test_keys_never_reach_the_logs(
    tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve_tiny(tiny, KEYS) as server:
        await server.post("/v1/chat/completions", chat("hi", **GREEDY), KEY_A)
        await server.post("/v1/chat/completions", chat("hi", **GREEDY), KEY_B + "x")
        await server.post("/v1/chat/completions", chat("hi", user="u-1", **GREEDY), KEY_B)
        await server.get("/v1/conversations", "sk-guess")
    assert "rid=" in caplog.text  # the access log ran, and named each request
    for secret in (KEY_A, KEY_B, "sk-guess"):
        assert secret not in caplog.text


async def test_a_conversation_is_invisible_to_other_keys_on_every_route(
    tiny: LoadedModel,
) -> None:
    async with serve_tiny(tiny, KEYS) as server:
        # A names a conversation; B cannot list, read or delete it
        status, first, headers = await server.post(
            "/v1/chat/completions", chat("alpha beta gamma", **GREEDY), KEY_A, X_Session_ID="c-1"
        )
        assert status == 200 and headers["X-Session-ID"] == "c-1"
        assert [c["id"] for c in (await server.get("/v1/conversations", KEY_A))[1]["data"]] == [
            "c-1"
        ]
        assert (await server.get("/v1/conversations", KEY_B))[1]["data"] == []
        status, error = await server.get("/v1/conversations/c-1", KEY_B)
        assert status == 404 and error["error"]["param"] == "conversation_id"
        assert (await server.delete("/v1/conversations/c-1", KEY_B))[0] == 404
        before = (await server.get("/v1/conversations/c-1", KEY_A))[1]

        # B continuing "c-1" by id gets a conversation of its own: nothing of A's is reused
        status, b_turn, _ = await server.post(
            "/v1/chat/completions", chat("alpha beta gamma", **GREEDY), KEY_B, X_Session_ID="c-1"
        )
        assert status == 200 and b_turn["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert (await server.get("/v1/conversations/c-1", KEY_A))[1]["turns"] == before["turns"]
        assert (await server.get("/v1/conversations/c-1", KEY_B))[1]["turns"] == 1

        # an unnamed conversation: its generated id is unguessable and A's alone
        status, anon, _ = await server.post(
            "/v1/chat/completions", chat("rivers and trees", **GREEDY), KEY_A
        )
        cid = anon["conversation_id"]
        assert re.fullmatch(r"[0-9a-f]{32}", cid)
        assert (await server.get(f"/v1/conversations/{cid}", KEY_B))[0] == 404
        assert (await server.get(f"/v1/conversations/{cid}", KEY_A))[0] == 200

        # resending A's history: A continues its conversation, B matches nothing of A's
        history = chat("rivers and trees")["messages"]
        history += [{"role": "assistant", "content": anon["choices"][0]["message"]["content"]}]
        history += [{"role": "user", "content": "and then?"}]
        status, b_again, _ = await server.post(
            "/v1/chat/completions", {"messages": history, **GREEDY}, KEY_B
        )
        assert b_again["conversation_id"] != cid
        assert b_again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        status, a_again, _ = await server.post(
            "/v1/chat/completions", {"messages": history, **GREEDY}, KEY_A
        )
        assert a_again["conversation_id"] == cid
        assert a_again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

        # deletion by the owner works; the other key's same-named conversation stays
        assert (await server.delete("/v1/conversations/c-1", KEY_A))[0] == 200
        assert (await server.get("/v1/conversations/c-1", KEY_A))[0] == 404
        assert (await server.get("/v1/conversations/c-1", KEY_B))[0] == 200
        await server.engine.check_accounting()


async def test_served_model_names_are_aliases(tiny: LoadedModel) -> None:
    options = ServerOptions(served_model_names=("gpt-4o-mini", "local"))
    async with serve_tiny(tiny, options) as server:
        status, models = await server.get("/v1/models")
        assert [m["id"] for m in models["data"]] == ["gpt-4o-mini"]
        assert (await server.get("/v1/models/local"))[1]["id"] == "local"
        assert (await server.get("/v1/models/tiny-random"))[0] == 404
        for name in ("gpt-4o-mini", "local", None):
            status, body, _ = await server.post(
                "/v1/chat/completions", chat("hi", model=name, **GREEDY)
            )
            assert status == 200 and body["model"] == "gpt-4o-mini"
        status, body, _ = await server.post(
            "/v1/completions", {"prompt": "hi", "model": "tiny-random", "max_tokens": 2}
        )
        assert status == 404 and body["error"]["code"] == "model_not_found"


async def test_max_model_len_caps_the_context(tiny: LoadedModel) -> None:
    async with serve_tiny(tiny, max_model_len=64) as server:
        assert (await server.get("/v1/models"))[1]["data"][0]["max_model_len"] == 64
        status, body, _ = await server.post("/v1/chat/completions", chat("word " * 80))
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        status, body, _ = await server.post("/v1/completions", {"prompt": "word " * 80})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        status, body, _ = await server.post("/v1/chat/completions", chat("hi", max_tokens=60))
        assert status == 400 and body["error"]["param"] == "max_tokens"
        status, body, _ = await server.post("/v1/chat/completions", chat("hi", **GREEDY))
        assert status == 200


ORIGIN = "https://chat.example"


async def test_cors_is_off_by_default(tiny: LoadedModel) -> None:
    async with serve_tiny(tiny) as server:
        headers = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
        async with server.http.options(server.url + "/v1/chat/completions", headers=headers) as r:
            assert r.status == 405 and "Access-Control-Allow-Origin" not in r.headers
        async with server.http.get(server.url + "/v1/models", headers={"Origin": ORIGIN}) as r:
            assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


async def test_cors_preflight_and_responses_for_allowed_origins(tiny: LoadedModel) -> None:
    options = ServerOptions(api_keys=(KEY_A,), allowed_origins=(ORIGIN,))
    async with serve_tiny(tiny, options) as server:
        preflight = {
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        url = server.url + "/v1/chat/completions"
        async with server.http.options(url, headers=preflight) as r:  # no key on a preflight
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        async with server.http.options(url, headers={**preflight, "Origin": "https://evil"}) as r:
            assert "Access-Control-Allow-Origin" not in r.headers
        for body in (chat("hi", **GREEDY), chat("hi", stream=True, **GREEDY)):
            headers = {"Origin": ORIGIN, "Authorization": f"Bearer {KEY_A}"}
            async with server.http.post(url, json=body, headers=headers) as r:
                assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
                assert "X-Request-Id" in r.headers["Access-Control-Expose-Headers"]
                await r.read()
        async with server.http.post(url, json=chat("hi"), headers={"Origin": ORIGIN}) as r:
            assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == ORIGIN


async def test_request_ids_are_echoed_on_every_response(
    tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serve_tiny(tiny, ServerOptions(max_body_bytes=1024)) as server:
        url = server.url + "/v1/chat/completions"
        cases = [
            ("POST", url, chat("hi", **GREEDY)),
            ("POST", url, chat("hi", stream=True, **GREEDY)),
            ("POST", url, chat("hi", n=2)),
            ("POST", url, chat("x" * 2000)),
            ("GET", server.url + "/nowhere", None),
            ("GET", server.url + "/health", None),
        ]
        for i, (method, target, body) in enumerate(cases):
            rid = f"client-id-{i}"
            headers = {"X-Request-Id": rid}
            async with server.http.request(method, target, json=body, headers=headers) as r:
                assert r.headers["X-Request-Id"] == rid, (method, target, r.status)
                await r.read()
            async with server.http.request(method, target, json=body) as r:
                assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-Id"])
                await r.read()
        bad = {"X-Request-Id": "no spaces\tor tabs"}
        async with server.http.get(server.url + "/health", headers=bad) as r:
            assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-Id"])
        status, _, headers = await server.post(
            "/v1/chat/completions", chat("hi", user="alice", **GREEDY), X_Request_Id="with-user"
        )
    assert status == 200
    assert "rid=client-id-0" in caplog.text
    assert re.search(r"request with-user: user='alice'", caplog.text)


async def test_a_queued_turn_keeps_its_tenant_when_the_one_before_it_is_cancelled(
    tiny: LoadedModel,
) -> None:
    """The first turn on `x` is cancelled while queued (its empty conversation is dropped); the
    second turn queued behind it must still create `x` in its own tenant, visible to its key."""
    async with serve_tiny(tiny, KEYS, max_running=1) as server:
        engine = server.engine

        async def waiting(n: int) -> bool:
            return (await engine.stats()).requests_waiting == n

        body = chat("busy " * 8, temperature=0, max_tokens=400, ignore_eos=True, stream=True)
        headers = {"Authorization": f"Bearer {KEY_A}", "X-Session-ID": "busy"}
        url = server.url + "/v1/chat/completions"
        busy = await server.http.post(url, json=body, headers=headers)
        assert (await busy.content.readline()).startswith(b"data:")
        first = asyncio.ensure_future(
            server.post("/v1/chat/completions", chat("one", **GREEDY), KEY_A, X_Session_ID="x")
        )
        await wait_until(lambda: waiting(1))
        second = asyncio.ensure_future(
            server.post("/v1/chat/completions", chat("two", **GREEDY), KEY_A, X_Session_ID="x")
        )
        await wait_until(lambda: waiting(2))
        first.cancel()
        await wait_until(lambda: waiting(1))
        busy.close()
        status, reply, _ = await asyncio.wait_for(second, 30)
        assert status == 200 and reply["conversation_id"] == "x"
        status, info = await server.get("/v1/conversations/x", KEY_A)
        assert status == 200 and info["turns"] == 1
        assert "x" in {c["id"] for c in (await server.get("/v1/conversations", KEY_A))[1]["data"]}
        # still a named conversation: an anonymous resend of its history does not take it over
        history = chat("two")["messages"] + [
            {"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
            {"role": "user", "content": "more"},
        ]
        status, anon, _ = await server.post(
            "/v1/chat/completions", {"messages": history, **GREEDY}, KEY_A
        )
        assert status == 200 and anon["conversation_id"] != "x"
        await engine.check_accounting()
