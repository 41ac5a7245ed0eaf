"""Pensieve workers behind the routers on PyPI (sglang-router, vllm-router) and `pensieve cluster`.

The routing tests put two in-process workers (the tiny random model) behind a real router
process and replay two conversations of three turns each: one named (X-Session-ID, plus
X-SMG-Routing-Key, the only session header sglang-router forwards) and one that only resends its
history. Every later turn must find its previous prompt cached (so it reached the replica that
holds the conversation), and each conversation must live on exactly one replica. The last test
runs `pensieve cluster` itself: real `pensieve serve` processes and sglang-router.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from pensieve.cli import build_parser
from pensieve.cluster import (
    Cluster,
    ClusterConfig,
    ClusterError,
    free_port,
    router_command,
    router_installed,
    worker_command,
)
from pensieve.config import EngineConfig
from pensieve.engine import Engine
from pensieve.policy import CostModel
from pensieve.runtime import LoadedModel
from pensieve.server import create_app, start_server


def needs(router: str) -> pytest.MarkDecorator:
    package = f"{router}-router"
    return pytest.mark.skipif(
        not router_installed(router), reason=f"{package} is not installed (pip install {package})"
    )


# ---- command lines (no processes) ---------------------------------------------------------


def test_cluster_takes_serve_flags_and_other_commands_still_reject_unknown_ones() -> None:
    parser, _ = build_parser()
    args, extra = parser.parse_known_args(
        ["cluster", "--router", "vllm", "--replicas", "3", "--port", "0"]
        + ["--device-cache-tokens", "512", "--host-cache-tokens", "4096", "--no-profile-cost"]
    )
    assert (args.replicas, args.router, args.port, args.policy) == (3, "vllm", 0, "cache_aware")
    assert extra == ["--device-cache-tokens", "512", "--host-cache-tokens", "4096"] + [
        "--no-profile-cost"
    ]
    from pensieve.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--no-such-flag"])


def test_worker_and_router_commands() -> None:
    assert worker_command(8001, ["--device-cache-tokens", "64"])[-6:] == [
        "--host", "127.0.0.1", "--port", "8001", "--device-cache-tokens", "64",
    ]  # fmt: skip
    urls = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    command = router_command("sglang", urls, "0.0.0.0", 30000, "manual", 29001, ["--x"])
    assert command[1:3] == ["-m", "sglang_router.launch_router"]
    assert command[command.index("--worker-urls") + 1 :][:2] == urls
    assert command[command.index("--policy") + 1] == "manual"
    assert command[command.index("--prometheus-port") + 1] == "29001"
    assert command[-1] == "--x"
    with pytest.raises(ClusterError, match="no policy 'consistent_hash'"):
        Cluster(ClusterConfig(replicas=2, router="sglang", policy="consistent_hash"))


# ---- two in-process workers behind a router process -----------------------------------------


@dataclass
class Turn:
    text: str
    prompt_tokens: int
    cached_tokens: int
    conversation_id: str


async def chat_turn(
    http: aiohttp.ClientSession, url: str, messages: list[dict], headers: dict, model: str
) -> Turn:
    """One streamed, greedy turn with usage; the stream must pass through the router intact."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    parts, usage, cids, done = [], None, set(), False
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[5:])
            cids.add(chunk["conversation_id"])
            usage = chunk.get("usage") or usage
            parts += [c["delta"].get("content") or "" for c in chunk["choices"]]
    assert done and usage is not None and len(cids) == 1
    details = usage.get("prompt_tokens_details") or {}
    return Turn("".join(parts), usage["prompt_tokens"], details["cached_tokens"], cids.pop())


async def replay_two_conversations(
    http: aiohttp.ClientSession,
    router_url: str,
    worker_urls: list[str],
    model: str,
    tag: str,
    affine: tuple[str, ...] = ("named", "anonymous"),
) -> None:
    """Two conversations x three turns through the router; the later turns of those the policy
    keeps `affine` must find their previous prompt cached, on exactly one replica."""
    conversations = {
        "named": {"X-Session-ID": f"{tag}-named", "X-SMG-Routing-Key": f"{tag}-named"},
        "anonymous": {},
    }
    histories = {name: [] for name in conversations}
    turns: dict[str, list[Turn]] = {name: [] for name in conversations}
    for i in range(3):
        for name, headers in conversations.items():
            history = histories[name]
            history.append({"role": "user", "content": f"{tag} {name} question {i}: why?"})
            turn = await chat_turn(http, router_url, history, headers, model)
            history.append({"role": "assistant", "content": turn.text})
            turns[name].append(turn)
    for name in affine:
        seen = turns[name]
        for before, after in zip(seen[:-1], seen[1:], strict=True):
            assert after.cached_tokens >= before.prompt_tokens, (name, before, after)
        assert len({t.conversation_id for t in seen}) == 1, name
        holders = []
        for url in worker_urls:
            async with http.get(url + "/v1/conversations") as resp:
                ids = {c["id"] for c in (await resp.json())["data"]}
            holders += [url] if seen[0].conversation_id in ids else []
        assert len(holders) == 1, (name, holders)


