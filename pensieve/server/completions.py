"""POST /v1/completions: OpenAI's legacy text completions (the default route of vLLM's and
SGLang's benchmark clients). The prompt is raw text, continued without a chat template through
`Engine.complete`; streaming, usage, logprobs and conversations work as for chat."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import msgspec
from aiohttp import web

from pensieve.errors import InvalidRequestError
from pensieve.messages import TokenLogprob
from pensieve.sampling import SamplingParams
from pensieve.server.chat import conversation_id, log_caller
from pensieve.server.generation import Generation, respond
from pensieve.server.openai_schema import (
    FinishReason,
    Positive,
    SamplingRequest,
    UsageInfo,
    decode_request,
    finite,
    new_completion_id,
    now,
)
from pensieve.server.state import STATE, TENANT

if TYPE_CHECKING:
    from pensieve.engine import ChatStream, Usage

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this route


class CompletionRequest(SamplingRequest, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/completions. A prompt list may hold one prompt (no batching)."""

    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: Positive | None = None

    def check(self) -> None:
        super().check()
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError(
                "echo with logprobs needs the prompt's log-probabilities, which are not supported",
                param="echo",
            )

    def sampling_params(self) -> SamplingParams:
        """OpenAI's default of 16 tokens; logprobs=N: the sampled token's and N alternatives."""
        max_tokens = DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        logprobs = self.logprobs is not None
        return self.build_sampling(max_tokens, logprobs=logprobs, top_logprobs=self.logprobs or 0)

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    text: str
    finish_reason: FinishReason | None = None
    index: int = 0
    logprobs: CompletionLogprobs | None = None


class Completion(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    conversation_id: str | None
    object: Literal["text_completion"] = "text_completion"


class CompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    conversation_id: str | None
    usage: UsageInfo | None = None
    object: Literal["text_completion"] = "text_completion"


class CompletionFormat:
    """Legacy bodies; `text_offset` runs on across chunks (from the prompt's end with echo)."""

    def __init__(self, model: str, stream: ChatStream, req: CompletionRequest):
        self.model = model
        self.id = new_completion_id("cmpl")
        self.created = now()
        self.stream = stream
        self.want_logprobs = req.logprobs is not None
        self.echo = req.text if req.echo else ""
        self.offset = len(self.echo)

    def _logprobs(self, entries: list[TokenLogprob]) -> CompletionLogprobs | None:
        if not self.want_logprobs:
            return None
        offsets = []
        for entry in entries:
            offsets.append(self.offset)
            self.offset += len(entry.token)
        return CompletionLogprobs(
            tokens=[e.token for e in entries],
            token_logprobs=[finite(e.logprob) for e in entries],
            top_logprobs=[{t.token: finite(t.logprob) for t in e.top} for e in entries],
            text_offset=offsets,
        )

    def _chunk(
        self, choices: list[CompletionChoice], usage: UsageInfo | None = None
    ) -> CompletionChunk:
        cid = self.stream.conversation_id
        return CompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices,
            conversation_id=cid, usage=usage,
        )  # fmt: skip

    def delta(self, text: str, logprobs: list[TokenLogprob], first: bool) -> CompletionChunk:
        text = self.echo + text if first else text
        return self._chunk([CompletionChoice(text, logprobs=self._logprobs(logprobs))])

    def finish(self, reason: str | None, logprobs: list[TokenLogprob]) -> CompletionChunk:
        lp = self._logprobs(logprobs) if logprobs else None
        return self._chunk([CompletionChoice("", reason, logprobs=lp)])  # type: ignore[arg-type]

    def usage(self, usage: Usage) -> CompletionChunk:
        return self._chunk([], UsageInfo.from_engine(usage))

    def whole(
        self, text: str, reason: str | None, usage: Usage, logprobs: list[TokenLogprob]
    ) -> Completion:
        choice = CompletionChoice(self.echo + text, reason, logprobs=self._logprobs(logprobs))  # type: ignore[arg-type]
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=[choice],
            usage=UsageInfo.from_engine(usage), conversation_id=self.stream.conversation_id,
        )  # fmt: skip


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    engine = state.ready_engine()
    req = decode_request(await request.read(), CompletionRequest)
    model = state.check_model(req.model, engine)
    cid = conversation_id(req, request)
    log_caller(request, req.user)
    sampling = req.sampling_params()
    stream = engine.complete(req.text, cid, sampling, tenant=request.get(TENANT, ""))
    fmt = CompletionFormat(model, stream, req)
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    return await respond(request, Generation(stream, state), fmt, bool(req.stream), include_usage)
