"""The aiohttp application: routes, middlewares, error mapping, readiness and draining.

Every failure leaves as an OpenAI error body ({"error": {message, type, param, code}}) with
its HTTP status, including aiohttp's own 404/405/413, so clients see one error shape and the
server keeps serving. The app can exist before its engine does: /health answers 503 until the
engine is attached (model loading) and again once draining starts (shutdown).

Middlewares, outermost first: the request id (echoed in X-Request-Id on every response and
logged), CORS preflights, error mapping with per-route counting, then the API key check, which
also sets the caller's tenant.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import uuid
from typing import TYPE_CHECKING

from aiohttp import web

from pensieve.errors import EngineError, PensieveError
from pensieve.server.chat import chat_completions
from pensieve.server.compat import add_router_compat
from pensieve.server.completions import completions
from pensieve.server.conversation_state import add_state_routes
from pensieve.server.cors import add_cors_headers, cors_middleware
from pensieve.server.openai_schema import DeletedConversation, ListResponse, ModelCard
from pensieve.server.openapi import openapi
from pensieve.server.state import (
    DISCONNECTED,
    REQUEST_ID,
    REQUEST_ID_HEADER,
    STATE,
    TENANT,
    Handler,
    ServerOptions,
    ServerState,
    json_response,
)

if TYPE_CHECKING:
    from pensieve.engine import Engine

log = logging.getLogger("pensieve.server")

# A client's request id is echoed only if it is safe to put in a log line and a header.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
# aiohttp's access log line, with the request id (never any header that could hold a key).
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs rid=%{X-Request-Id}o'


def error_response(exc: PensieveError) -> web.Response:
    headers = dict(getattr(exc, "headers", None) or {})
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
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Take the client's X-Request-Id (if safe) or make one; responses echo it when prepared."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request[REQUEST_ID] = given if _CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    return await handler(request)


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid
    await add_cors_headers(request, response)


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
        log.exception(
            "internal error serving %s %s (request %s)",
            request.method,
            request.path,
            request.get(REQUEST_ID),
        )
        return error_response(EngineError("internal server error"))
    finally:
        state.metrics.observe_request(route, status)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With keys configured, protected routes need one; its tenant scopes the request."""
    state = request.app[STATE]
    if state.keys.protects(request.path, state.options.metrics_auth):
        request[TENANT] = state.keys.tenant_for(request.headers.get("Authorization"))
    return await handler(request)


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining or state.engine is None:
        return json_response({"status": "draining" if state.draining else "loading"}, 503)
    return json_response({"status": "ok", "model": state.model_names(state.engine)[0]})


def _model_card(state: ServerState, engine: Engine, name: str) -> ModelCard:
    return ModelCard(id=name, created=state.started, max_model_len=engine.max_context)


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = state.ready_engine()
    card = _model_card(state, engine, state.model_names(engine)[0])
    return json_response(ListResponse(data=[card]))


async def get_model(request: web.Request) -> web.Response:
    """Any alias answers, under the name it was asked by."""
    state = request.app[STATE]
    engine = state.ready_engine()
    name = request.match_info["model"]
    state.check_model(name, engine)
    return json_response(_model_card(state, engine, name))


async def list_conversations(request: web.Request) -> web.Response:
    engine = request.app[STATE].ready_engine()
    return json_response(ListResponse(data=await engine.conversations(request.get(TENANT, ""))))


async def get_conversation(request: web.Request) -> web.Response:
    engine = request.app[STATE].ready_engine()
    cid, tenant = request.match_info["cid"], request.get(TENANT, "")
    return json_response(await engine.conversation(cid, tenant))


async def delete_conversation(request: web.Request) -> web.Response:
    engine = request.app[STATE].ready_engine()
    cid = request.match_info["cid"]
    await engine.delete_conversation(cid, request.get(TENANT, ""))
    return json_response(DeletedConversation(id=cid))


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    stats = await state.engine.stats() if state.engine is not None else None
    return web.Response(
        body=state.metrics.render(stats), headers={"Content-Type": state.metrics.content_type}
    )


def create_app(
    engine: Engine | None = None,
    options: ServerOptions | None = None,
    *,
    max_body_bytes: int | None = None,
) -> web.Application:
    """Build the app; with engine None, /health answers 503 until app[STATE].engine is set."""
    options = options or ServerOptions()
    if max_body_bytes is not None:
        options = dataclasses.replace(options, max_body_bytes=max_body_bytes)
    app = web.Application(
        middlewares=[request_id_middleware, cors_middleware, error_middleware, auth_middleware],
        client_max_size=options.max_body_bytes,
    )
    app[STATE] = ServerState(engine, options)
    app.on_response_prepare.append(_on_prepare)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/conversations", list_conversations)
    app.router.add_get("/v1/conversations/{cid}", get_conversation)
    app.router.add_delete("/v1/conversations/{cid}", delete_conversation)
    add_state_routes(app)
    add_router_compat(app)
    return app


async def start_server(
    app: web.Application, host: str = "127.0.0.1", port: int = 0, *, shutdown_timeout: float = 5.0
) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0 = any free port); return the runner and the bound port.

    handler_cancellation makes aiohttp cancel a handler whose client disconnected, which is
    how an abandoned generation gets aborted even between streamed writes.
    """
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
        access_log_format=ACCESS_LOG_FORMAT,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]