@pytest_asyncio.fixture
async def two_workers(tiny: LoadedModel) -> AsyncIterator[list[str]]:
    engines, runners, urls = [], [], []
    config = EngineConfig(device_cache_tokens=2048, host_cache_tokens=2048, profile_cost=False)
    try:
        for _ in range(2):
            engine = await Engine(config, loaded=tiny, cost_model=CostModel.linear()).start()
            engines.append(engine)
            runner, port = await start_server(create_app(engine), shutdown_timeout=0.5)
            runners.append(runner)
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for runner in runners:
            await runner.cleanup()
        for engine in engines:
            await engine.stop()


@contextlib.asynccontextmanager
async def router_process(
    router: str, policy: str, worker_urls: list[str], log_path: Path, extra: list[str] | None = None
) -> AsyncIterator[str]:
    """A router in front of worker_urls; yields its URL once it counts them all healthy."""
    port = free_port()
    metrics = free_port()
    command = router_command(router, worker_urls, "127.0.0.1", port, policy, metrics, extra or [])
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            async with aiohttp.ClientSession() as http:
                while True:
                    assert proc.poll() is None, log_path.read_text()
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(url + "/readiness") as resp:
                            ready = resp.status == 200 and await resp.json(content_type=None)
                            if ready and ready["healthy_workers"] == len(worker_urls):
                                break
                    assert time.monotonic() < deadline, "the router never saw the workers healthy"
                    await asyncio.sleep(0.2)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# Which conversations each policy keeps on one replica: cache_aware routes on the history's
# text, so both; manual (sglang) and consistent_hash (vllm) route on the session header only.
ROUTED = [
    pytest.param("sglang", "cache_aware", ("named", "anonymous"), marks=needs("sglang")),
    pytest.param("sglang", "manual", ("named",), marks=needs("sglang")),
    pytest.param("vllm", "consistent_hash", ("named",), marks=needs("vllm")),
    pytest.param("vllm", "cache_aware", ("named", "anonymous"), marks=needs("vllm")),
]


@pytest.mark.slow
@pytest.mark.parametrize(("router", "policy", "affine"), ROUTED)
async def test_conversations_stay_on_their_replica_behind_router(
    two_workers: list[str], router: str, policy: str, affine: tuple[str, ...], tmp_path: Path
) -> None:
    async with router_process(router, policy, two_workers, tmp_path / "router.log") as url:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            await replay_two_conversations(http, url, two_workers, "tiny-random", policy, affine)


@pytest.mark.slow
@needs("vllm")
async def test_handover_of_a_drained_worker(two_workers: list[str], tmp_path: Path) -> None:
    """docs/scale-out.md's handover: take worker A out of the router, move each of its
    conversations to B (GET .../state on A, PUT on B); their next turns, through the router,
    find their history cached on B and produce the tokens A would have produced."""
    a, b = two_workers
    sessions = {"named": {"X-Session-ID": "moved"}, "anonymous": {}}
    async with router_process("vllm", "consistent_hash", two_workers, tmp_path / "r.log") as url:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            histories, first = {}, {}
            for name, headers in sessions.items():  # both start on A
                histories[name] = [{"role": "user", "content": f"handover {name}: hello?"}]
                first[name] = await chat_turn(http, a, histories[name], headers, "tiny-random")
                histories[name].append({"role": "assistant", "content": first[name].text})
                histories[name].append({"role": "user", "content": "and then?"})
            async with http.post(url + "/remove_worker", params={"url": a}) as resp:
                assert resp.status == 200, await resp.text()
            async with http.get(a + "/v1/conversations") as resp:
                moving = [c["id"] for c in (await resp.json())["data"]]
            assert sorted(moving) == sorted(t.conversation_id for t in first.values())
            for cid in moving:
                async with http.get(f"{a}/v1/conversations/{cid}/state") as resp:
                    assert resp.status == 200
                    state = await resp.read()
                async with http.put(f"{b}/v1/conversations/{cid}/state", data=state) as resp:
                    assert resp.status == 200, await resp.text()
            for name, headers in sessions.items():
                moved = await chat_turn(http, url, histories[name], headers, "tiny-random")
                assert moved.conversation_id == first[name].conversation_id
                assert moved.cached_tokens >= first[name].prompt_tokens, name
                stayed = await chat_turn(http, a, histories[name], headers, "tiny-random")
                assert (moved.text, moved.prompt_tokens) == (stayed.text, stayed.prompt_tokens)
                assert moved.cached_tokens == stayed.cached_tokens, name


