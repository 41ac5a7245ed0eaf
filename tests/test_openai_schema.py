"""Request decoding and response encoding of the OpenAI wire format, without an engine."""

from __future__ import annotations

import json
import math

import msgspec
import pytest

from pensieve.chat_messages import parse_messages
from pensieve.errors import InvalidRequestError
from pensieve.messages import TokenLogprob, TopLogprob
from pensieve.server.completions import CompletionRequest
from pensieve.server.openai_schema import (
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    PromptTokensDetails,
    UsageInfo,
    chat_logprobs,
    check_conversation_id,
    decode_chat_request,
    decode_request,
)

USER = [{"role": "user", "content": "hi"}]


def body(**fields: object) -> bytes:
    return json.dumps({"messages": USER, **fields}).encode()


def rejects(raw: bytes) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        decode_chat_request(raw).sampling_params()
    return info.value


def test_minimal_request_gets_openai_defaults() -> None:
    req = decode_chat_request(body())
    params = req.sampling_params()
    assert req.model is None and not req.stream
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == 0
    assert params.max_tokens is None and params.stop == [] and not params.ignore_eos
    assert req.engine_messages() == [{"role": "user", "content": "hi"}]


def test_sampling_fields_map_onto_sampling_params() -> None:
    req = decode_chat_request(
        body(temperature=0, top_p=0.5, top_k=7, seed=3, stop="\n", max_tokens=9, ignore_eos=True)
    )
    params = req.sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.0, 0.5, 7, 3)
    assert params.stop == ["\n"] and params.max_tokens == 9 and params.ignore_eos


def test_max_completion_tokens_wins_and_min_tokens_equal_pins_length() -> None:
    params = decode_chat_request(
        body(max_tokens=50, max_completion_tokens=5, min_tokens=5)
    ).sampling_params()
    assert params.max_tokens == 5 and params.ignore_eos
    # a smaller min_tokens is accepted and ignored (documented)
    params = decode_chat_request(body(max_tokens=8, min_tokens=2)).sampling_params()
    assert params.max_tokens == 8 and not params.ignore_eos


