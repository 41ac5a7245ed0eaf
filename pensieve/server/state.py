"""What the route handlers share: the engine, readiness, draining and the in-flight count."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from pensieve.errors import NotFoundError, PensieveError
from pensieve.server.metrics import ServerMetrics
from pensieve.server.openai_schema import now

if TYPE_CHECKING:
    from pensieve.engine import Engine

SESSION_HEADER = "X-Session-ID"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DISCONNECTED = "pensieve_client_disconnected"  # request key: the client left mid-stream


class UnavailableError(PensieveError):
    """The server cannot take requests right now (model loading or shutting down)."""

    status = 503
    type = "unavailable_error"
    retry_after_s = 1.0


class ServerState:
    """Shared by all handlers of one app. `engine` is None until the model has loaded."""

    def __init__(self, engine: Engine | None, max_body_bytes: int):
        self.engine = engine
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.started = now()
        self.metrics = ServerMetrics()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def ready_engine(self) -> Engine:
        if self.draining:
            raise UnavailableError("server is shutting down", code="shutting_down")
        if self.engine is None:
            raise UnavailableError("model is still loading", code="model_loading")
        return self.engine

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a generation in flight so that draining can wait for it."""
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def drain(self, grace_s: float) -> bool:
        """Stop admitting and wait up to grace_s for in-flight generations; True if all ended."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except asyncio.TimeoutError:
            return False
        return True


STATE = web.AppKey("pensieve_state", ServerState)


def json_response(
    obj: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    body = msgspec.json.encode(obj)
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def check_model(model: str | None, engine: Engine) -> None:
    """A request may omit the model or name the served one; anything else is a 404."""
    if model is not None and model != engine.model_name:
        raise NotFoundError(
            f"The model {model!r} does not exist; this server serves {engine.model_name!r}",
            param="model",
            code="model_not_found",
        )
