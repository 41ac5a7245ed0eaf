"""The tiered cache and the retention policy in isolation, with a fake clock and cost."""

from __future__ import annotations

import pytest

from pensieve.block_allocator import BlockAllocator, OutOfBlocks
from pensieve.cache import TieredCache
from pensieve.policy import CostModel, EvictionIndex, retention_value

BS = 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_cache(device: int = 16, host: int = 16) -> tuple[TieredCache, FakeClock]:
    clock = FakeClock()
    return TieredCache(BS, device, host, CostModel.linear(1.0, 0.01), clock), clock


def serve(cache: TieredCache, cid: str, tokens: list[int], rid: int = 1) -> None:
    """Admit a turn and pretend every pending input was computed (and every copy landed)."""
    assert cache.acquire(cid, rid)
    cache.begin(cid)
    adm = cache.admit(cid, tokens)
    cache.restore_done(cache.take_restores(), ok=True)
    cache.commit(cid, adm.pending)
    cache.release(cid, rid)


def swap_out(cache: TieredCache, n: int, ok: bool = True) -> list[tuple[int, int]]:
    """Plan a swap-out and report the copy done."""
    copies = cache.plan_swap_out(n)
    cache.swap_out_done(copies, ok)
    return copies


def test_allocator_detects_double_free() -> None:
    alloc = BlockAllocator(3)
    a, b = alloc.allocate(2)
    alloc.free(a)
    assert alloc.num_free == 2
    with pytest.raises(ValueError):
        alloc.free(a)
    with pytest.raises(OutOfBlocks):
        alloc.allocate(3)
    alloc.free(b)
    assert alloc.num_free == 3


def test_cost_model_interpolates_and_grows() -> None:
    cost = CostModel([0, 100, 200], [1.0, 2.0, 4.0])
    assert cost(50) == pytest.approx(1.5)
    assert cost(150) == pytest.approx(3.0)
    assert cost(300) == pytest.approx(6.0)  # extrapolated
    assert retention_value(2.0, 4.0) == 0.5


def test_profile_keeps_points_in_the_window_and_cost_monotone() -> None:
    noisy = {0: 1.0, 512: 3.0, 2048: 2.0}  # a noisy dip at 2048
    cost = CostModel.profile(noisy.__getitem__, max_context=4096)
    assert cost.context_lengths == [0, 512, 2048]
    assert cost.seconds == [1.0, 3.0, 3.0]


def test_leading_chunks_rank_first_within_a_conversation() -> None:
    index = EvictionIndex(CostModel.linear(1.0, 0.1), BS)
    index.set("a", 0, 3, 0.0)
    assert index.lowest(5, now=10.0) == [("a", 0), ("a", 1), ("a", 2)]


def test_eviction_index_picks_the_exact_lowest_values() -> None:
    """The picks equal a brute-force ranking of every chunk, across many conversations."""
    import random

    rng = random.Random(7)
    cost = CostModel([0, 64, 256], [1.0, 1.5, 4.0])
    index = EvictionIndex(cost, BS, capacity=2)  # grows
    runs = {}
    for i in range(300):
        runs[f"c{i}"] = (rng.randrange(0, 40), rng.randrange(1, 12), rng.uniform(0, 99))
        index.set(f"c{i}", *runs[f"c{i}"])
    for i in range(0, 300, 3):
        index.remove(f"c{i}")
        del runs[f"c{i}"]
    every = sorted(
        (retention_value(cost(c * BS), 100.0 - last), cid, c)
        for cid, (first, count, last) in runs.items()
        for c in range(first, first + count)
    )
    assert index.lowest(50, now=100.0) == [(cid, c) for _, cid, c in every[:50]]
    assert index.total == sum(count for _, count, _ in runs.values())


def test_idle_conversation_loses_more_than_active_one() -> None:
    cache, clock = make_cache(device=16, host=16)
    serve(cache, "idle", list(range(16)))
    clock.now += 100.0
    serve(cache, "active", list(range(100, 116)))
    clock.now += 1.0
    assert len(swap_out(cache, 3)) == 3
    idle, active = cache.conversations["idle"], cache.conversations["active"]
    assert [ch.host is not None for ch in idle.chunks] == [True, True, True, False]
    assert all(ch.host is None for ch in active.chunks)
    cache.check()


def test_swap_out_is_lazy_and_reclaim_takes_leading_copies() -> None:
    cache, clock = make_cache(device=8, host=8)
    serve(cache, "a", list(range(16)))
    clock.now += 10
    swap_out(cache, 2)
    assert cache.device.num_used == 4  # still valid on device
    assert cache.reclaimable() == 2
    assert cache.reclaim(1) == 1
    chunks = cache.conversations["a"].chunks
    assert chunks[0].device is None and chunks[0].host is not None
    assert chunks[1].device is not None and chunks[1].host is not None
    assert cache.conversations["a"].tier_tokens(BS) == (12, 4, 0, 0)
    cache.check()


def test_full_host_drops_lowest_value_leading_chunk() -> None:
    cache, clock = make_cache(device=8, host=2)
    serve(cache, "old", list(range(8)))
    clock.now += 50
    serve(cache, "new", list(range(50, 58)))
    clock.now += 1
    swap_out(cache, 2)  # both host blocks go to "old" (idle longest)
    cache.reclaim(2)
    assert cache.conversations["old"].tier_tokens(BS) == (0, 8, 0, 0)
    swap_out(cache, 1)  # host full: old's leading chunk is dropped to make room
    old = cache.conversations["old"]
    assert old.dropped == 1 and old.tier_tokens(BS) == (0, 4, 0, 4)
    assert old.tokens == list(range(8))  # token ids are kept
    cache.check()