def test_content_parts_pass_through_and_null_assistant_content() -> None:
    req = decode_chat_request(
        json.dumps(
            {
                "messages": [
                    {"role": "developer", "content": "be brief"},
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    },
                    {"role": "assistant", "content": None},
                ]
            }
        ).encode()
    )
    assert req.engine_messages() == [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize(
    ("raw", "param", "needle"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"", None, "not valid JSON"),
        (b"[]", None, "Expected `object`"),
        (b"{}", "messages", "missing required field"),
        (json.dumps({"messages": []}).encode(), "messages", "must not be empty"),
        (json.dumps({"messages": [{"content": "x"}]}).encode(), "messages[0].role", "missing"),
        (
            json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
            "messages[0].role",
            "wizard",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": 3}]}).encode(),
            "messages[0].content",
            "Expected",
        ),
        (json.dumps({"messages": [{"role": "user"}]}).encode(), "messages[0].content", "required"),
        (
            json.dumps(
                {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
            ).encode(),
            "messages[0].content[0].type",
            "image_url",
        ),
        (body(temperature="hot"), "temperature", "Expected"),
        (body(max_tokens=1.5), "max_tokens", "Expected"),
        (body(stream="yes"), "stream", "Expected"),
        (body(temperature=3), "temperature", "<= 2"),
        (body(top_p=0), "top_p", "> 0"),
        (body(top_k=-1), "top_k", ">= 0"),
        (body(max_tokens=0), "max_tokens", ">= 1"),
        (body(max_completion_tokens=-2), "max_completion_tokens", ">= 1"),
        (body(min_tokens=9, max_tokens=3), "min_tokens", "between 0 and max_tokens"),
        (body(stop=["a", "b", "c", "d", "e"]), "stop", "length <= 4"),
        (body(stop=[""]), "stop", "length >= 1"),
        (body(n=2), "n", "n must be 1"),
        (body(n=0), "n", ">= 1"),
        (body(presence_penalty=2.5), "presence_penalty", "<= 2"),
        (body(frequency_penalty=-3), "frequency_penalty", ">= -2"),
        (body(min_p=1.5), "min_p", "<= 1"),
        (body(top_logprobs=21, logprobs=True), "top_logprobs", "<= 20"),
        (body(top_logprobs=2), "top_logprobs", "needs logprobs"),
        (body(logit_bias={"x1": 1}), "logit_bias", "regex"),
        (body(logit_bias={"5": 101}), "logit_bias", "<= 100"),
        (body(seed=2**64), "seed", "<="),
        (body(stream_options={"include_usage": True}), "stream_options", "stream is true"),
    ],
)
def test_bad_requests_name_the_field(raw: bytes, param: str | None, needle: str) -> None:
    err = rejects(raw)
    assert err.status == 400 and err.param == param
    assert needle in err.message
    assert set(err.to_openai()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "messages",
    [
        "hi",
        [],
        ["hi"],
        [{"content": "x"}],
        [{"role": "robot", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": 3}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        [{"role": "user", "content": [{"type": "text"}]}],
        [{"role": "system", "content": "x", "name": 1}],
    ],
)
def test_server_and_library_word_message_errors_alike(messages: object) -> None:
    """One set of message rules: the library path (plain dicts) says what the server says."""
    server = rejects(json.dumps({"messages": messages}).encode())
    with pytest.raises(InvalidRequestError) as info:
        parse_messages(messages, param="messages")
    library = info.value
    assert server.message.removeprefix("Invalid request body: ") == library.message
    assert library.param == "messages" and server.param.startswith("messages")


def test_library_accepts_what_the_server_accepts() -> None:
    raw = [
        {"role": "developer", "content": [{"type": "text", "text": "a"}]},
        {"role": "assistant", "content": None},
        {"role": "assistant", "name": "bot"},
        {"role": "tool", "content": "{}"},
    ]
    req = decode_chat_request(json.dumps({"messages": raw}).encode())
    assert msgspec.to_builtins(parse_messages(raw)) == msgspec.to_builtins(req.messages)
    assert [m.text() for m in req.messages] == ["a", "", "", "{}"]


def test_conversation_ids_must_be_url_safe() -> None:
    assert check_conversation_id("conv-1.a_b:c", "conversation_id") == "conv-1.a_b:c"
    assert check_conversation_id(None, "X-Session-ID") is None
    for bad in ("", "a/b", "x" * 129, "a b"):
        with pytest.raises(InvalidRequestError) as info:
            check_conversation_id(bad, "X-Session-ID")
        assert info.value.param == "X-Session-ID"


def test_chunks_encode_like_openai() -> None:
    usage = UsageInfo(3, 2, 5, PromptTokensDetails(cached_tokens=1))
    first = ChatCompletionChunk(
        id="c",
        created=1,
        model="m",
        conversation_id="k",
        choices=[ChunkChoice(Delta(role="assistant", content=""))],
    )
    last = ChatCompletionChunk(
        id="c", created=1, model="m", conversation_id="k", choices=[], usage=usage
    )
    a, b = (msgspec.json.decode(msgspec.json.encode(x)) for x in (first, last))
    assert a["object"] == "chat.completion.chunk"
    assert a["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert a["choices"][0]["finish_reason"] is None and a["usage"] is None
    assert b["choices"] == [] and b["usage"]["prompt_tokens_details"] == {"cached_tokens": 1}


def test_honoured_fields_reach_sampling_params() -> None:
    params = decode_chat_request(
        body(
            presence_penalty=0.5,
            frequency_penalty=-1,
            logit_bias={"42": -100, "7": 2.5},
            min_p=0.1,
            logprobs=True,
            top_logprobs=3,
            seed=-4,
            user="alice",
            safety_identifier="s1",
            prompt_cache_key="k",
            response_format={"type": "text"},
            tool_choice="none",
            tools=[],
            modalities=["text"],
            store=False,
            service_tier="auto",
            repetition_penalty=1.0,
            stream=None,
        )
    ).sampling_params()
    assert (params.presence_penalty, params.frequency_penalty, params.min_p) == (0.5, -1.0, 0.1)
    assert params.logit_bias == {42: -100.0, 7: 2.5}
    assert params.logprobs and params.top_logprobs == 3 and params.seed == -4


# A value of each field this server cannot honour: each is refused, naming the field.
REFUSED_VALUES = {
    "n": 3,
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "repetition_penalty": 1.2,
    "metadata": {"a": "b"},
    "store": True,
    "service_tier": "flex",
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "mp3"},
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low",
    "verbosity": "low",
    "web_search_options": {},
}


@pytest.mark.parametrize("param", sorted(REFUSED_VALUES))
def test_unsupported_values_are_refused_by_name(param: str) -> None:
    err = rejects(body(**{param: REFUSED_VALUES[param]}))
    assert err.status == 400 and err.param == param and param in err.message


def test_json_schema_response_format_is_refused() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
    assert rejects(body(response_format=fmt)).param == "response_format"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"best_of": 2}, "best_of"),  # a legacy-completions field, unknown to chat
        ({"echo": True}, "echo"),
        ({"stream_options": {"include_usage": True, "extra": 1}, "stream": True}, None),
        ({"response_format": {"type": "text", "strict": True}}, "response_format.strict"),
    ],
)
def test_unknown_fields_are_refused_by_name(fields: dict[str, object], param: str | None) -> None:
    err = rejects(body(**fields))
    expected = param or "stream_options.extra"
    assert err.param == expected and "unknown parameter" in err.message


def test_unknown_message_fields_are_refused() -> None:
    raw = json.dumps(
        {"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}
    ).encode()
    assert rejects(raw).param == "messages[0].tool_calls"


def test_chat_logprobs_encode_like_openai() -> None:
    entry = TokenLogprob(5, "é", -0.5, [TopLogprob(5, "é", -0.5), TopLogprob(6, "x", -math.inf)])
    out = msgspec.to_builtins(chat_logprobs([entry]))
    assert out["content"] == [
        {
            "token": "é",
            "logprob": -0.5,
            "bytes": [195, 169],
            "top_logprobs": [
                {"token": "é", "logprob": -0.5, "bytes": [195, 169]},
                {"token": "x", "logprob": -9999.0, "bytes": [120]},
            ],
        }
    ]


def completion_body(**fields: object) -> bytes:
    return json.dumps({"prompt": "Once upon a time", **fields}).encode()


def test_completion_requests_default_to_16_tokens_and_map_logprobs() -> None:
    req = decode_request(completion_body(), CompletionRequest)
    params = req.sampling_params()
    assert params.max_tokens == 16 and not params.logprobs and req.text == "Once upon a time"
    raw = completion_body(prompt=["one"], logprobs=2, max_tokens=3)
    req = decode_request(raw, CompletionRequest)
    params = req.sampling_params()
    assert req.text == "one" and params.logprobs and params.top_logprobs == 2
    assert params.max_tokens == 3


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"n": 2}, "n"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"logprobs": 6}, "logprobs"),
        ({"messages": []}, "messages"),
        ({"logit_bias": {"1": 500}}, "logit_bias"),
    ],
)
def test_bad_completion_requests_name_the_field(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_request(completion_body(**fields), CompletionRequest).sampling_params()
    assert info.value.param == param
