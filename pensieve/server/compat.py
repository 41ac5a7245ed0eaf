"""Routes that request routers probe on their workers, so that `pensieve serve` can sit behind
`sglang-router` and `vllm-router` unmodified (docs/scale-out.md).

Both routers were written for SGLang and vLLM workers. What they ask a worker for, besides
/health and the OpenAI routes:

- sglang-router, when it registers a worker, reads GET /server_info and GET /model_info (then
  the older /get_server_info and /get_model_info). A 404 is tolerated, but the worker is then
  registered under the model "unknown"; with `served_model_name` it is registered under ours.
  We leave `model_path` and `tokenizer_path` out on purpose: given either, the router tries to
  load that tokenizer (from the Hugging Face hub for a bare name), which it does not need.
- Both routers' `power_of_two` policy polls GET /get_load every few seconds: a list with one
  entry per data-parallel rank, of which they sum `num_tokens`.
- vllm-router's cache_aware and kv_aware policies render each request on a worker first
  (POST /v1/chat/completions/render, /v1/completions/render, as vLLM answers them) and match on
  the token ids: with kv_aware, against the blocks the workers announce (pensieve/kv_events.py).
  The ids are exactly those the engine will cache for the prompt.
- Both routers parse each generation request into their own request type and forward it
  re-serialized, with SGLang/vLLM fields added at their neutral values (`skip_special_tokens:
  true`, `no_stop_trim: false`, ...). Pensieve refuses fields it does not know, so a middleware
  drops exactly these fields when they hold the neutral value (which is what Pensieve does
  anyway); any other value is left for the schema to refuse by name.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import msgspec
from aiohttp import web

from pensieve.server.completions import CompletionRequest
from pensieve.server.openai_schema import decode_chat_request, decode_request, new_completion_id
from pensieve.server.state import STATE, Handler, json_response

# The fields sglang-router (0.3) and vllm-router (0.1) add to every chat or text completion, with
# the values they add: each is what Pensieve does without being asked.
ROUTER_NEUTRAL_FIELDS: dict[str, bool] = {
    "no_stop_trim": False,
    "continue_final_message": False,
    "skip_special_tokens": True,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "return_hidden_states": False,
    "include_reasoning": True,
    "echo": False,
}
_GENERATION_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/chat/completions/render",
        "/v1/completions/render",
    }
)
_FIELD_MARKS = tuple(f'"{name}"'.encode() for name in ROUTER_NEUTRAL_FIELDS)


def strip_router_fields(body: bytes) -> bytes:
    """body without the routers' neutral fields (the same object if it has none)."""
    if not any(mark in body for mark in _FIELD_MARKS):
        return body
    try:
        request = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body  # the handler reports the bad JSON
    if not isinstance(request, dict):
        return body
    neutral = [
        name
        for name, value in ROUTER_NEUTRAL_FIELDS.items()
        if name in request and request[name] is value
    ]
    if not neutral:
        return body
    for name in neutral:
        del request[name]
    return msgspec.json.encode(request)


@web.middleware
async def router_fields_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Drop the routers' neutral fields from generation requests before the handler reads them."""
    if request.method == "POST" and request.path in _GENERATION_PATHS:
        body = await request.read()
        stripped = strip_router_fields(body)
        if stripped is not body:
            # read() returns this cached copy from now on: aiohttp has no public way to give a
            # handler another body (tests/test_cluster.py checks that this still works).
            request._read_bytes = stripped
    return await handler(request)


def _version() -> str:
    try:
        return metadata.version("pensieve")
    except metadata.PackageNotFoundError:
        return "unknown"


async def server_info(request: web.Request) -> web.Response:
    """SGLang's server description, reduced to the fields sglang-router reads."""
    state = request.app[STATE]
    engine = state.ready_engine()
    stats = await engine.stats()
    body: dict[str, Any] = {
        "served_model_name": state.model_names(engine)[0],  # as /v1/models
        "version": f"pensieve {_version()}",
        "context_length": engine.max_context,
        "max_total_tokens": stats.device_blocks_total * stats.block_size,
        "host_total_tokens": stats.host_blocks_total * stats.block_size,
        "page_size": stats.block_size,
        "dp_size": 1,
    }
    return json_response(body)


async def model_info(request: web.Request) -> web.Response:
    """SGLang's model description; the router keeps model_type and architectures as labels."""
    engine = request.app[STATE].ready_engine()
    body: dict[str, Any] = {
        "is_generation": True,
        "model_type": "llama",  # the only family Pensieve runs
        "architectures": [engine.loaded.model.config.architecture],
    }
    return json_response(body)


async def get_load(request: web.Request) -> web.Response:
    """SGLang's per-rank load. `num_tokens` is the device tier in use, which in Pensieve also
    holds idle conversations kept for their next turn; the request counts are exact."""
    engine = request.app[STATE].ready_engine()
    stats = await engine.stats()
    load = {
        "dp_rank": 0,
        "num_reqs": stats.requests_running + stats.requests_waiting,
        "num_waiting_reqs": stats.requests_waiting,
        "num_tokens": stats.device_blocks_used * stats.block_size,
    }
    return json_response([load])


async def render_chat(request: web.Request) -> web.Response:
    """vLLM's chat render: the prompt's token ids (chat template applied) without generating."""
    state = request.app[STATE]
    engine = state.ready_engine()
    req = decode_chat_request(await request.read())
    model = state.check_model(req.model, engine)
    tokens = engine.tokenizer.encode_chat(req.engine_messages())
    return json_response({"request_id": new_completion_id(), "token_ids": tokens, "model": model})


async def render_completion(request: web.Request) -> web.Response:
    """vLLM's completion render: a list with the raw prompt's token ids."""
    state = request.app[STATE]
    engine = state.ready_engine()
    req = decode_request(await request.read(), CompletionRequest)
    model = state.check_model(req.model, engine)
    tokens = engine.tokenizer.encode(req.text, add_special_tokens=True)
    rid = new_completion_id("cmpl")
    return json_response([{"request_id": rid, "token_ids": tokens, "model": model}])


def add_router_compat(app: web.Application) -> None:
    """Register the routes and the middleware above on a Pensieve app (called by create_app)."""
    app.middlewares.append(router_fields_middleware)
    for path in ("/server_info", "/get_server_info"):
        app.router.add_get(path, server_info)
    for path in ("/model_info", "/get_model_info"):
        app.router.add_get(path, model_info)
    app.router.add_get("/get_load", get_load)
    app.router.add_post("/v1/chat/completions/render", render_chat)
    app.router.add_post("/v1/completions/render", render_completion)