# ---- `pensieve cluster`: serve processes and the router -------------------------------------


@pytest.mark.slow
@needs("sglang")
def test_pensieve_cluster_command_serves_and_stops(default_model_dir: Path, tmp_path: Path) -> None:
    """The command itself: prints the router URL once every worker is healthy, routes with
    affinity, and stops all its processes on SIGINT."""
    port = free_port()
    command = [
        sys.executable, "-m", "pensieve.cli", "cluster",
        "--replicas", "2", "--router", "sglang", "--port", str(port),
        "--log-dir", str(tmp_path / "logs"), "--startup-timeout", "120",
        "--model", str(default_model_dir), "--dtype", "float32", "--no-profile-cost",
        "--device-cache-tokens", "1024", "--host-cache-tokens", "1024",
    ]  # fmt: skip
    out = (tmp_path / "cluster.out").open("w+")
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 150
        while f"http://127.0.0.1:{port}" not in (text := Path(out.name).read_text()):
            assert proc.poll() is None, text
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        workers = next(ln for ln in text.splitlines() if ln.startswith("workers: ")).split()[1:]

        async def client() -> None:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/v1/models") as resp:
                    model = (await resp.json(content_type=None))["data"][0]["id"]
                await replay_two_conversations(
                    http, f"http://127.0.0.1:{port}", workers, model, "cluster"
                )

        asyncio.run(client())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        for url in [f"http://127.0.0.1:{port}", *workers]:  # nothing listens any more
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()


def test_bench_cluster_commands_and_table() -> None:
    from pensieve.bench.bench_cluster import POINTS, affinity_hits, bench_command, slug, table

    keyed = bench_command("http://r", POINTS["2x sglang manual (routing key)"], 2, Path("o"), [])
    assert keyed[keyed.index("--peer-name") + 1] == "2x_sglang_manual__routing_key_"
    assert keyed[keyed.index("--peer-session-header") + 1] == "X-SMG-Routing-Key"
    assert keyed[keyed.index("--seed") + 1] == "2" and "--no-session-header" not in keyed
    history = bench_command("http://r", POINTS["2x vllm round_robin"], 0, Path("o"), ["--x"])
    assert "--no-session-header" in history and history[-1] == "--x"
    runs = [
        {"cached_share": s, "ttft_later_p50": 0.5, "output_tokens_per_s": 10.0, "failures": 0}
        for s in (0.5, 0.7)
    ]
    for run in runs:
        run["affinity_hits"] = 1.0
    assert "| p | 2 | 0 | 1.000 (1.000-1.000) | 0.600 (0.500-0.700) |" in table({"p": runs})
    turns = [
        dict(conversation_id=c, turn_index=i, error=None, prompt_tokens=p, cached_tokens=k)
        for c, i, p, k in [("a", 0, 10, 0), ("a", 1, 30, 12), ("b", 0, 10, 0), ("b", 1, 30, 4)]
    ]
    assert affinity_hits(turns) == 0.5  # a's second turn found its first prompt, b's did not
    assert slug("2x vllm (session)") == "2x_vllm__session_"


def test_sglang_workers_also_answer_to_its_unknown_model(default_model_dir: Path) -> None:
    """sglang-router forwards a request without `model` as model "unknown"."""
    from pensieve.cluster import model_alias_args
    from pensieve.weights import load_config

    own = load_config(default_model_dir).name
    assert model_alias_args(["--model", str(default_model_dir), "--no-profile-cost"]) == [
        "--served-model-name", own, "--served-model-name", "unknown",
    ]  # fmt: skip
    assert model_alias_args(["--served-model-name", "chat"]) == ["--served-model-name", "unknown"]
    assert model_alias_args(["--served-model-name", "unknown"]) == []
