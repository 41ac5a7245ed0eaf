"""No silent ignores, over HTTP on the tiny model: each request field is honoured (with an
assertion on its effect) or refused with 400 naming it; legacy /v1/completions end to end.
(presence/frequency penalties are asserted on the default model in test_server.py, whose
greedy replies repeat tokens; the tiny random model's do not.)"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from test_openai_schema import REFUSED_VALUES
from tiny_server import TinyServer, chat, serve_tiny

from pensieve.runtime import LoadedModel

pytestmark = pytest.mark.asyncio(loop_scope="module")

GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
CHAT = "/v1/chat/completions"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny: LoadedModel) -> AsyncIterator[TinyServer]:
    async with serve_tiny(tiny) as running:
        yield running


async def ask(server: TinyServer, path: str = CHAT, **fields: object) -> dict:
    body = chat("Tell me about rivers", **fields) if path == CHAT else fields
    status, reply, _ = await server.post(path, body)
    assert status == 200, reply
    return reply


def content(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


async def test_logprobs_and_top_logprobs(server: TinyServer) -> None:
    reply = await ask(server, logprobs=True, top_logprobs=3, **GREEDY)
    entries = reply["choices"][0]["logprobs"]["content"]
    assert len(entries) == reply["usage"]["completion_tokens"] == 8
    assert "".join(e["token"] for e in entries) == content(reply)
    for e in entries:
        assert e["logprob"] <= 0 and e["bytes"] == list(e["token"].encode())
        top = e["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted(
            (t["logprob"] for t in top), reverse=True
        )
        assert (top[0]["token"], top[0]["logprob"]) == (e["token"], e["logprob"])  # greedy
    plain = await ask(server, **GREEDY)
    assert plain["choices"][0]["logprobs"] is None and content(plain) == content(reply)
    only = await ask(server, logprobs=True, **GREEDY)
    assert all(e["top_logprobs"] == [] for e in only["choices"][0]["logprobs"]["content"])


async def test_streamed_chunks_carry_their_tokens_logprobs(server: TinyServer) -> None:
    whole = await ask(server, logprobs=True, top_logprobs=2, **GREEDY)
    status, events, _ = await server.post(
        CHAT, chat("Tell me about rivers", stream=True, logprobs=True, top_logprobs=2, **GREEDY)
    )
    assert status == 200 and events[-1] == "[DONE]"
    streamed = []
    for event in events[:-1]:
        choice = event["choices"][0]
        if choice["delta"].get("content"):
            assert choice["logprobs"]["content"], "a text chunk without its tokens' logprobs"
        if choice["logprobs"] is not None:
            streamed += choice["logprobs"]["content"]
    assert streamed == whole["choices"][0]["logprobs"]["content"]


async def test_logit_bias_steers_greedy_choice(server: TinyServer) -> None:
    plain = await ask(server, logprobs=True, **GREEDY)
    first = plain["choices"][0]["logprobs"]["content"][0]["token"]
    forced_id = server.engine.tokenizer.encode(" river", add_special_tokens=False)[0]
    forced = await ask(server, logit_bias={str(forced_id): 100}, **GREEDY)
    assert content(forced) == server.engine.tokenizer.decode([forced_id] * 8)
    first_id = server.engine.tokenizer.encode(first, add_special_tokens=False)
    banned = await ask(server, logprobs=True, logit_bias={str(first_id[0]): -100}, **GREEDY)
    assert banned["choices"][0]["logprobs"]["content"][0]["token"] != first
    status, body, _ = await server.post(CHAT, chat("hi", logit_bias={"999999999": 1}))
    assert status == 400 and body["error"]["param"] == "logit_bias"  # beyond the vocabulary


async def test_min_p_one_keeps_only_the_top_token(server: TinyServer) -> None:
    greedy = content(await ask(server, **GREEDY))
    hot = {**GREEDY, "temperature": 2.0}
    samples = [content(await ask(server, seed=seed, **hot)) for seed in range(3)]
    assert any(s != greedy for s in samples)  # sampling does wander at this temperature
    for seed in range(3):
        assert content(await ask(server, seed=seed, min_p=1.0, **hot)) == greedy
    again = [content(await ask(server, seed=seed, **hot)) for seed in range(3)]
    assert again == samples  # and a seed makes it repeatable


async def test_stop_top_k_n_and_extensions(server: TinyServer) -> None:
    greedy = content(await ask(server, **GREEDY))
    cut = greedy[len(greedy) // 2 : len(greedy) // 2 + 3]
    stopped = await ask(server, stop=[cut], **GREEDY)
    assert content(stopped) == greedy[: greedy.index(cut)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert content(await ask(server, top_k=1, temperature=1.5, max_tokens=8)) == content(
        await ask(server, temperature=0, max_tokens=8)
    )
    assert content(await ask(server, n=1, **GREEDY)) == greedy
    pinned = await ask(server, temperature=0, max_tokens=5, min_tokens=5)
    assert pinned["usage"]["completion_tokens"] == 5
    named = await ask(server, conversation_id="ext-1", **GREEDY)
    assert named["conversation_id"] == "ext-1"


@pytest.mark.parametrize("param", sorted(REFUSED_VALUES))
async def test_unsupported_fields_are_refused_over_http(server: TinyServer, param: str) -> None:
    status, body, _ = await server.post(CHAT, chat("hi", **{param: REFUSED_VALUES[param]}))
    assert status == 400 and body["error"]["param"] == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"best_of": 2}, "best_of"),
        ({"guided_json": {}}, "guided_json"),
        ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "t"}]}, None),
    ],
)
async def test_unknown_fields_are_refused_over_http(
    server: TinyServer, fields: dict[str, object], param: str | None
) -> None:
    status, body, _ = await server.post(CHAT, {**chat("hi"), **fields})
    assert status == 400 and body["error"]["param"] == (param or "messages[0].tool_call_id")


async def test_legacy_completions_whole_and_streamed(server: TinyServer) -> None:
    whole = await ask(server, "/v1/completions", prompt="Once upon a time", ignore_eos=True,
                      temperature=0)  # fmt: skip
    assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
    assert whole["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens
    assert whole["choices"][0]["finish_reason"] == "length"
    text = whole["choices"][0]["text"]
    status, events, _ = await server.post(
        "/v1/completions",
        {"prompt": ["Once upon a time"], "ignore_eos": True, "temperature": 0, "stream": True,
         "stream_options": {"include_usage": True}},
    )  # fmt: skip
    assert status == 200 and events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert "".join(c["text"] for e in events[:-1] for c in e["choices"]) == text
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 16
    echoed = await ask(server, "/v1/completions", prompt="Once upon a time", echo=True,
                       temperature=0, max_tokens=4, ignore_eos=True)  # fmt: skip
    assert echoed["choices"][0]["text"].startswith("Once upon a time")


async def test_legacy_completions_logprobs_and_conversations(server: TinyServer) -> None:
    reply = await ask(server, "/v1/completions", prompt="The river", logprobs=2, max_tokens=6,
                      temperature=0, ignore_eos=True, conversation_id="legacy-1")  # fmt: skip
    lp = reply["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert "".join(lp["tokens"]) == reply["choices"][0]["text"]
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(len(top) <= 2 and max(top.values()) <= 0 for top in lp["top_logprobs"])
    again = await ask(server, "/v1/completions", prompt="The river" + reply["choices"][0]["text"]
                      + " and", max_tokens=2, conversation_id="legacy-1")  # fmt: skip
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert again["conversation_id"] == "legacy-1"
