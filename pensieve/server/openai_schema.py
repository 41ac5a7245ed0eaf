"""The OpenAI chat-completions wire format as msgspec Structs.

Requests are decoded straight into typed Structs so that a malformed or mistyped body is
answered with a message naming the offending field (`messages[0].role`), never a crash.
Responses are Structs too, so every body the server writes has one definition.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

import msgspec

from pensieve.chat_messages import (
    ChatMessage,
    check_messages,
    describe_error,
    error_location,
)
from pensieve.errors import InvalidRequestError
from pensieve.sampling import SamplingParams

FinishReason = Literal["stop", "length"]

_CONVERSATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    """POST /v1/chat/completions. Unknown fields are ignored, as OpenAI-compatible servers do."""

    messages: list[ChatMessage]
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM, llama.cpp)
    seed: int | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    ignore_eos: bool = False  # extension: keep generating past EOS (benchmarks)
    min_tokens: int | None = None  # extension: see sampling_params()
    conversation_id: str | None = None  # extension: name the conversation to continue
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None

    def check(self) -> None:
        """Checks beyond types. Known options this server lacks are rejected, not ignored."""
        if self.n not in (None, 1):
            raise InvalidRequestError("n must be 1: one choice per request is supported", param="n")
        for param in ("presence_penalty", "frequency_penalty"):
            if getattr(self, param) not in (None, 0):
                raise InvalidRequestError(f"{param} is not supported (must be 0)", param=param)
        if self.logprobs:
            raise InvalidRequestError("logprobs are not supported", param="logprobs")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options is only allowed when stream is true", param="stream_options"
            )
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
        """Map the OpenAI fields onto SamplingParams and validate their ranges.

        max_completion_tokens wins over the deprecated max_tokens. min_tokens is honoured
        when it reaches max_tokens (generation must then run to max_tokens, i.e. ignore_eos,
        which is how benchmarks pin a reply length); a smaller min_tokens is accepted and
        ignored, because the engine only knows "stop at EOS" or "never stop at EOS".
        """
        max_tokens = self.max_completion_tokens
        param = "max_completion_tokens"
        if max_tokens is None:
            max_tokens, param = self.max_tokens, "max_tokens"
        if max_tokens is not None and max_tokens < 1:
            raise InvalidRequestError(f"{param} must be >= 1", param=param)
        min_tokens = self.min_tokens or 0
        if min_tokens < 0 or (max_tokens is not None and min_tokens > max_tokens):
            raise InvalidRequestError(
                "min_tokens must be between 0 and max_tokens", param="min_tokens"
            )
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=stop,
            ignore_eos=self.ignore_eos or (max_tokens is not None and min_tokens == max_tokens),
        )
        return params.validate()


_request_decoder = msgspec.json.Decoder(ChatCompletionRequest)


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
    return InvalidRequestError(f"Invalid request body: {text}", param=path.lstrip(".") or None)


def decode_chat_request(body: bytes) -> ChatCompletionRequest:
    """Decode and check a request body; raise InvalidRequestError naming the bad field."""
    try:
        req = _request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _invalid_body(exc, body) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"Request body is not valid JSON: {exc}") from None
    req.check()
    return req


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


class ResponseMessage(msgspec.Struct):
    content: str
    role: Literal["assistant"] = "assistant"


class Choice(msgspec.Struct):
    message: ResponseMessage
    finish_reason: FinishReason | None
    index: int = 0
    logprobs: None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    delta: Delta
    finish_reason: FinishReason | None = None
    index: int = 0
    logprobs: None = None


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


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
