"""The worker side of router compatibility (pensieve/server/compat.py), in process on the tiny
random model: the metadata and load routes the routers probe, and generation requests carrying
the fields the routers add."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from pensieve.config import EngineConfig
from pensieve.engine import Engine
from pensieve.policy import CostModel
from pensieve.runtime import LoadedModel
from pensieve.server import create_app, start_server
from pensieve.server.compat import ROUTER_NEUTRAL_FIELDS, strip_router_fields
from pensieve.server.state import ServerOptions

# What sglang-router 0.3.2 forwards for a plain chat request (captured from the router).
SGLANG_CHAT = {
    "messages": [{"role": "user", "content": "Hi"}],
    "model": "unknown",
    "logprobs": False,
    "max_completion_tokens": 4,
    "stream": False,
    "no_stop_trim": False,
    "ignore_eos": False,
    "continue_final_message": False,
    "skip_special_tokens": True,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "return_hidden_states": False,
}
# vllm-router 0.1.17 adds one more, and forwards a missing model as missing.
VLLM_CHAT = {k: v for k, v in SGLANG_CHAT.items() if k != "model"} | {"include_reasoning": True}
# Both routers' text completions.
ROUTER_COMPLETION = {
    "model": "tiny-random",
    "prompt": "Hi",
    "max_tokens": 4,
    "stream": False,
    "echo": False,
    "no_stop_trim": False,
    "ignore_eos": False,
    "skip_special_tokens": True,
    "return_hidden_states": False,
}


def test_strip_router_fields_drops_only_neutral_values() -> None:
    body = json.dumps(VLLM_CHAT).encode()
    stripped = json.loads(strip_router_fields(body))
    assert stripped == {k: v for k, v in VLLM_CHAT.items() if k not in ROUTER_NEUTRAL_FIELDS}
    odd = json.dumps({**VLLM_CHAT, "skip_special_tokens": False}).encode()
    assert json.loads(strip_router_fields(odd))["skip_special_tokens"] is False
    plain = b'{"messages": [], "echo": 0}'
    assert strip_router_fields(plain) == plain
    for untouched in (b'{"model": "x"}', b'["no_stop_trim"]', b'{"no_stop_trim": fals'):
        assert strip_router_fields(untouched) is untouched


@pytest_asyncio.fixture
async def worker(tiny: LoadedModel) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    config = EngineConfig(device_cache_tokens=1024, host_cache_tokens=1024, profile_cost=False)
    engine = await Engine(config, loaded=tiny, cost_model=CostModel.linear()).start()
    options = ServerOptions(served_model_names=("tiny-random", "unknown"))
    runner, port = await start_server(create_app(engine, options), shutdown_timeout=0.5)
    try:
        async with aiohttp.ClientSession() as http:
            yield f"http://127.0.0.1:{port}", http
    finally:
        await runner.cleanup()
        await engine.stop()


async def get_json(http: aiohttp.ClientSession, url: str) -> object:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


@pytest.mark.slow
async def test_metadata_and_load_routes(worker: tuple[str, aiohttp.ClientSession]) -> None:
    url, http = worker
    for path in ("/server_info", "/get_server_info"):
        info = await get_json(http, url + path)
        assert info["served_model_name"] == "tiny-random"  # the first alias, as /v1/models
        assert "model_path" not in info and "tokenizer_path" not in info
        assert info["max_total_tokens"] == 1024 and info["context_length"] > 0
    for path in ("/model_info", "/get_model_info"):
        model = await get_json(http, url + path)
        assert model == {
            "is_generation": True,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
        }
    load = await get_json(http, url + "/get_load")
    assert load == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", SGLANG_CHAT),
        ("/v1/chat/completions", VLLM_CHAT),
        ("/v1/chat/completions", {**SGLANG_CHAT, "stream": True}),
        ("/v1/completions", ROUTER_COMPLETION),
    ],
)
async def test_generation_with_router_fields(
    worker: tuple[str, aiohttp.ClientSession], path: str, body: dict
) -> None:
    url, http = worker
    async with http.post(url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
    refused = {**body, "skip_special_tokens": False}
    async with http.post(url + path, json=refused) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "skip_special_tokens"
