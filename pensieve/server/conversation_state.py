"""Export and import of one conversation: GET / PUT /v1/conversations/{cid}/state.

The body is the engine's self-describing safetensors file (token ids, metadata, KV chunks),
bound to a model fingerprint: a server with another model, dtype, block size or KV layout
answers 409. This is how a conversation moves between replicas (docs/scale-out.md).
"""

from __future__ import annotations

from aiohttp import web

from pensieve.errors import PensieveError
from pensieve.server.state import STATE, TENANT, json_response

MAX_STATE_BYTES = 4 * 1024**3  # a long conversation's KV is large; the JSON body limit is not


class StateTooLarge(PensieveError):
    status = 413
    type = "invalid_request_error"


async def export_state(request: web.Request) -> web.Response:
    engine = request.app[STATE].ready_engine()
    cid = request.match_info["cid"]
    data = await engine.export_conversation(cid, request.get(TENANT, ""))
    headers = {"Content-Disposition": f'attachment; filename="{cid}.safetensors"'}
    return web.Response(body=data, content_type="application/octet-stream", headers=headers)


async def import_state(request: web.Request) -> web.Response:
    engine = request.app[STATE].ready_engine()
    parts, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 20):
        size += len(chunk)
        if size > MAX_STATE_BYTES:
            raise StateTooLarge(f"a conversation state is at most {MAX_STATE_BYTES} bytes")
        parts.append(chunk)
    cid = request.match_info["cid"]
    info = await engine.import_conversation(b"".join(parts), cid, request.get(TENANT, ""))
    return json_response(info)


def add_state_routes(app: web.Application) -> None:
    app.router.add_get("/v1/conversations/{cid}/state", export_state)
    app.router.add_put("/v1/conversations/{cid}/state", import_state)
