"""The aiohttp application: routes, error mapping, readiness and draining.

Every failure leaves as an OpenAI error body ({"error": {message, type, param, code}}) with
its HTTP status, including aiohttp's own 404/405/413, so clients see one error shape and the
server keeps serving. The app can exist before its engine does: /health answers 503 until the
engine is attached (model loading) and again once draining starts (shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from pensieve.errors import EngineError, PensieveError
from pensieve.server.chat import chat_completions
from pensieve.server.openai_schema import DeletedConversation, ListResponse, ModelCard
from pensieve.server.state import (
    DEFAULT_MAX_BODY_BYTES,
    DISCONNECTED,
    STATE,
    ServerState,
    check_model,
    json_response,
)

if TYPE_CHECKING:
    from pensieve.engine import Engine

log = logging.getLogger("pensieve.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: PensieveError) -> web.Response:
    headers = {}
    retry = getattr(exc, "retry_after_s", None)
    if retry is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry)))
    return json_response(exc.to_openai(), status=exc.status, headers=headers)


def _http_error(exc: web.HTTPException, request: web.Request) -> web.Response:
    """aiohttp's routing and body-size errors, re-dressed as OpenAI error bodies."""
    kind, code = "invalid_request_error", exc.reason.lower().replace(" ", "_")
    if exc.status == 404:
        kind, code = "not_found_error", "unknown_route"
        message = f"Unknown route: {request.method} {request.path}"
    elif exc.status == 405:
        message = f"Method {request.method} is not allowed for {request.path}"
    elif exc.status == 413:
        code = "request_too_large"
        limit = request.app[STATE].max_body_bytes
        message = f"Request body is larger than the server's limit of {limit} bytes"
    else:
        message = exc.text or exc.reason
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    return json_response(body, status=exc.status, headers=headers)


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every outcome to a response and count it; unexpected exceptions become 500 JSON."""
    state = request.app[STATE]
    route = _route_name(request)
    status = 500
    try:
        response = await handler(request)
        status = 499 if request.get(DISCONNECTED) else response.status
        return response
    except PensieveError as exc:
        status = exc.status
        return error_response(exc)
    except web.HTTPException as exc:
        status = exc.status
        if exc.status < 400:
            raise
        return _http_error(exc, request)
    except asyncio.CancelledError:
        status = 499  # the client went away and aiohttp cancelled the handler
        raise
    except Exception:
        log.exception("internal error serving %s %s", request.method, request.path)
        return error_response(EngineError("internal server error"))
    finally:
        state.metrics.observe_request(route, status)


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining or state.engine is None:
        return json_response({"status": "draining" if state.draining else "loading"}, 503)
    return json_response({"status": "ok", "model": state.engine.model_name})


def _model_card(state: ServerState, engine: Engine) -> ModelCard:
    return ModelCard(id=engine.model_name, created=state.started, max_model_len=engine.max_context)


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response(ListResponse(data=[_model_card(state, state.ready_engine())]))


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = state.ready_engine()
    check_model(request.match_info["model"], engine)
    return json_response(_model_card(state, engine))


async def list_conversations(request: web.Request) -> web.Response:
    engine = request.app[STATE].ready_engine()
    return json_response(ListResponse(data=await engine.conversations()))


async def get_conversation(request: web.Request) -> web.Response:
    engine = request.app[STATE].ready_engine()
    return json_response(await engine.conversation(request.match_info["cid"]))


async def delete_conversation(request: web.Request) -> web.Response:
    engine = request.app[STATE].ready_engine()
    cid = request.match_info["cid"]
    await engine.delete_conversation(cid)
    return json_response(DeletedConversation(id=cid))


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    stats = await state.engine.stats() if state.engine is not None else None
    return web.Response(
        body=state.metrics.render(stats), headers={"Content-Type": state.metrics.content_type}
    )


def create_app(
    engine: Engine | None = None, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> web.Application:
    """Build the app; with engine None, /health answers 503 until app[STATE].engine is set."""
    app = web.Application(middlewares=[error_middleware], client_max_size=max_body_bytes)
    app[STATE] = ServerState(engine, max_body_bytes)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/conversations", list_conversations)
    app.router.add_get("/v1/conversations/{cid}", get_conversation)
    app.router.add_delete("/v1/conversations/{cid}", delete_conversation)
    return app


async def start_server(
    app: web.Application, host: str = "127.0.0.1", port: int = 0, *, shutdown_timeout: float = 5.0
) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0 = any free port); return the runner and the bound port.

    handler_cancellation makes aiohttp cancel a handler whose client disconnected, which is
    how an abandoned generation gets aborted even between streamed writes.
    """
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]
