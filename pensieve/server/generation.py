"""One engine stream answered over HTTP: as SSE chunks or one JSON body, for chat and legacy
completions alike (a `Format` renders the route's own bodies).

The handler awaits the first text delta before sending headers: the engine raises validation,
context-length and overload errors there, so they still get a proper status code. Whatever way
the handler ends (normal end, client disconnect, shutdown), an unfinished generation is closed
so that its blocks go back to the engine. At shutdown, past the grace period, the server
interrupts each generation still running: a stream then ends with an error chunk and
`[DONE]`, a non-streamed request with 503; never with a cut connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from aiohttp import web

from pensieve.errors import ConflictError, PensieveError
from pensieve.messages import TokenLogprob
from pensieve.server.state import (
    DISCONNECTED,
    SESSION_HEADER,
    ServerState,
    UnavailableError,
    json_response,
)

if TYPE_CHECKING:
    from pensieve.engine import ChatStream, Usage

log = logging.getLogger("pensieve.server")

_encode = msgspec.json.Encoder().encode


class Format(Protocol):
    """The bodies of one route: streamed chunks and the whole non-streamed answer."""

    def delta(self, text: str, logprobs: list[TokenLogprob], first: bool) -> Any: ...

    def finish(self, reason: str | None, logprobs: list[TokenLogprob]) -> Any: ...

    def usage(self, usage: Usage) -> Any: ...

    def whole(
        self, text: str, reason: str | None, usage: Usage, logprobs: list[TokenLogprob]
    ) -> Any: ...


class Generation:
    """One engine stream plus the timing its metrics need and the means to interrupt it."""

    def __init__(self, stream: ChatStream, state: ServerState):
        self.stream = stream
        self.state = state
        self.started = time.perf_counter()
        self.first_at = self.started
        self.task = asyncio.current_task()
        self.interrupted = False
        self.closing = False

    def interrupt(self) -> None:
        """End this generation now (shutdown past its grace): its handler reports it."""
        if self.closing or self.interrupted:
            return
        self.interrupted = True
        if self.task is not None:
            self.task.cancel()

    def resume_after_interrupt(self, exc: asyncio.CancelledError) -> None:
        """Swallow our own interruption (re-raise any other cancellation)."""
        if not self.interrupted:
            raise exc
        uncancel = getattr(self.task, "uncancel", None)  # Python >= 3.11
        if uncancel is not None:
            uncancel()

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

    def ending_error(self) -> PensieveError | None:
        """Why a generation that ended "cancelled" did not finish: shutdown or a deletion."""
        if self.stream.finish_reason != "cancelled":
            return None
        if self.state.draining:
            return UnavailableError("server is shutting down", code="shutting_down")
        return ConflictError(
            "the generation was cancelled: its conversation was deleted", code="cancelled"
        )

    async def close(self) -> None:
        """Abort the generation if it is unfinished (else a no-op); shielded so that a second
        cancellation (server shutdown) cannot skip freeing its blocks."""
        await asyncio.shield(self.stream.aclose())


def session_header(stream: ChatStream) -> dict[str, str]:
    cid = stream.conversation_id
    return {SESSION_HEADER: cid} if cid is not None else {}


async def respond(
    request: web.Request, gen: Generation, fmt: Format, stream: bool, include_usage: bool
) -> web.StreamResponse:
    """Serve a started generation as the client asked; closes it whatever happens."""
    with gen.state.track(gen):
        try:
            try:
                first = await gen.first()
            except asyncio.CancelledError as exc:
                gen.resume_after_interrupt(exc)
                raise UnavailableError("server is shutting down", code="shutting_down") from None
            if stream:
                return await _stream(request, gen, fmt, first, include_usage)
            return await _whole(gen, fmt, first)
        finally:
            gen.closing = True
            await gen.close()


async def _whole(gen: Generation, fmt: Format, first: str) -> web.Response:
    parts, logprobs = [first], gen.stream.take_logprobs()
    try:
        async for delta in gen.rest():
            parts.append(delta)
    except asyncio.CancelledError as exc:
        gen.resume_after_interrupt(exc)
        raise UnavailableError("server is shutting down", code="shutting_down") from None
    error = gen.ending_error()
    if error is not None:
        raise error
    stream = gen.stream
    logprobs += stream.take_logprobs()
    body = fmt.whole("".join(parts), stream.finish_reason, stream.usage, logprobs)
    return json_response(body, headers=session_header(stream))


async def _stream(
    request: web.Request, gen: Generation, fmt: Format, first: str, include_usage: bool
) -> web.StreamResponse:
    stream = gen.stream
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    response.headers.update(session_header(stream))
    await response.prepare(request)

    async def send(payload: object) -> None:
        await response.write(b"data: " + _encode(payload) + b"\n\n")

    try:
        try:
            await send(fmt.delta(first, stream.take_logprobs(), True))
            async for delta in gen.rest():
                await send(fmt.delta(delta, stream.take_logprobs(), False))
            error = gen.ending_error()
            if error is not None:
                raise error
            await send(fmt.finish(stream.finish_reason, stream.take_logprobs()))
            if include_usage:
                await send(fmt.usage(stream.usage))
        except PensieveError as exc:  # headers are gone: report in-band, as OpenAI does
            log.warning("generation failed mid-stream: %s", exc.message)
            await send(exc.to_openai())
        except asyncio.CancelledError as exc:
            gen.resume_after_interrupt(exc)
            await gen.close()
            error = UnavailableError("server is shutting down", code="shutting_down")
            await send(error.to_openai())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionError:
        request[DISCONNECTED] = True
        log.info("client disconnected mid-stream; generation aborted")
    return response
