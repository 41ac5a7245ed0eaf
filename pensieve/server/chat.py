"""POST /v1/chat/completions: one engine stream answered as SSE chunks or one JSON body.

The handler awaits the first text delta before sending headers: the engine raises validation,
context-length and overload errors there, so they still get a proper status code. Whatever
way the handler ends (normal end, client disconnect, cancellation at shutdown), an unfinished
generation is closed so that its blocks go back to the engine.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from pensieve.errors import InvalidRequestError, PensieveError
from pensieve.server.openai_schema import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ResponseMessage,
    UsageInfo,
    check_conversation_id,
    decode_chat_request,
    new_completion_id,
    now,
)
from pensieve.server.state import (
    DISCONNECTED,
    SESSION_HEADER,
    STATE,
    ServerState,
    check_model,
    json_response,
)

if TYPE_CHECKING:
    from pensieve.engine import ChatStream

log = logging.getLogger("pensieve.server")

_encode = msgspec.json.Encoder().encode


class Generation:
    """One engine stream plus the timing its metrics need."""

    def __init__(self, stream: ChatStream, state: ServerState):
        self.stream = stream
        self.state = state
        self.started = time.perf_counter()
        self.first_at = self.started

    async def first(self) -> str:
        """The first text delta ("" if the reply is empty); raises the engine's request errors."""
        try:
            text = await anext(self.stream)
        except StopAsyncIteration:
            text = ""
        self.first_at = time.perf_counter()
        return text

    async def rest(self) -> AsyncIterator[str]:
        """The remaining deltas; records the request's latencies once the engine ends it."""
        async for delta in self.stream:
            yield delta
        usage = self.stream.usage
        self.state.metrics.observe_generation(
            self.first_at - self.started,
            time.perf_counter() - self.first_at,
            usage.completion_tokens if usage is not None else 0,
        )

    async def close(self) -> None:
        """Abort the generation if it is unfinished (else a no-op); shielded so that a second
        cancellation (server shutdown) cannot skip freeing its blocks."""
        await asyncio.shield(self.stream.aclose())


def _conversation_id(req: ChatCompletionRequest, request: web.Request) -> str | None:
    """The conversation a client names, by body field or X-Session-ID header (None: match)."""
    body = check_conversation_id(req.conversation_id, "conversation_id")
    header = check_conversation_id(request.headers.get(SESSION_HEADER), SESSION_HEADER)
    if body is not None and header is not None and body != header:
        raise InvalidRequestError(
            f"conversation_id {body!r} and the {SESSION_HEADER} header {header!r} disagree",
            param="conversation_id",
        )
    return body if body is not None else header


def _session_header(stream: ChatStream) -> dict[str, str]:
    cid = stream.conversation_id
    return {SESSION_HEADER: cid} if cid is not None else {}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    engine = state.ready_engine()
    req = decode_chat_request(await request.read())
    check_model(req.model, engine)
    cid = _conversation_id(req, request)
    messages = req.engine_messages()
    sampling = req.sampling_params()
    with state.track():
        gen = Generation(engine.chat(messages, conversation_id=cid, sampling=sampling), state)
        try:
            first = await gen.first()
            if req.stream:
                return await _stream_response(request, req, gen, first, engine.model_name)
            return await _complete_response(gen, first, engine.model_name)
        finally:
            await gen.close()


async def _complete_response(gen: Generation, first: str, model: str) -> web.Response:
    parts = [first]
    async for delta in gen.rest():
        parts.append(delta)
    stream = gen.stream
    body = ChatCompletion(
        id=new_completion_id(),
        created=now(),
        model=model,
        choices=[
            Choice(ResponseMessage(content="".join(parts)), finish_reason=stream.finish_reason)
        ],
        usage=UsageInfo.from_engine(stream.usage),
        conversation_id=stream.conversation_id,
    )
    return json_response(body, headers=_session_header(stream))


async def _stream_response(
    request: web.Request, req: ChatCompletionRequest, gen: Generation, first: str, model: str
) -> web.StreamResponse:
    stream = gen.stream
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    response.headers.update(_session_header(stream))
    await response.prepare(request)
    chunk = functools.partial(
        ChatCompletionChunk,
        id=new_completion_id(),
        created=now(),
        model=model,
        conversation_id=stream.conversation_id,
    )

    async def send(payload: object) -> None:
        await response.write(b"data: " + _encode(payload) + b"\n\n")

    try:
        try:
            await send(chunk(choices=[ChunkChoice(Delta(role="assistant", content=first))]))
            async for delta in gen.rest():
                if delta:
                    await send(chunk(choices=[ChunkChoice(Delta(content=delta))]))
            await send(chunk(choices=[ChunkChoice(Delta(), finish_reason=stream.finish_reason)]))
            if req.stream_options is not None and req.stream_options.include_usage:
                await send(chunk(choices=[], usage=UsageInfo.from_engine(stream.usage)))
        except PensieveError as exc:  # headers are gone: report in-band, as OpenAI does
            log.warning("generation failed mid-stream: %s", exc.message)
            await send(exc.to_openai())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionError:
        request[DISCONNECTED] = True
        log.info("client disconnected mid-stream; generation aborted")
    return response
