"""A real HTTP server on an Engine over the tiny random model, for server tests that need many
configurations (keys, aliases, CORS, a context cap) and fast generation."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from pensieve.config import EngineConfig
from pensieve.engine import Engine
from pensieve.policy import CostModel
from pensieve.runtime import LoadedModel
from pensieve.server import STATE, ServerState, create_app, start_server
from pensieve.server.state import ServerOptions


@dataclass
class TinyServer:
    engine: Engine
    state: ServerState
    url: str
    http: aiohttp.ClientSession

    async def post(
        self, path: str, body: object, key: str | None = None, **headers: str
    ) -> tuple[int, Any, dict[str, str]]:
        """POST JSON; (status, decoded body or SSE events, headers)."""
        async with self.http.post(self.url + path, json=body, headers=auth(key, **headers)) as r:
            raw = await r.read()
            if r.content_type == "text/event-stream":
                return r.status, sse_events(raw), dict(r.headers)
            return r.status, json.loads(raw), dict(r.headers)

    async def get(self, path: str, key: str | None = None) -> tuple[int, Any]:
        async with self.http.get(self.url + path, headers=auth(key)) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else None)

    async def delete(self, path: str, key: str | None = None) -> tuple[int, Any]:
        async with self.http.delete(self.url + path, headers=auth(key)) as r:
            return r.status, await r.json()


def auth(key: str | None, **headers: str) -> dict[str, str]:
    out = {name.replace("_", "-"): value for name, value in headers.items()}
    if key is not None:
        out["Authorization"] = f"Bearer {key}"
    return out


def sse_events(raw: bytes) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded, with "[DONE]" kept as a string."""
    events = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def read_events(resp: aiohttp.ClientResponse, limit: int | None = None) -> list[object]:
    """A streamed response's `data:` payloads as they arrive (up to `limit`), like sse_events."""
    events: list[object] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
            if limit is not None and len(events) >= limit:
                break
    return events


def chat(text: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **fields}


def tiny_engine(tiny: LoadedModel, **overrides: Any) -> Engine:
    config = EngineConfig(block_size=16, profile_cost=False, **overrides)
    return Engine(config, loaded=tiny, cost_model=CostModel.linear())


@asynccontextmanager
async def serve_tiny(
    tiny: LoadedModel,
    options: ServerOptions | None = None,
    connections: int = 100,
    **engine_overrides: Any,
) -> AsyncIterator[TinyServer]:
    """An engine on the tiny model behind a real server on a free loopback port."""
    engine = await tiny_engine(tiny, **engine_overrides).start()
    app = create_app(engine, options)
    runner, port = await start_server(app, shutdown_timeout=0.5)
    connector = aiohttp.TCPConnector(limit=connections)
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            yield TinyServer(engine, app[STATE], f"http://127.0.0.1:{port}", http)
    finally:
        await runner.cleanup()
        await engine.stop()


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)