def test_returning_conversation_restores_and_recomputes_dropped_prefix() -> None:
    cache, clock = make_cache(device=8, host=1)
    serve(cache, "c", list(range(12)))
    clock.now += 5
    for _ in range(2):  # one host block: the second chunk's copy drops the first
        swap_out(cache, 1)
        cache.reclaim(1)
    conv = cache.conversations["c"]
    assert conv.dropped == 1 and conv.tier_tokens(BS) == (4, 4, 0, 4)
    assert cache.acquire("c", 2)
    cache.begin("c")
    adm = cache.admit("c", list(range(12)) + [99, 98])
    assert adm.recomputed_tokens == 4 and adm.cached_tokens == 8
    assert [p for _, p in adm.pending] == [0, 1, 2, 3, 12, 13]
    assert len(adm.swap_in) == 1
    cache.restore_done(cache.take_restores(), ok=True)
    cache.commit("c", adm.pending)
    cache.release("c", 2)
    assert conv.dropped == 0 and conv.tokens == list(range(12)) + [99, 98]
    cache.check()


def test_diverging_history_reuses_common_prefix_only() -> None:
    cache, _ = make_cache()
    serve(cache, "c", list(range(10)))
    conv = cache.conversations["c"]
    assert cache.acquire("c", 2)
    cache.begin("c")
    adm = cache.admit("c", list(range(6)) + [50, 51, 52])
    assert adm.cached_tokens == 6
    cache.commit("c", adm.pending)
    cache.release("c", 2)
    assert conv.tokens == list(range(6)) + [50, 51, 52]
    assert len(conv.chunks) == 3
    cache.check()


def test_prefix_match_needs_the_whole_last_prompt() -> None:
    cache, _ = make_cache()
    serve(cache, "a", list(range(20)))
    assert cache.resolve(list(range(20)) + [7, 7]) == ("a", 20)
    assert cache.resolve(list(range(5)) + [9] * 30)[0] is None  # only a shared preamble
    assert cache.resolve(list(range(19)) + [9] * 30)[0] is None  # an edited last message
    assert cache.acquire("a", 5)  # a request holds it: nobody else may continue it
    assert cache.resolve(list(range(20)) + [7])[0] is None
    cache.release("a", 5)
    assert cache.resolve(list(range(20)) + [7])[0] == "a"
    serve(cache, "named", list(range(100, 120)))
    cache.conversations["named"].named = True  # a client named it: only that name continues it
    cache.prefixes.remove("named")
    assert cache.resolve(list(range(100, 120)) + [7, 7])[0] is None
    assert cache.acquire("n2", 6, named=True)
    cache.begin("n2")
    cache.commit("n2", cache.admit("n2", list(range(200, 220))).pending)
    cache.release("n2", 6)
    assert cache.resolve(list(range(200, 220)) + [7])[0] is None


def test_unfinished_recompute_leaves_range_dropped() -> None:
    cache, clock = make_cache(device=8, host=0)
    serve(cache, "c", list(range(8)))
    clock.now += 1
    assert cache.drop_leading(1) == 1
    conv = cache.conversations["c"]
    assert cache.acquire("c", 3)
    cache.begin("c")
    adm = cache.admit("c", list(range(8)) + [42])
    cache.commit("c", adm.pending[:2])  # cancelled mid-recompute
    cache.release("c", 3)
    assert conv.dropped == 1 and conv.tier_tokens(BS) == (4, 0, 0, 4)
    cache.check()


def test_lookups_do_not_scan_10000_stored_conversations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolution compares tokens with a bounded number of candidates, and eviction looks at
    only the conversations it takes from, however many are stored (figures: bench_lookup)."""
    import pensieve.cache as cache_module
    from pensieve.prefix_index import MAX_CANDIDATES

    n = 10_000
    cache = TieredCache(BS, 3 * n + 8, 3 * n, CostModel.linear(1.0, 0.01), FakeClock())
    for i in range(n):  # all share a preamble of 8 tokens
        serve(cache, f"c{i}", [0, 1, 2, 3, 4, 5, 6, 7, i, 9], rid=i + 1)
    calls = {"compare": 0, "runs": 0}
    real_compare, real_runs = cache_module.common_prefix, TieredCache._runs

    def compare(a: list[int], b: list[int]) -> int:
        calls["compare"] += 1
        return real_compare(a, b)

    def runs(self: TieredCache, conv: object) -> dict:
        calls["runs"] += 1
        return real_runs(self, conv)  # type: ignore[arg-type]

    monkeypatch.setattr(cache_module, "common_prefix", compare)
    monkeypatch.setattr(TieredCache, "_runs", runs)
    assert cache.resolve([0, 1, 2, 3, 4, 5, 6, 7, 42, 9, 11]) == ("c42", 10)
    assert calls["compare"] <= MAX_CANDIDATES
    assert cache.resolve([0, 1, 2, 3, 4, 5, 99]) == (None, 0)
    copies = swap_out(cache, 8)
    assert len(copies) == 8 and cache.reclaim(8) == 8
    assert calls["runs"] <= 3 * 8  # re-indexing the conversations it touched, nothing else
    cache.check()


def test_forgetting_a_conversation_never_on_disk_leaves_no_disk_work() -> None:
    cache, _ = make_cache()
    serve(cache, "gone", list(range(10)))
    cache.delete("gone")
    assert cache.forgotten == []  # nothing to delete on disk: nothing queued (no growth)
