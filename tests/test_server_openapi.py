"""/openapi.json describes every route, and schemathesis fuzzes the live server against it
(tiny model, a key, bounded examples): no 5xx, every response conforms, and the server still
serves afterwards with exact block accounting."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from tiny_server import chat, serve_tiny

from pensieve.runtime import LoadedModel
from pensieve.server import create_app
from pensieve.server.state import ServerOptions

KEY = "fuzz-key-0123"
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "ignored_auth",
    ]
)
EXAMPLES = 25  # per operation and phase: a couple of minutes at most on two cores


def routes_of_app() -> set[tuple[str, str]]:
    app = create_app()
    return {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


@pytest.mark.parametrize("keys", [(), (KEY,)])
async def test_document_names_every_route(tiny: LoadedModel, keys: tuple[str, ...]) -> None:
    async with serve_tiny(tiny, ServerOptions(api_keys=keys)) as server:
        status, doc = await server.get("/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    documented = {(m, path) for path, ops in doc["paths"].items() for m in ops}
    assert documented == routes_of_app()
    schemas = doc["components"]["schemas"]
    assert {"ChatCompletionRequest", "CompletionRequest", "ErrorResponse"} <= set(schemas)
    assert schemas["ChatCompletionRequest"]["additionalProperties"] is False
    chat_op = doc["paths"]["/v1/chat/completions"]["post"]
    assert set(chat_op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert ("401" in chat_op["responses"]) == bool(keys)
    assert ("security" in doc) == bool(keys)


@pytest.mark.slow
async def test_schemathesis_finds_no_server_error_and_no_nonconforming_response(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    options = ServerOptions(api_keys=(KEY,), max_body_bytes=64 * 1024)
    async with serve_tiny(tiny, options, max_model_len=96, max_queue=64) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
            "--checks", CHECKS, "--header", f"Authorization: Bearer {KEY}",
            "--max-examples", str(EXAMPLES), "--seed", "7", "--workers", "2",
            "--phases", "examples,coverage,fuzzing", "--request-timeout", "60",
            "--suppress-health-check", "all", "--no-shrink",
            "--report", "junit", "--report-dir", str(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), 300)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        report = output.decode(errors="replace")
        assert proc.returncode == 0, report[-6000:]
        status, reply, _ = await server.post(
            "/v1/chat/completions", chat("still serving?", max_tokens=4), KEY
        )
        assert status == 200 and reply["choices"][0]["message"]["content"] is not None
        await server.engine.check_accounting()
