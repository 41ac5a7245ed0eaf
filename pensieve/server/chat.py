"""POST /v1/chat/completions: one engine turn in the caller's tenant, answered as SSE chunks or
one JSON body (the shared path is `generation.py`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web

from pensieve.errors import InvalidRequestError
from pensieve.messages import TokenLogprob
from pensieve.server.generation import Generation, respond
from pensieve.server.openai_schema import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    ResponseMessage,
    SamplingRequest,
    UsageInfo,
    chat_logprobs,
    check_conversation_id,
    decode_chat_request,
    new_completion_id,
    now,
)
from pensieve.server.state import REQUEST_ID, SESSION_HEADER, STATE, TENANT

if TYPE_CHECKING:
    from pensieve.engine import ChatStream, Usage

log = logging.getLogger("pensieve.server")


def conversation_id(req: SamplingRequest, request: web.Request) -> str | None:
    """The conversation a client names, by body field or X-Session-ID header (None: match)."""
    body = check_conversation_id(req.conversation_id, "conversation_id")
    header = check_conversation_id(request.headers.get(SESSION_HEADER), SESSION_HEADER)
    if body is not None and header is not None and body != header:
        raise InvalidRequestError(
            f"conversation_id {body!r} and the {SESSION_HEADER} header {header!r} disagree",
            param="conversation_id",
        )
    return body if body is not None else header


def log_caller(
    request: web.Request, user: str | None, safety_identifier: str | None = None
) -> None:
    """`user` and `safety_identifier` are honoured by logging them with the request id."""
    if user is not None or safety_identifier is not None:
        log.info(
            "request %s: user=%r safety_identifier=%r",
            request.get(REQUEST_ID),
            user,
            safety_identifier,
        )


class ChatFormat:
    """Chat bodies: `chat.completion` and `chat.completion.chunk` objects."""

    def __init__(self, model: str, stream: ChatStream, want_logprobs: bool):
        self.model = model
        self.id = new_completion_id()
        self.created = now()
        self.stream = stream  # its conversation id is known once the engine accepted the turn
        self.want_logprobs = want_logprobs

    def _logprobs(self, entries: list[TokenLogprob]) -> ChoiceLogprobs | None:
        return chat_logprobs(entries) if self.want_logprobs else None

    def _chunk(
        self, choices: list[ChunkChoice], usage: UsageInfo | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            conversation_id=self.stream.conversation_id,
            usage=usage,
        )

    def delta(self, text: str, logprobs: list[TokenLogprob], first: bool) -> ChatCompletionChunk:
        delta = Delta(role="assistant", content=text) if first else Delta(content=text)
        return self._chunk([ChunkChoice(delta, logprobs=self._logprobs(logprobs))])

    def finish(self, reason: str | None, logprobs: list[TokenLogprob]) -> ChatCompletionChunk:
        lp = self._logprobs(logprobs) if logprobs else None
        return self._chunk([ChunkChoice(Delta(), finish_reason=reason, logprobs=lp)])  # type: ignore[arg-type]

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], UsageInfo.from_engine(usage))

    def whole(
        self, text: str, reason: str | None, usage: Usage, logprobs: list[TokenLogprob]
    ) -> ChatCompletion:
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                Choice(ResponseMessage(content=text), reason, logprobs=self._logprobs(logprobs))  # type: ignore[arg-type]
            ],
            usage=UsageInfo.from_engine(usage),
            conversation_id=self.stream.conversation_id,
        )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    engine = state.ready_engine()
    req = decode_chat_request(await request.read())
    model = state.check_model(req.model, engine)
    cid = conversation_id(req, request)
    log_caller(request, req.user, req.safety_identifier)
    sampling = req.sampling_params()
    tenant = request.get(TENANT, "")
    stream = engine.chat(req.engine_messages(), cid, sampling, tenant=tenant)
    fmt = ChatFormat(model, stream, sampling.logprobs)
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    return await respond(request, Generation(stream, state), fmt, bool(req.stream), include_usage)
