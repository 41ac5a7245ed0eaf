"""The swapper's ordering and its failures, on CPU, through the real engine (tiny model).

A copy that is still running is never taken for done: its chunk stays device-only, its device
block cannot be reclaimed and its host block is not trusted, even when some bytes have already
landed there. A copy that fails part-way leaves half-written blocks that nothing ever reads: a
failed copy-out keeps the chunk on device, a failed restore fails the turn that needed it (its
retry recomputes), and the replies equal the stateless oracle throughout.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from pensieve.actors.swapper import Swapper
from pensieve.block_allocator import KVPool
from pensieve.block_copy import Run
from pensieve.config import EngineConfig
from pensieve.engine import Engine
from pensieve.errors import EngineError
from pensieve.messages import LayerProgress, SwapOrder
from pensieve.policy import CostModel
from pensieve.reference import reference_generate
from pensieve.runtime import LoadedModel
from pensieve.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6)


class GatedCopier:
    """Wraps a swapper's copier. The first copy call of `direction` (for a restore: its second
    layer) copies only its first run, then waits for `release`, then raises (`fail`) or copies
    the rest. Later calls pass straight through."""

    def __init__(self, swapper: Swapper, direction: str, fail: bool = False):
        self.swapper, self.inner = swapper, swapper.copier
        self.direction, self.fail = direction, fail
        self.entered, self.release = threading.Event(), threading.Event()
        self.runs: list[Run] | None = None  # the gated call's runs

    def begin(self) -> None:
        self.inner.begin()

    def copy(self, src: KVPool, dst: KVPool, runs: list[Run], layers: range) -> None:
        direction = "out" if src is self.swapper.device_pool else "in"
        gated = direction == self.direction and self.runs is None
        if not gated or (direction == "in" and layers.start == 0):
            self.inner.copy(src, dst, runs, layers)
            return
        self.runs = runs
        self.inner.copy(src, dst, runs[:1], layers)  # some bytes land
        self.entered.set()
        if not self.release.wait(30):
            raise TimeoutError("the test never released the copy")
        if self.fail:
            raise OSError("injected fault in the middle of a copy")
        self.inner.copy(src, dst, runs[1:], layers)

    def pairs(self) -> list[tuple[int, int]]:
        return [(s + i, d + i) for s, d, n in self.runs or [] for i in range(n)]


def pressured(tiny: LoadedModel) -> Engine:
    config = EngineConfig(
        block_size=16, device_cache_tokens=320, host_cache_tokens=4096, profile_cost=False
    )
    return Engine(config, loaded=tiny, cost_model=CostModel.linear())


def gate(engine: Engine, direction: str, fail: bool = False) -> GatedCopier:
    (swapper,) = [a for a in engine._actors if isinstance(a, Swapper)]
    swapper.copier = GatedCopier(swapper, direction, fail)
    return swapper.copier


async def turn(engine: Engine, cid: str, text: str, records: list) -> list[int]:
    history = [{"role": "user", "content": text}]
    stream = engine.chat(history, cid, GREEDY)
    await stream.text()
    records.append((engine.tokenizer.encode_chat(history), stream.token_ids))
    return stream.token_ids


def assert_oracle(tiny: LoadedModel, records: list) -> None:
    eos = tiny.tokenizer.eos_token_ids
    for prompt, generated in records:
        assert generated == reference_generate(tiny.model, prompt, GREEDY, eos)


async def wait_entered(copier: GatedCopier) -> None:
    assert await asyncio.to_thread(copier.entered.wait, 30), "no copy reached the gate"


# ---- the swapper alone -----------------------------------------------------------------


async def test_swapdone_waits_for_the_whole_copy() -> None:
    device = KVPool.empty(2, 6, 4, 2, 8, torch.float32, torch.device("cpu"))
    host = KVPool.empty(2, 6, 4, 2, 8, torch.float32, torch.device("cpu"))
    device.keys.normal_()
    device.values.normal_()
    swapper = Swapper(device, host)
    copier = swapper.copier = GatedCopier(swapper, "out")
    swapper.start()
    try:
        reply = asyncio.get_running_loop().create_future()
        swapper.send(SwapOrder("out", [(1, 0), (4, 3)], reply))
        await wait_entered(copier)
        await asyncio.sleep(0.05)
        assert not reply.done()  # the first block landed, the order is not done
        assert torch.equal(host.keys[:, 0], device.keys[:, 1])
        assert not host.keys[:, 3].any()
        copier.release.set()
        done = await asyncio.wait_for(reply, 10)
        assert done.error is None and done.blocks == 2
        assert torch.equal(host.values[:, 3], device.values[:, 4])
    finally:
        copier.release.set()
        await swapper.stop()


async def test_a_restore_signals_only_the_layers_that_landed() -> None:
    device = KVPool.empty(3, 4, 4, 2, 8, torch.float32, torch.device("cpu"))
    host = KVPool.empty(3, 4, 4, 2, 8, torch.float32, torch.device("cpu"))
    host.keys.normal_()
    swapper = Swapper(device, host)
    copier = swapper.copier = GatedCopier(swapper, "in", fail=True)
    swapper.start()
    try:
        progress = LayerProgress(3)
        reply = asyncio.get_running_loop().create_future()
        swapper.send(SwapOrder("in", [(0, 2), (2, 0)], reply, progress))
        await wait_entered(copier)
        assert progress.ready[0].is_set() and not progress.ready[1].is_set()
        progress.wait(0)  # layer 0 is usable while layer 1 is still copying
        copier.release.set()
        done = await asyncio.wait_for(reply, 10)
        assert done.error is not None and "injected" in done.error and done.blocks == 0
        with pytest.raises(RuntimeError, match="swap-in failed"):
            progress.wait(1)
    finally:
        copier.release.set()
        await swapper.stop()


# ---- through the engine ------------------------------------------------------------------


async def test_a_running_copy_out_is_never_taken_for_done(tiny: LoadedModel) -> None:
    records: list = []
    async with pressured(tiny) as engine:
        copier = gate(engine, "out")
        cache = engine._scheduler.cache
        host_pool = engine._scheduler.pools["host"]
        device_pool = engine._scheduler.pools["device"]
        turns = [
            asyncio.create_task(turn(engine, f"c{i}", f"conversation {i} " * 12, records))
            for i in range(6)
        ]
        await wait_entered(copier)
        pairs = copier.pairs()
        assert pairs
        picks = set(cache.evictable["reclaim"].lowest(10**6, cache.clock()))
        for device, host in pairs:
            conv, ch = cache._outgoing[host]
            assert ch.device == device and ch.copy_to == host
            assert ch.host is None  # not a valid host copy yet: the chunk is device-only
            assert (conv.id, conv.chunks.index(ch)) not in picks  # not reclaimable
            assert device in cache._busy["device"] and host in cache._busy["host"]
        d0, h0 = pairs[0]  # its bytes have landed; it still does not count
        assert torch.equal(host_pool.keys[:, h0], device_pool.keys[:, d0])
        copier.release.set()
        await asyncio.wait_for(asyncio.gather(*turns), 60)
        for device, host in pairs:  # now they count, and they hold the device's bytes
            owners = [
                ch for conv in cache.conversations.values() for ch in conv.chunks
                if ch.host == host
            ]  # fmt: skip
            assert len(owners) <= 1
            if owners and owners[0].device == device:
                assert torch.equal(host_pool.keys[:, host], device_pool.keys[:, device])
        assert (await engine.stats()).swap_out_blocks_total >= len(pairs)
        await engine.check_accounting()
    assert_oracle(tiny, records)


async def test_a_copy_out_failing_midway_leaves_its_chunks_on_device(tiny: LoadedModel) -> None:
    records: list = []
    async with pressured(tiny) as engine:
        copier = gate(engine, "out", fail=True)
        copier.release.set()  # fail at once, with the first run already on the host
        cache = engine._scheduler.cache
        real_done, failures = cache.swap_out_done, []

        def swap_out_done(copies: list[tuple[int, int]], ok: bool) -> None:
            chunks = [cache._outgoing[host][1] for _, host in copies]
            real_done(copies, ok)
            if not ok:  # the half-written host blocks went back; the chunks stay on device
                failures.append(copies)
                for (device, host), ch in zip(copies, chunks, strict=True):
                    assert ch.host is None and ch.copy_to is None and ch.device == device
                    assert not cache.host.allocated[host]

        cache.swap_out_done = swap_out_done
        for i in range(6):
            await turn(engine, f"c{i}", f"conversation {i} " * 12, records)
        assert copier.runs is not None and len(failures) == 1
        assert sorted(failures[0]) == sorted(copier.pairs())
        for i in range(6):  # every conversation returns: cached, restored or recomputed
            await turn(engine, f"c{i}", f"conversation {i} " * 12 + "and again", records)
        stats = await engine.stats()
        assert stats.swap_out_blocks_total > 0  # later copies went through
        await engine.check_accounting()
    assert_oracle(tiny, records)


async def test_a_restore_failing_midway_fails_its_turn_and_the_retry_recomputes(
    tiny: LoadedModel,
) -> None:
    records: list = []
    async with pressured(tiny) as engine:
        for i in range(6):
            await turn(engine, f"c{i}", f"conversation {i} " * 12, records)
        copier = gate(engine, "in", fail=True)
        copier.release.set()
        failed = None
        for i in range(6):  # the first that needs a restore gets the fault
            try:
                await turn(engine, f"c{i}", f"conversation {i} " * 12 + "and again", records)
            except EngineError as exc:
                assert failed is None and "injected" in str(exc)
                failed = i
        assert failed is not None and copier.runs is not None
        await engine.check_accounting()
        again = f"conversation {failed} " * 12 + "and again"
        await turn(engine, f"c{failed}", again, records)  # served: recomputed from scratch
        await engine.check_accounting()
    assert_oracle(tiny, records)


async def test_a_failed_restore_leaves_the_other_rows_of_its_step_alone(
    tiny: LoadedModel,
) -> None:
    records: list = []
    long_sampling = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    async with pressured(tiny) as engine:
        for i in range(6):
            await turn(engine, f"c{i}", f"conversation {i} " * 12, records)
        copier = gate(engine, "in", fail=True)
        copier.release.set()
        history = [{"role": "user", "content": "a fresh conversation"}]
        decoding = engine.chat(history, "fresh", long_sampling)
        text = asyncio.create_task(decoding.text())
        while len(decoding.token_ids) < 3:  # it decodes, one row a step
            await asyncio.sleep(0.01)
        with pytest.raises(EngineError, match="injected"):  # c0's history was on the host
            await turn(engine, "c0", "conversation 0 " * 12 + "and again", records)
        await asyncio.wait_for(text, 60)  # the decode in the same step goes on
        prompt = engine.tokenizer.encode_chat(history)
        eos = tiny.tokenizer.eos_token_ids
        assert decoding.token_ids == reference_generate(tiny.model, prompt, long_sampling, eos)
        await engine.check_accounting()
