"""GET /openapi.json: an OpenAPI 3.1 description of every route.

Request and response schemas are generated from the same msgspec Structs that decode and
encode the bodies, so the document cannot drift from what the server does; schemathesis
fuzzes the live server against it in the test suite. Security (a bearer key) and the 401
answers appear only when the server has keys.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import msgspec
from aiohttp import web

from pensieve.server.completions import Completion, CompletionChunk, CompletionRequest
from pensieve.server.openai_schema import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ConversationId,
    DeletedConversation,
    ModelCard,
)
from pensieve.server.state import REQUEST_ID_HEADER, SESSION_HEADER, STATE
from pensieve.stats import ConversationInfo

REF = "#/components/schemas/{name}"


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    """Every error, OpenAI's shape."""

    error: ErrorDetail


class Health(msgspec.Struct, omit_defaults=True):
    status: Literal["ok", "loading", "draining"]
    model: str | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class ConversationList(msgspec.Struct):
    data: list[ConversationInfo]
    object: Literal["list"] = "list"


_SCHEMAS = [
    ChatCompletionRequest, ChatCompletion, ChatCompletionChunk,
    CompletionRequest, Completion, CompletionChunk,
    ModelList, ModelCard, ConversationList, ConversationInfo, DeletedConversation,
    ErrorResponse, Health,
]  # fmt: skip

_ERRORS = {
    400: "Invalid request: the error names the offending param",
    401: "Missing or wrong API key (code invalid_api_key)",
    404: "Unknown model or conversation (another key's conversations are absent too)",
    409: "The generation was cancelled: its conversation was deleted meanwhile",
    413: "Request body too large",
    503: "Model loading, shutting down, or the queue is full (see Retry-After)",
}
_ID_HEADER = {REQUEST_ID_HEADER: {"description": "the request's id", "schema": {"type": "string"}}}


def _ref(struct: type) -> dict[str, str]:
    return {"$ref": REF.format(name=struct.__name__)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": _ID_HEADER,
        "content": {"application/json": {"schema": schema}},
    }


def _op(
    summary: str,
    ok: dict[str, Any],
    errors: tuple[int, ...],
    keys: bool,
    *,
    body: type | None = None,
    params: list[dict[str, Any]] | None = None,
    open_route: bool = False,
    raw_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    responses = {"200": ok}
    for status in errors:
        if status != 401 or (keys and not open_route):
            responses[str(status)] = _json(_ref(ErrorResponse), _ERRORS[status])
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        content = {"application/json": {"schema": _ref(body)}}
        op["requestBody"] = {"required": True, "content": content}
    if raw_body is not None:
        op["requestBody"] = raw_body
    if params:
        op["parameters"] = params
    if open_route and keys:
        op["security"] = []
    return op


def _path_param(name: str, description: str) -> dict[str, Any]:
    schema = {"type": "string"}
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema}  # fmt: skip


def _generation(summary: str, request: type, whole: type, chunk: type, keys: bool) -> dict:
    session_schema = msgspec.json.schema(ConversationId)
    params = [
        {"name": SESSION_HEADER, "in": "header", "required": False, "schema": session_schema,
         "description": "the conversation to continue (or start) under this id"},
        {"name": REQUEST_ID_HEADER, "in": "header", "required": False,
         "schema": {"type": "string"}, "description": "echoed back; made up when absent"},
    ]  # fmt: skip
    ok = _json(_ref(whole), f"The whole answer, or with stream: SSE of {chunk.__name__} events")
    ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    errors = (400, 401, 404, 409, 413, 503)
    return {"post": _op(summary, ok, errors, keys, body=request, params=params)}


def _router_probes(keys: bool) -> dict[str, Any]:
    """The SGLang-style metadata and load routes request routers read (compat.py)."""
    obj = {"type": "object"}
    load = {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["num_tokens"],
            "properties": {"num_tokens": {"type": "integer"}, "num_reqs": {"type": "integer"}},
        },
    }
    info = _op("Server description for sglang-router", _json(obj, "Server info"), (401, 503), keys)
    model = _op("Model description for sglang-router", _json(obj, "Model info"), (401, 503), keys)
    return {
        "/server_info": {"get": info}, "/get_server_info": {"get": info},
        "/model_info": {"get": model}, "/get_model_info": {"get": model},
        "/get_load": {"get": _op("Load per rank (routers' power_of_two policy)",
                                 _json(load, "Load"), (401, 503), keys)},
    }  # fmt: skip


