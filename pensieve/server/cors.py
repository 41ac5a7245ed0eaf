"""CORS for browser clients (`--allowed-origins`; off by default).

A preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered before routing
and before the key check, since browsers send no Authorization header on it. Actual responses,
streamed ones included, get their CORS headers as they are prepared (the headers of a stream
are sent before its handler returns, so a middleware would be too late).
"""

from __future__ import annotations

from aiohttp import hdrs, web

from pensieve.server.state import REQUEST_ID_HEADER, SESSION_HEADER, STATE, Handler

ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOWED_HEADERS = f"Authorization, Content-Type, {SESSION_HEADER}, {REQUEST_ID_HEADER}"
EXPOSED_HEADERS = f"{SESSION_HEADER}, {REQUEST_ID_HEADER}, Retry-After"
MAX_AGE_S = "600"


def allowed_origin(request: web.Request) -> str | None:
    """The Access-Control-Allow-Origin value for this request, or None (no CORS headers)."""
    origins = request.app[STATE].options.allowed_origins
    origin = request.headers.get(hdrs.ORIGIN)
    if not origins or origin is None:
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer preflights for allowed origins; everything else goes on."""
    preflight = (
        request.method == hdrs.METH_OPTIONS
        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    )
    origin = allowed_origin(request) if preflight else None
    if origin is None:
        return await handler(request)
    return web.Response(
        status=204,
        headers={
            hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOWED_METHODS,
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOWED_HEADERS,
            hdrs.ACCESS_CONTROL_MAX_AGE: MAX_AGE_S,
            hdrs.VARY: "Origin",
        },
    )


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the CORS headers of an actual (non-preflight) response."""
    origin = allowed_origin(request)
    if origin is None or hdrs.ACCESS_CONTROL_ALLOW_ORIGIN in response.headers:
        return
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
    response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS
    response.headers[hdrs.VARY] = "Origin"
