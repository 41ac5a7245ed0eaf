"""The OpenAI chat-completions wire format as msgspec Structs.

Requests are decoded straight into typed Structs so that a malformed or mistyped body is
answered with a message naming the offending field (`messages[0].role`), never a crash.
Unknown fields are refused (a client must never believe an option was applied when it was
not); every known field is either honoured or refused with a 400 naming it (`check()`).
The same Structs generate the OpenAPI document (`openapi.py`), and responses are Structs too,
so every body the server writes has one definition.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from pensieve.chat_messages import ChatMessage, check_messages, describe_error, error_location
from pensieve.errors import InvalidRequestError
from pensieve.messages import TokenLogprob
from pensieve.sampling import SamplingParams

FinishReason = Literal["stop", "length"]

_CONVERSATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
ConversationId = Annotated[str, msgspec.Meta(pattern=f"^{_CONVERSATION_ID.pattern}$")]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
StopString = Annotated[str, msgspec.Meta(min_length=1)]
Bias = Annotated[float, msgspec.Meta(ge=-100, le=100)]
TokenIdKey = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,9}$")]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class SamplingRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The fields chat and legacy completions share, with pensieve's extensions (`top_k`,
    `min_p`, `ignore_eos`, `min_tokens`, `conversation_id`)."""

    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    seed: Seed | None = None
    stop: StopString | Annotated[list[StopString], msgspec.Meta(max_length=4)] | None = None
    max_tokens: Positive | None = None
    min_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    n: Positive | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[TokenIdKey, Bias] | None = None
    repetition_penalty: float | None = None
    user: str | None = None
    ignore_eos: bool | None = None
    conversation_id: ConversationId | None = None

    def check(self) -> None:
        """Refuse what this server cannot honour, naming the param (see REFUSED)."""
        for param, supported, why in REFUSED:
            if hasattr(self, param) and not supported(getattr(self, param)):
                raise InvalidRequestError(f"{param} {why}", param=param)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options is only allowed when stream is true", param="stream_options"
            )

    def build_sampling(
        self, max_tokens: int | None, *, logprobs: bool = False, top_logprobs: int = 0
    ) -> SamplingParams:
        """Map the request onto SamplingParams and validate their ranges.

        min_tokens is honoured when it reaches max_tokens (generation must then run to
        max_tokens, i.e. ignore_eos, which is how benchmarks pin a reply length); a smaller
        min_tokens is accepted and ignored, because the engine only knows "stop at EOS" or
        "never stop at EOS".
        """
        min_tokens = self.min_tokens or 0
        if max_tokens is not None and min_tokens > max_tokens:
            raise InvalidRequestError(
                "min_tokens must be between 0 and max_tokens", param="min_tokens"
            )
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        pinned = max_tokens is not None and min_tokens == max_tokens
        params = SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=stop,
            ignore_eos=bool(self.ignore_eos) or pinned,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
        return params.validate()


class StrictChatMessage(ChatMessage, forbid_unknown_fields=True):
    """A message as the server takes it: fields it would drop (tool_calls, audio, ...) are
    refused rather than ignored."""


