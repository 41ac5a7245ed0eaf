"""`pensieve serve --state-dir` as a real process on the default model: conversations survive
SIGKILL after their turns were committed, and SIGTERM; each next turn is served from the history
on disk and gives the greedy reply the model gives that history from scratch."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from pensieve.config import EngineConfig
from pensieve.reference import reference_generate
from pensieve.runtime import load_pretrained
from pensieve.sampling import SamplingParams

pytestmark = pytest.mark.slow
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
MAX_TOKENS = 12


@contextmanager
def serve(model: Path, state_dir: Path, log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    args = [
        *(sys.executable, "-m", "pensieve.cli", "serve", "--model", str(model)),
        *("--dtype", "float32", "--device", "cpu", "--port", "0", "--no-profile-cost"),
        *("--block-size", "16", "--state-dir", str(state_dir), "--grace-period", "30"),
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not (found := LISTENING.search(log.read_text())):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not start listening"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{found.group(1)}"
        while not ready(url):  # listening while the model loads: wait for /health
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


async def chat(http: aiohttp.ClientSession, url: str, cid: str, messages: list) -> dict:
    body = {"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}
    headers = {"X-Session-ID": cid}
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def committed(http: aiohttp.ClientSession, url: str) -> None:
    """Wait until every full chunk of every conversation has its file on disk."""
    deadline = time.monotonic() + 30
    while True:
        async with http.get(url + "/v1/conversations") as r:
            want = sum(c["tokens_total"] // 16 for c in (await r.json())["data"])
        async with http.get(url + "/metrics") as r:
            text = await r.text()
        used = re.search(r'^pensieve_cache_blocks_used\{tier="disk"\} (\S+)$', text, re.M)
        writes = re.search(r"^pensieve_disk_writes_total (\S+)$", text, re.M)
        if used and writes and float(writes.group(1)) >= want and float(used.group(1)) >= want:
            return
        assert time.monotonic() < deadline, "the turns were not committed"
        time.sleep(0.1)


async def test_conversations_survive_sigkill_and_sigterm(
    default_model_dir: Path, tmp_path: Path
) -> None:
    loaded = load_pretrained(EngineConfig(model=str(default_model_dir), dtype="float32"))
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    questions = ["What is the capital of France?", "Name three colours of the rainbow."]
    histories = {f"p{i}": [{"role": "user", "content": q}] for i, q in enumerate(questions)}

    async def next_turns(http: aiohttp.ClientSession, url: str, restarted: bool) -> None:
        for cid, messages in histories.items():
            reply = await chat(http, url, cid, messages)
            text = reply["choices"][0]["message"]["content"]
            ids = loaded.tokenizer.encode_chat(messages)
            eos = loaded.tokenizer.eos_token_ids
            expected = reference_generate(loaded.model, ids, greedy, eos)
            assert text == loaded.tokenizer.decode(expected)
            if restarted:
                assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
            messages += [{"role": "assistant", "content": text}]
            messages += [{"role": "user", "content": "Say it again, shorter."}]

    state = tmp_path / "state"
    async with aiohttp.ClientSession() as http:
        with serve(default_model_dir, state, tmp_path / "a.log") as (proc, url):
            await next_turns(http, url, restarted=False)
            await committed(http, url)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        with serve(default_model_dir, state, tmp_path / "b.log") as (proc, url):
            await next_turns(http, url, restarted=True)  # from disk after kill -9
            proc.send_signal(signal.SIGTERM)  # drains: the turn just served is committed
            assert proc.wait(timeout=60) == 0
        with serve(default_model_dir, state, tmp_path / "c.log") as (proc, url):
            await next_turns(http, url, restarted=True)  # from disk after SIGTERM
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
