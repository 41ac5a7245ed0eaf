"""`pensieve serve` as a real process: readiness, overload with a bounded queue, and graceful
shutdown on SIGTERM. One server (one running slot, a queue of one) serves the module; the
last test stops it.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

pytestmark = pytest.mark.slow

LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
# `pensieve serve`: the console script's entry point, run by this interpreter (not a PATH lookup)
SERVE = [sys.executable, "-m", "pensieve.cli", "serve"]


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    log: Path

    def chat_url(self) -> str:
        return self.url + "/v1/chat/completions"


@pytest.fixture(scope="module")
def served(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = [
        *SERVE,
        *("--model", str(default_model_dir), "--dtype", "float32", "--device", "cpu"),
        *("--port", "0", "--max-running", "1", "--max-queue", "1", "--no-profile-cost"),
        *("--device-cache-tokens", "1024", "--host-cache-tokens", "1024", "--grace-period", "60"),
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (found := LISTENING.search(log.read_text())):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not start listening"
            time.sleep(0.05)
        yield Served(proc, f"http://127.0.0.1:{found.group(1)}", log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stream_body(max_tokens: int) -> dict[str, object]:
    return {
        "messages": [{"role": "user", "content": "Count from one to one hundred."}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }


async def gauge(http: aiohttp.ClientSession, served: Served, name: str) -> float:
    async with http.get(served.url + "/metrics") as resp:
        text = await resp.text()
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


async def test_health_is_503_while_loading_then_200(served: Served) -> None:
    statuses = []
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 120
        while not statuses or statuses[-1] != 200:
            assert time.monotonic() < deadline and served.proc.poll() is None, (
                served.log.read_text()
            )
            async with http.get(served.url + "/health") as resp:
                statuses.append(resp.status)
                if resp.status == 503:
                    assert (await resp.json())["status"] == "loading"
            await asyncio.sleep(0.05)
    assert statuses[0] == 503 and set(statuses) == {503, 200}


async def test_full_queue_answers_503_with_retry_after(served: Served) -> None:
    async with aiohttp.ClientSession() as http:
        running = await http.post(served.chat_url(), json=stream_body(500))
        assert running.status == 200 and (await running.content.readline()).startswith(b"data:")
        waiting = asyncio.ensure_future(http.post(served.chat_url(), json=stream_body(4)))
        deadline = time.monotonic() + 10
        while await gauge(http, served, "pensieve_requests_waiting") < 1:
            assert time.monotonic() < deadline, "second request never queued"
            await asyncio.sleep(0.05)
        async with http.post(served.chat_url(), json=stream_body(4)) as refused:
            assert refused.status == 503
            assert int(refused.headers["Retry-After"]) >= 1
            error = (await refused.json())["error"]
        assert error["type"] == "overloaded_error" and error["code"] == "overloaded"
        running.close()  # frees the running slot: the queued request runs to completion
        queued = await waiting
        assert queued.status == 200
        assert (await queued.read()).rstrip().endswith(b"data: [DONE]")
        async with http.get(served.url + "/health") as resp:
            assert resp.status == 200


async def test_sigterm_finishes_streams_refuses_new_requests_and_exits_zero(
    served: Served,
) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(served.chat_url(), json=stream_body(48))
        assert resp.status == 200 and (await resp.content.readline()).startswith(b"data:")
        served.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        async with http.post(served.chat_url(), json=stream_body(4)) as refused:
            assert refused.status == 503
            assert (await refused.json())["error"]["code"] == "shutting_down"
        async with http.get(served.url + "/health") as health:
            assert health.status == 503 and (await health.json())["status"] == "draining"
        events = [line for line in (await resp.read()).decode().splitlines() if line]
    assert events[-1] == "data: [DONE]"
    final = json.loads(events[-2].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] == "length"
    assert served.proc.wait(timeout=60) == 0
    log = served.log.read_text()
    assert "shutting down" in log and "stopped" in log and "Traceback" not in log