class ResponseFormat(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingRequest, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/chat/completions: every field of OpenAI's API, honoured or refused."""

    messages: list[StrictChatMessage]
    max_completion_tokens: Positive | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # a routing hint: every conversation is cached here

    def check(self) -> None:
        super().check()
        check_messages(self.messages)

    def engine_messages(self) -> list[dict[str, Any]]:
        """The messages as the engine takes them; it joins text parts and maps roles."""
        return [
            {
                "role": m.role,
                "content": msgspec.to_builtins(m.content) if m.content else "",
            }
            for m in self.messages
        ]

    def sampling_params(self) -> SamplingParams:
        """max_completion_tokens wins over the deprecated max_tokens."""
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens
        return self.build_sampling(
            max_tokens, logprobs=bool(self.logprobs), top_logprobs=self.top_logprobs or 0
        )


def _absent(value: Any) -> bool:
    return value is None


# (param, whether a value is supported, why not): what the server refuses instead of ignoring.
REFUSED: list[tuple[str, Callable[[Any], bool], str]] = [
    ("n", lambda v: v in (None, 1), "must be 1: one choice per request is supported"),
    ("best_of", lambda v: v in (None, 1), "must be 1: one choice per request is supported"),
    (
        "response_format",
        lambda v: v is None or v.type == "text",
        'must be {"type": "text"}: JSON mode and structured outputs are not supported',
    ),
    ("tools", lambda v: not v, "are not supported: this server does not call tools"),
    ("tool_choice", lambda v: v in (None, "none"), 'must be "none": no tool calling'),
    ("parallel_tool_calls", _absent, "is not supported: this server does not call tools"),
    ("functions", lambda v: not v, "are not supported: this server does not call functions"),
    ("function_call", lambda v: v in (None, "none"), 'must be "none": no function calling'),
    (
        "repetition_penalty",
        lambda v: v in (None, 1.0),
        "is not supported: use presence_penalty or frequency_penalty",
    ),
    ("metadata", _absent, "is not supported: completions are not stored"),
    ("store", lambda v: not v, "is not supported: completions are not stored"),
    ("service_tier", lambda v: v in (None, "auto", "default"), 'must be "auto" or "default"'),
    ("modalities", lambda v: v is None or set(v) <= {"text"}, 'must be ["text"]: text only'),
    ("audio", _absent, "is not supported: text output only"),
    ("prediction", _absent, "is not supported (predicted outputs)"),
    ("reasoning_effort", _absent, "is not supported: this model does not reason"),
    ("verbosity", _absent, "is not supported"),
    ("web_search_options", _absent, "is not supported: no web search"),
    ("suffix", _absent, "is not supported (no insertion)"),
]

T = TypeVar("T", bound=SamplingRequest)


def _invalid_body(error: msgspec.ValidationError, body: bytes) -> InvalidRequestError:
    """A 400 naming the field an msgspec error points at, in OpenAI's `messages[0].role` form.

    Errors inside `messages` are worded by pensieve.chat_messages, as the library words them.
    """
    path, detail = error_location(error)
    text = str(error)
    if path == ".messages" or path.startswith(".messages["):
        fields = msgspec.json.decode(body)  # valid JSON: only its types were wrong
        if "messages" in fields:
            text = describe_error(path[len(".messages") :], fields["messages"], detail)
    unknown = re.search(r"unknown field `([^`]+)`", detail)
    if unknown:
        path += "." + unknown.group(1)
        text = f"unknown parameter {path.lstrip('.')!r}: this server does not support it"
    key = re.search(r" - at `key` in `\$(?P<path>[^`]*)`$", text)
    if key:  # a bad key of a mapping (logit_bias)
        path = key.group("path")
    if not path.startswith(".messages"):  # `stop[1]`, `logit_bias[...]`: name the param
        path = re.sub(r"\[[^\]]*\]", "", path)
    param = path.lstrip(".") or None
    return InvalidRequestError(f"Invalid request body: {text}", param=param)


def decode_request(body: bytes, kind: type[T]) -> T:
    """Decode and check a request body; raise InvalidRequestError naming the bad field."""
    try:
        req = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise _invalid_body(exc, body) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"Request body is not valid JSON: {exc}") from None
    req.check()
    return req


def decode_chat_request(body: bytes) -> ChatCompletionRequest:
    return decode_request(body, ChatCompletionRequest)


def check_conversation_id(value: str | None, param: str) -> str | None:
    """Client-chosen ids must be URL-safe so that /v1/conversations/{id} can name them."""
    if value is not None and not _CONVERSATION_ID.fullmatch(value):
        raise InvalidRequestError(
            f"{param} must be 1-128 characters of letters, digits and . _ : -", param=param
        )
    return value


# ----- responses -----


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int  # prompt tokens whose KV was reused instead of computed


class UsageInfo(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def from_engine(cls, usage: Any) -> UsageInfo:
        """From the engine's Usage(prompt_tokens, completion_tokens, cached_tokens, ...)."""
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.prompt_tokens + usage.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
        )


class TopLogprobOut(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(msgspec.Struct):
    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


def finite(logprob: float) -> float:
    """JSON has no -inf: an impossible token gets OpenAI's floor of -9999."""
    return logprob if math.isfinite(logprob) else -9999.0


def chat_logprobs(entries: list[TokenLogprob]) -> ChoiceLogprobs:
    """The engine's per-token entries in OpenAI's `choices[].logprobs` form."""
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=e.token,
                logprob=finite(e.logprob),
                bytes=list(e.token.encode("utf-8")),
                top_logprobs=[
                    TopLogprobOut(t.token, finite(t.logprob), list(t.token.encode("utf-8")))
                    for t in e.top
                ],
            )
            for e in entries
        ]
    )


class ResponseMessage(msgspec.Struct):
    content: str
    role: Literal["assistant"] = "assistant"


class Choice(msgspec.Struct):
    message: ResponseMessage
    finish_reason: FinishReason | None
    index: int = 0
    logprobs: ChoiceLogprobs | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    delta: Delta
    finish_reason: FinishReason | None = None
    index: int = 0
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: UsageInfo
    conversation_id: str | None
    object: Literal["chat.completion"] = "chat.completion"


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    conversation_id: str | None
    usage: UsageInfo | None = None
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    created: int
    max_model_len: int
    owned_by: str = "pensieve"
    object: Literal["model"] = "model"


class ListResponse(msgspec.Struct):
    """OpenAI's list envelope, used for models and conversations alike."""

    data: list[Any]
    object: Literal["list"] = "list"


class DeletedConversation(msgspec.Struct):
    id: str
    deleted: bool = True
    object: Literal["conversation.deleted"] = "conversation.deleted"


def new_completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
