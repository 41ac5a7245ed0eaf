"""KV events for vllm-router's kv_aware policy (pensieve/kv_events.py).

The unit tests drive the tiered cache through tier moves and replay the events into `RouterView`,
a model of the router's index as its source describes it: each block keyed by the router's own
hash of its token ids, placed under its parent's block, claimed per medium. After every move the
view must hold exactly the conversation's blocks, each on the tiers the cache has it on. Then two
workers behind the real router with kv_aware: later turns land on the worker holding the
conversation, also when the router never routed it. The wire: tests/test_kv_events_wire.py.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from test_cache import BS, make_cache, serve, swap_out
from test_cluster import chat_turn, needs, replay_two_conversations, router_process

from pensieve.cluster import free_port, kv_event_args, kv_event_router_args
from pensieve.config import EngineConfig
from pensieve.disk_store import ChunkRef
from pensieve.durable import DurableCache
from pensieve.engine import Engine
from pensieve.kv_events import (
    DEVICE,
    DISK,
    HOST,
    KvEventTracker,
    chain_hashes,
    router_block_hash,
)
from pensieve.policy import CostModel
from pensieve.runtime import LoadedModel
from pensieve.server import create_app, start_server


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[dict]] = []
        self.closed = False

    def publish(self, events: list[dict]) -> None:
        self.batches.append(events)

    def close(self) -> None:
        self.closed = True


class RouterView:
    """vllm-router's KV index: blocks keyed by `router_block_hash`, a stored run entered under
    its parent's block (the root without one), claims per medium, removals by our hash."""

    def __init__(self) -> None:
        self.paths: dict[int, tuple[bytes, ...]] = {}  # our block hash -> its path in the tree
        self.claims: dict[tuple[bytes, ...], set[str]] = defaultdict(set)

    def apply(self, events: list[dict]) -> None:
        for ev in events:
            if ev["type"] == "BlockStored":
                parent = ev["parent_block_hash"]
                assert parent is None or parent in self.paths, "the router would start at root"
                path = self.paths[parent] if parent is not None else ()
                size, tokens = ev["block_size"], ev["token_ids"]
                assert len(tokens) == size * len(ev["block_hashes"])
                for k, block in enumerate(ev["block_hashes"]):
                    path = path + (router_block_hash(tokens[k * size : (k + 1) * size]),)
                    self.paths[block] = path
                    self.claims[path].add(ev["medium"])
            elif ev["type"] == "BlockRemoved":
                for block in ev["block_hashes"]:
                    self.claims[self.paths[block]].discard(ev["medium"])
            else:
                self.claims.clear()

    def media(self, tokens: Sequence[int], size: int) -> list[set[str]]:
        """Per full block of the request's tokens, the media the router credits, from the first
        block on (how it walks a request)."""
        out, path = [], ()
        for j in range(len(tokens) // size):
            path = path + (router_block_hash(tokens[j * size : (j + 1) * size]),)
            out.append(set(self.claims.get(path, ())))
        return out

    def blocks(self) -> int:
        return sum(1 for media in self.claims.values() if media)


def tracked(cache, router_block: int = BS) -> tuple[KvEventTracker, Sink, RouterView]:
    sink, view = Sink(), RouterView()
    tracker = KvEventTracker(cache.block_size, router_block, sink)
    cache.listener = tracker
    return tracker, sink, view


def flush(tracker: KvEventTracker, sink: Sink, view: RouterView, cache) -> list[dict]:
    before = len(sink.batches)
    tracker.flush(cache.conversations)
    events = [ev for batch in sink.batches[before:] for ev in batch]
    view.apply(events)
    return events


def test_chain_hashes_name_the_whole_prefix() -> None:
    a = chain_hashes(list(range(12)), 4)
    assert len(a) == 3 and a == chain_hashes(list(range(14)), 4)  # partial blocks: none
    assert chain_hashes(list(range(4, 12)), 4, parent=a[0]) == a[1:]  # continues a chain
    b = chain_hashes([9, 9, 9, 9] + list(range(4, 12)), 4)
    assert a[1] != b[1]  # the same tokens after another prefix: another block
    assert all(0 <= h < 2**63 for h in a + b)
    assert router_block_hash([1, 2]) == __import__("hashlib").sha256(b"\1\0\0\0\2\0\0\0").digest()


def test_a_conversation_s_blocks_follow_it_across_tiers() -> None:
    cache, clock = make_cache(device=8, host=4)
    tracker, sink, view = tracked(cache)
    tokens = list(range(12))
    serve(cache, "a", tokens)
    events = flush(tracker, sink, view, cache)
    assert [ev["type"] for ev in events] == ["BlockStored"]
    assert events[0]["block_hashes"] == chain_hashes(tokens, BS)
    assert events[0]["parent_block_hash"] is None and events[0]["token_ids"] == tokens
    assert view.media(tokens, BS) == [{DEVICE}] * 3
    clock.now += 10
    swap_out(cache, 2)  # host copies of the two leading chunks
    flush(tracker, sink, view, cache)
    assert view.media(tokens, BS) == [{DEVICE, HOST}, {DEVICE, HOST}, {DEVICE}]
    cache.reclaim(1)  # the first chunk leaves the device
    events = flush(tracker, sink, view, cache)
    assert events == [
        {"type": "BlockRemoved", "block_hashes": chain_hashes(tokens, BS)[:1], "medium": DEVICE}
    ]
    assert view.media(tokens, BS) == [{HOST}, {DEVICE, HOST}, {DEVICE}]
    # it returns with four more tokens: restored, extended, all on the device again
    longer = tokens + [90, 91, 92, 93]
    assert cache.acquire("a", 2)
    cache.begin("a")
    adm = cache.admit("a", longer)
    flush(tracker, sink, view, cache)
    assert view.media(longer, BS)[0] == {HOST}  # the restore has not landed yet
    cache.restore_done(cache.take_restores(), ok=True)
    cache.commit("a", adm.pending)
    cache.release("a", 2)
    flush(tracker, sink, view, cache)
    assert view.media(longer, BS) == [{DEVICE, HOST}, {DEVICE, HOST}, {DEVICE}, {DEVICE}]
    cache.delete("a")
    flush(tracker, sink, view, cache)
    assert view.blocks() == 0 and not tracker._refs and not tracker._convs


def test_blocks_of_another_size_than_the_cache_s() -> None:
    """The router's block size need not be the cache's: a block counts in a tier only when
    every chunk it overlaps is there."""
    for router_block in (2, 8):
        cache, clock = make_cache(device=8, host=4)
        tracker, sink, view = tracked(cache, router_block)
        tokens = list(range(16))
        serve(cache, "a", tokens)
        flush(tracker, sink, view, cache)
        n = 16 // router_block
        assert view.media(tokens, router_block) == [{DEVICE}] * n
        clock.now += 10
        swap_out(cache, 1)  # one chunk (4 tokens) gets a host copy
        cache.reclaim(1)
        flush(tracker, sink, view, cache)
        media = view.media(tokens, router_block)
        if router_block == 2:  # the chunk's two blocks are on the host only
            assert media == [{HOST}] * 2 + [{DEVICE}] * 6
        else:  # the first 8-token block spans a host-only and a device-only chunk: held nowhere
            assert media == [set(), set()]
        cache.check()


def test_shared_prefix_is_one_block_until_its_last_holder_goes() -> None:
    cache, _ = make_cache(device=16, host=4)
    tracker, sink, view = tracked(cache)
    system = [7, 7, 7, 7]
    serve(cache, "a", system + [1, 2, 3, 4])
    serve(cache, "b", system + [5, 6, 7, 8], rid=2)
    events = flush(tracker, sink, view, cache)
    stored = [h for ev in events for h in ev["block_hashes"]]
    assert len(stored) == 3  # the shared block once, each conversation's own block once
    cache.delete("a")
    flush(tracker, sink, view, cache)
    assert view.media(system + [5, 6, 7, 8], BS) == [{DEVICE}, {DEVICE}]
    assert view.media(system + [1, 2, 3, 4], BS) == [{DEVICE}, set()]
    cache.delete("b")
    flush(tracker, sink, view, cache)
    assert view.blocks() == 0


def test_a_dropped_prefix_leaves_nothing_to_route_on() -> None:
    """The router credits only a prefix from the first block: after a dropped leading chunk the
    rest is not announced, and a recompute announces everything again."""
    cache, clock = make_cache(device=8, host=1)
    tracker, sink, view = tracked(cache)
    tokens = list(range(12))
    serve(cache, "c", tokens)
    clock.now += 5
    for _ in range(2):  # one host block: the second chunk's copy drops the first
        swap_out(cache, 1)
        cache.reclaim(1)
    flush(tracker, sink, view, cache)
    assert cache.conversations["c"].dropped == 1 and view.blocks() == 0
    serve(cache, "c", tokens + [50, 51], rid=2)  # recomputes the first, restores the second
    flush(tracker, sink, view, cache)
    assert view.media(tokens, BS) == [{DEVICE}, {DEVICE, HOST}, {DEVICE}]


def test_a_diverging_history_replaces_its_blocks() -> None:
    cache, _ = make_cache()
    tracker, sink, view = tracked(cache)
    serve(cache, "c", list(range(12)))
    flush(tracker, sink, view, cache)
    other = list(range(6)) + [60, 61, 62, 63, 64, 65]
    serve(cache, "c", other, rid=2)
    flush(tracker, sink, view, cache)
    assert view.media(other, BS) == [{DEVICE}] * 3
    assert view.media(list(range(12)), BS) == [{DEVICE}, set(), set()]


def test_disk_copies_are_announced_and_dropped_with_the_conversation() -> None:
    cache = DurableCache(BS, 8, 8, CostModel.linear(1.0, 0.01), disk_blocks=8)
    tracker, sink, view = tracked(cache)
    tokens = list(range(10))  # two full chunks and a partial one (never written)
    serve(cache, "d", tokens)
    _, writes, _ = cache.plan_persist("d")
    refs = {w.index: ChunkRef(w.uid, 0) for w in writes}
    flush(tracker, sink, view, cache)
    assert view.media(tokens, BS) == [{DEVICE}, {DEVICE}]  # written is not committed yet
    cache.persist_done(refs, writes, ok=True)
    flush(tracker, sink, view, cache)
    assert view.media(tokens, BS) == [{DEVICE, DISK}, {DEVICE, DISK}]
    cache.delete("d")
    flush(tracker, sink, view, cache)
    assert view.blocks() == 0


def test_incremental_events_match_a_fresh_tracker_s_under_random_moves() -> None:
    """After every flush the router's view equals what a fresh tracker would announce from the
    cache as it is, across turns, decode steps, swaps, reclaims and drops (seeded)."""
    import random

    rng = random.Random(7)
    cache, clock = make_cache(device=24, host=8)
    tracker, sink, view = tracked(cache, router_block=2)
    histories: dict[str, list[int]] = {}
    system = [5, 5, 5, 5, 5, 5]  # shared by every conversation: one block to the router
    for step in range(150):
        clock.now += rng.random()
        op = rng.random()
        if op < 0.45:
            cid = f"c{rng.randrange(5)}"
            target = histories.get(cid, system) + [rng.randrange(100) for _ in range(3)]
            if rng.random() < 0.1:  # a diverging history
                target = system + [rng.randrange(100) for _ in range(5)]
            if cache.acquire(cid, step) and len(target) < 40:
                cache.begin(cid)
                short = cache.plan_admission(cid, target)[1] - cache.device.num_free
                if short > 0:
                    cache.reclaim(short)
                    cache.drop_leading(short)
                adm = cache.admit(cid, target)
                cache.restore_done(cache.take_restores(), ok=True)
                cache.commit(cid, adm.pending)
                for pos in range(len(target), len(target) + rng.randrange(4)):  # decode steps
                    flush(tracker, sink, view, cache)
                    if not cache.device.num_free and not cache.reclaim(1):
                        cache.drop_leading(1)
                    cache.ensure_slot(cid, pos)
                    cache.commit(cid, [(rng.randrange(100), pos)])
                histories[cid] = list(cache.conversations[cid].tokens)
                cache.release(cid, step)
        elif op < 0.7:
            swap_out(cache, rng.randrange(1, 4))
        elif op < 0.85:
            cache.reclaim(rng.randrange(1, 4))
        elif op < 0.95:
            cache.drop_leading(rng.randrange(1, 3))
        elif histories:
            cid = rng.choice(sorted(histories))
            cache.delete(cid)
            del histories[cid]
        flush(tracker, sink, view, cache)
        fresh = tracked(cache, router_block=2)
        for cid in cache.conversations:
            fresh[0].changed(cid)
        flush(*fresh, cache)
        cache.listener = tracker
        ours = {path: media for path, media in view.claims.items() if media}
        assert ours == {path: media for path, media in fresh[2].claims.items() if media}, step
        cache.check()


# ---- two workers behind vllm-router with kv_aware --------------------------------------------


def test_cluster_wires_each_worker_s_event_sockets_to_the_router() -> None:
    flags, endpoints, size = kv_event_args(["--kv-events-block-size", "32", "--no-profile-cost"])
    assert flags == ["--kv-events-endpoint", endpoints[0], "--kv-events-replay-endpoint"] + [
        endpoints[1]
    ]
    assert size == 32 and all(e.startswith("tcp://127.0.0.1:") for e in endpoints)
    urls = ["http://a", "http://b"]
    args = kv_event_router_args(urls, ["tcp://1", "tcp://2"], 32, ["tcp://3"] * 2)
    assert args == [
        "--kv-event-source", "http://a=tcp://1", "--kv-event-source", "http://b=tcp://2",
        "--kv-event-replay-source", "http://a=tcp://3", "--kv-event-replay-source", "http://b=tcp://3",
        "--kv-event-block-size", "32", "--kv-event-model", "pensieve",
    ]  # fmt: skip


@pytest_asyncio.fixture
async def kv_workers(tiny: LoadedModel) -> AsyncIterator[tuple[list[str], list[str]]]:
    """Two in-process workers publishing KV events: their URLs and the router's flags."""
    pytest.importorskip("zmq")
    pytest.importorskip("msgpack")
    engines, runners, urls, endpoints, replays = [], [], [], [], []
    try:
        for _ in range(2):
            endpoint, replay = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
            config = EngineConfig(
                device_cache_tokens=2048,
                host_cache_tokens=2048,
                profile_cost=False,
                kv_events_endpoint=endpoint,
                kv_events_replay_endpoint=replay,
            )
            engine = await Engine(config, loaded=tiny, cost_model=CostModel.linear()).start()
            engines.append(engine)
            runner, port = await start_server(create_app(engine), shutdown_timeout=0.5)
            runners.append(runner)
            urls.append(f"http://127.0.0.1:{port}")
            endpoints.append(endpoint)
            replays.append(replay)
        yield urls, kv_event_router_args(urls, endpoints, 16, replays)
    finally:
        for runner in runners:
            await runner.cleanup()
        for engine in engines:
            await engine.stop()


async def kv_hits(http: aiohttp.ClientSession, metrics_url: str) -> float:
    async with http.get(metrics_url) as resp:
        text = await resp.text()
    lines = [ln for ln in text.splitlines() if ln.startswith("vllm_router_kv_placement_lookups")]
    return sum(float(ln.split()[-1]) for ln in lines if 'result="hit"' in ln)


@pytest.mark.slow
@needs("vllm")
async def test_later_turns_reach_the_worker_that_holds_the_conversation(
    kv_workers: tuple[list[str], list[str]], tmp_path: Path
) -> None:
    urls, flags = kv_workers
    metrics_port = free_port()
    extra = flags + ["--prometheus-port", str(metrics_port), "--log-level", "debug"]
    log = tmp_path / "router.log"
    async with router_process("vllm", "kv_aware", urls, log, extra) as url:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            await replay_two_conversations(http, url, urls, "tiny-random", "kv")
            # a conversation the router never saw: its first turn goes to a worker directly, and
            # only that worker's events can send the next turn there
            for i, worker in enumerate(urls):
                history = [{"role": "user", "content": f"direct {i}: where were we?"}]
                first = await chat_turn(http, worker, history, {}, "tiny-random")
                history += [{"role": "assistant", "content": first.text}]
                history += [{"role": "user", "content": "go on"}]
                await asyncio.sleep(0.2)  # the events cross a socket
                later = await chat_turn(http, url, history, {}, "tiny-random")
                assert later.conversation_id == first.conversation_id, (i, log.read_text()[-3000:])
                assert later.cached_tokens >= first.prompt_tokens
            hits = await kv_hits(http, f"http://127.0.0.1:{metrics_port}/metrics")
            assert hits >= 6, log.read_text()[-3000:]  # 4 later turns + 2 direct ones, at least