def _render_routes(keys: bool) -> dict[str, Any]:
    """vLLM's render routes, which vllm-router asks before routing (compat.py)."""
    ids = {"type": "array", "items": {"type": "integer"}}
    rendered = {"type": "object", "required": ["token_ids"], "properties": {"token_ids": ids}}
    errors = (400, 401, 404, 413, 503)
    chat = _json(rendered, "The prompt's token ids, chat template applied")
    text = _json({"type": "array", "items": rendered}, "The prompt's token ids")
    return {
        "/v1/chat/completions/render": {
            "post": _op("Render a chat prompt", chat, errors, keys, body=ChatCompletionRequest)
        },
        "/v1/completions/render": {
            "post": _op("Render a text prompt", text, errors, keys, body=CompletionRequest)
        },
    }


@functools.lru_cache(maxsize=4)
def openapi_document(keys: bool, metrics_auth: bool) -> bytes:
    """The document for a server with (or without) keys, encoded once."""
    _, schemas = msgspec.json.schema_components(_SCHEMAS, ref_template=REF)
    text = {"description": "Prometheus text format", "headers": _ID_HEADER,
            "content": {"text/plain": {"schema": {"type": "string"}}}}  # fmt: skip
    health = _op("Readiness", _json(_ref(Health), "Ready"), (), keys, open_route=True)
    health["responses"]["503"] = _json(_ref(Health), "Loading the model, or shutting down")
    model = _path_param("model", "the served model's name or one of its aliases")
    cid = _path_param("cid", "a conversation id of the caller's tenant")
    state_file = {
        "description": "safetensors file",
        "headers": _ID_HEADER,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
    state_body = {"required": True, "content": state_file["content"]}  # fmt: skip
    paths = {
        "/health": {"get": health},
        "/metrics": {"get": _op("Prometheus metrics", text, (), keys, open_route=not metrics_auth)},
        "/openapi.json": {
            "get": _op(
                "This document", _json({"type": "object"}, "OpenAPI 3.1"), (), keys, open_route=True
            )
        },  # fmt: skip
        "/v1/models": {
            "get": _op("The served model", _json(_ref(ModelList), "Models"), (401, 503), keys)
        },  # fmt: skip
        "/v1/models/{model}": {
            "get": _op(
                "One model by name or alias",
                _json(_ref(ModelCard), "Model"),
                (401, 404, 503),
                keys,
                params=[model],
            )
        },  # fmt: skip
        "/v1/chat/completions": _generation(
            "Chat completion", ChatCompletionRequest, ChatCompletion, ChatCompletionChunk, keys
        ),
        "/v1/completions": _generation(
            "Legacy text completion", CompletionRequest, Completion, CompletionChunk, keys
        ),
        "/v1/conversations": {
            "get": _op(
                "The caller's cached conversations",
                _json(_ref(ConversationList), "Conversations"),
                (401, 503),
                keys,
            )
        },  # fmt: skip
        "/v1/conversations/{cid}": {
            "get": _op(
                "One conversation's cache",
                _json(_ref(ConversationInfo), "Conversation"),
                (401, 404, 503),
                keys,
                params=[cid],
            ),
            "delete": _op(
                "Forget a conversation",
                _json(_ref(DeletedConversation), "Deleted"),
                (401, 404, 503),
                keys,
                params=[cid],
            ),
        },  # fmt: skip
        "/v1/conversations/{cid}/state": {
            "get": _op(
                "Export a conversation (token ids, metadata, KV chunks)",
                state_file,
                (401, 404, 503),
                keys,
                params=[cid],
            ),
            "put": _op(
                "Import an exported conversation under this id",
                _json(_ref(ConversationInfo), "Imported"),
                (400, 401, 409, 413, 503),
                keys,
                params=[cid],
                raw_body=state_body,
            ),
        },  # fmt: skip
        **_router_probes(keys),
        **_render_routes(keys),
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Pensieve",
            "version": "1",
            "description": "OpenAI-compatible stateful LLM serving: conversations keep their "
            "KV cache between turns.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if keys:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return msgspec.json.encode(doc)


async def openapi(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = openapi_document(state.keys.enabled, state.options.metrics_auth)
    return web.Response(body=body, content_type="application/json")
