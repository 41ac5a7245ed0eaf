"""`pensieve serve` as a real process, configured by flags, environment and a --config file:
SIGTERM while streams run. Streams that finish within the grace period finish; the rest end
with a final error chunk and [DONE] when it is over; the process exits 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from tiny_server import read_events

pytestmark = pytest.mark.slow

READY = re.compile(r"ready: serving (\S+) on (http://127\.0\.0\.1:\d+)")
GRACE_S = 5.0


async def stream(http: aiohttp.ClientSession, url: str, key: str, tokens: int) -> list[object]:
    """One streamed chat completion's events, up to the end of its body."""
    body = {
        "messages": [{"role": "user", "content": "Count from one to one hundred."}],
        "temperature": 0,
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        return await read_events(resp)


async def test_sigterm_ends_every_stream_within_the_grace_period(
    default_model_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"model: {default_model_dir}\ndtype: float32\ndevice: cpu\nprofile_cost: false\n"
        f"grace_period: {GRACE_S}\nserved_model_name: [chat-model, other]\nport: 0\n"
        "device_cache_tokens: 4096\nhost_cache_tokens: 4096\n"
    )
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "PENSIEVE_API_KEY": "env-key-1, env-key-2", "PENSIEVE_MAX_RUNNING": "8"}
    args = [sys.executable, "-m", "pensieve.cli", "serve", "--config", str(config)]
    with log_path.open("w") as out:
        proc = subprocess.Popen(
            [*args, "--api-key", "flag-key"], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 120
        while not (ready := READY.search(log_path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.05)
        assert ready.group(1) == "chat-model"  # the config file's first served name
        url = ready.group(2)
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/v1/models") as resp:
                assert resp.status == 401  # keys came from the flag and the environment
            tasks = [
                asyncio.ensure_future(stream(http, url, key, tokens))
                for key, tokens in [("flag-key", 8), ("env-key-2", 8), ("env-key-1", 4000)] * 2
            ]
            await asyncio.sleep(1.0)
            while True:  # every stream has started generating
                async with http.get(url + "/metrics") as resp:
                    text = await resp.text()
                running = re.search(r"^pensieve_requests_running (\S+)$", text, re.MULTILINE)
                if float(running.group(1)) >= 2 or all(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*tasks), GRACE_S + 30)
            ended = time.monotonic() - signalled
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    short, long = results[0::3] + results[1::3], results[2::3]
    for events in short:
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    for events in long:
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "shutting_down"
        assert len(events) < 1000  # interrupted, not run to the end
    assert ended < GRACE_S + 10, f"streams took {ended:.1f}s to end after SIGTERM"
    assert "shutting down" in log and "grace period over" in log and "Traceback" not in log
    for key in ("flag-key", "env-key-1", "env-key-2"):
        assert key not in log
