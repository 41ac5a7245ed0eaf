"""What the route handlers share: the engine, the server's options, readiness, draining and the
generations in flight (so that shutdown can end each one cleanly)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from aiohttp import web

from pensieve.errors import NotFoundError, PensieveError
from pensieve.server.auth import ApiKeys
from pensieve.server.metrics import ServerMetrics
from pensieve.server.openai_schema import now

if TYPE_CHECKING:
    from pensieve.engine import Engine


def _request_key(name: str, kind: type) -> Any:
    """A typed request key where aiohttp has them (3.14+), else the plain name."""
    make = getattr(web, "RequestKey", None)
    return make(name, kind) if make is not None else name


SESSION_HEADER = "X-Session-ID"
REQUEST_ID_HEADER = "X-Request-Id"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
REQUEST_ID = _request_key("pensieve_request_id", str)  # echoed in X-Request-Id and logged
TENANT = _request_key("pensieve_tenant", str)  # the caller's tenant ("" without keys)
DISCONNECTED = _request_key("pensieve_client_disconnected", bool)  # the client left mid-stream
# How long interrupted generations get to send their final error chunk once the grace is over.
INTERRUPT_WAIT_S = 5.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class UnavailableError(PensieveError):
    """The server cannot take requests right now (model loading or shutting down)."""

    status = 503
    type = "unavailable_error"
    retry_after_s = 1.0


@dataclass(frozen=True)
class ServerOptions:
    """What `pensieve serve` configures beyond the engine. Keys are kept out of the repr so that
    logging the options can never print them."""

    api_keys: tuple[str, ...] = field(default=(), repr=False)
    metrics_auth: bool = False  # /metrics needs a key too
    served_model_names: tuple[str, ...] = ()  # aliases; the first is what /v1/models shows
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: off, "*": any origin
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class Interruptible(Protocol):
    def interrupt(self) -> None: ...


class ServerState:
    """Shared by all handlers of one app. `engine` is None until the model has loaded."""

    def __init__(self, engine: Engine | None, options: ServerOptions):
        self.engine = engine
        self.options = options
        self.keys = ApiKeys(options.api_keys)
        self.draining = False
        self.started = now()
        self.metrics = ServerMetrics()
        self._generations: set[Interruptible] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def max_body_bytes(self) -> int:
        return self.options.max_body_bytes

    def ready_engine(self) -> Engine:
        if self.draining:
            raise UnavailableError("server is shutting down", code="shutting_down")
        if self.engine is None:
            raise UnavailableError("model is still loading", code="model_loading")
        return self.engine

    def model_names(self, engine: Engine) -> list[str]:
        """The names requests may use; the first is the one the server reports."""
        return list(self.options.served_model_names) or [engine.model_name]

    def check_model(self, model: str | None, engine: Engine) -> str:
        """The name to report; a request may omit the model or name any alias, else 404."""
        names = self.model_names(engine)
        if model is not None and model not in names:
            raise NotFoundError(
                f"The model {model!r} does not exist; this server serves {names[0]!r}",
                param="model",
                code="model_not_found",
            )
        return names[0]

    @contextlib.contextmanager
    def track(self, generation: Interruptible) -> Iterator[None]:
        """Count a generation in flight so that draining can wait for (or interrupt) it."""
        self._generations.add(generation)
        self._idle.clear()
        try:
            yield
        finally:
            self._generations.discard(generation)
            if not self._generations:
                self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._generations)

    async def drain(self, grace_s: float) -> bool:
        """Stop admitting and wait up to grace_s for in-flight generations; True if all ended.

        Past the grace, each one still running is interrupted: its stream ends with an error
        chunk (a non-streamed request gets 503) and its blocks are freed.
        """
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
            return True
        except asyncio.TimeoutError:
            pass
        await self.interrupt()
        return False

    async def interrupt(self) -> None:
        """End every generation still running, and wait (briefly) for their final chunks."""
        for generation in list(self._generations):
            generation.interrupt()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), INTERRUPT_WAIT_S)


STATE = web.AppKey("pensieve_state", ServerState)


def json_response(
    obj: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    body = msgspec.json.encode(obj)
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)
