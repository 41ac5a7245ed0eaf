"""The scheduler in isolation: fake executor and swapper, fake clock-free cost, real cache."""

from __future__ import annotations

import asyncio

from pensieve.actors.base import Actor
from pensieve.actors.scheduler import Scheduler, scoped
from pensieve.cache import TieredCache
from pensieve.config import EngineConfig
from pensieve.conversation import Conversation
from pensieve.messages import (
    Accepted,
    Cancel,
    Forget,
    Rejected,
    StepPlan,
    StepResult,
    Submit,
    SwapDone,
    SwapOrder,
    TokenEvent,
)
from pensieve.policy import CostModel
from pensieve.sampling import SamplingParams

EOS = 0


class FakeExecutor(Actor):
    """Samples (last input token + 1) for every sequence that asks; records each plan."""

    def __init__(self) -> None:
        super().__init__()
        self.plans: list[StepPlan] = []

    async def handle(self, message: StepPlan | Forget) -> None:
        if isinstance(message, Forget):
            return
        self.plans.append(message)
        sampled = {r.request_id: r.tokens[-1] % 1000 + 1 for r in message.rows if r.sample}
        message.reply.set_result(StepResult(message.step_id, sampled, 0.0))


class FakeSwapper(Actor):
    """Answers every order at once; `fail` makes the next orders of a direction fail."""

    def __init__(self) -> None:
        super().__init__()
        self.orders: list[SwapOrder] = []
        self.fail: set[str] = set()

    async def handle(self, message: SwapOrder) -> None:
        self.orders.append(message)
        if message.direction in self.fail:
            if message.progress is not None:
                message.progress.fail("injected")
            message.reply.set_result(SwapDone(0, 0.0, error="injected copy failure"))
            return
        message.reply.set_result(SwapDone(len(message.pairs), 0.0))


class Sink(Actor):
    """Stands in for the session manager: records what the scheduler tells it."""

    def __init__(self) -> None:
        super().__init__()
        self.events: dict[int, list[TokenEvent]] = {}
        self.accepted: dict[int, str] = {}
        self.rejected: dict[int, Rejected] = {}
        self.finished: dict[int, asyncio.Event] = {}

    def done(self, rid: int) -> asyncio.Event:
        return self.finished.setdefault(rid, asyncio.Event())

    async def handle(self, message: TokenEvent | Accepted | Rejected) -> None:
        if isinstance(message, Accepted):
            self.accepted[message.request_id] = message.conversation_id
        elif isinstance(message, Rejected):
            self.rejected[message.request_id] = message
            self.done(message.request_id).set()
        else:
            self.events.setdefault(message.request_id, []).append(message)
            if message.finish_reason is not None:
                self.done(message.request_id).set()


class Harness:
    def __init__(self, **overrides: object):
        cfg = EngineConfig(
            block_size=4,
            device_cache_tokens=64,
            host_cache_tokens=64,
            max_batch_tokens=16,
            profile_cost=False,
        )
        for key, value in overrides.items():
            setattr(cfg, key, value)
        self.cache = TieredCache(
            cfg.block_size,
            cfg.device_cache_tokens // cfg.block_size,
            cfg.host_cache_tokens // cfg.block_size,
            CostModel.linear(),
        )
        self.scheduler = Scheduler(self.cache, cfg, 10_000, frozenset({EOS}), num_layers=2)
        self.executor, self.swapper, self.sink = FakeExecutor(), FakeSwapper(), Sink()
        self.scheduler.connect(self.executor, self.swapper, self.sink)
        self._next = 0

    async def __aenter__(self) -> Harness:
        for actor in (self.executor, self.swapper, self.sink, self.scheduler):
            actor.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for actor in (self.scheduler, self.executor, self.swapper, self.sink):
            await actor.stop()

    def submit(
        self, cid: str | None, prompt: list[int], max_tokens: int = 3, keep: bool = True
    ) -> int:
        self._next += 1
        sampling = SamplingParams(temperature=0, max_tokens=max_tokens)
        self.scheduler.send(Submit(self._next, cid, prompt, sampling, keep_cache=keep))
        return self._next

    async def wait(self, *rids: int) -> None:
        await asyncio.wait_for(asyncio.gather(*(self.sink.done(r).wait() for r in rids)), 10)

    def tokens(self, rid: int) -> list[int]:
        return [t for e in self.sink.events[rid] for t in e.tokens]

    def conv(self, cid: str) -> Conversation:
        return self.cache.conversations[scoped("", cid)]

    def finish(self, rid: int) -> TokenEvent:
        return self.sink.events[rid][-1]


async def test_no_step_exceeds_budget_and_long_prompts_are_chunked() -> None:
    async with Harness() as h:
        short = h.submit("a", [5, 6, 7], max_tokens=8)
        long = h.submit("b", list(range(10, 50)), max_tokens=2)
        await h.wait(short, long)
        assert all(sum(len(r.tokens) for r in p.rows) <= 16 for p in h.executor.plans)
        prefill_steps = [
            p
            for p in h.executor.plans
            if any(r.request_id == long and len(r.tokens) > 1 for r in p.rows)
        ]
        assert len(prefill_steps) >= 3  # 40 tokens over a 16-token budget
        # the running decode kept flowing while the long prompt was prefilled
        assert all(any(r.request_id == short for r in p.rows) for p in prefill_steps[1:2])
        assert h.tokens(short) == [8, 9, 10, 11, 12, 13, 14, 15]
        h.cache.check()


async def test_second_turn_reuses_first_turn_cache() -> None:
    async with Harness() as h:
        first = h.submit("c", [1, 2, 3, 4, 5])
        await h.wait(first)
        reply = h.tokens(first)
        second = h.submit("c", [1, 2, 3, 4, 5, *reply, 77, 78])
        await h.wait(second)
        usage = h.sink.events[second][-1].usage
        assert usage.cached_tokens == 5 + len(reply) - 1  # the last reply token had no KV yet
        h.cache.check()


async def test_swap_out_ahead_starts_at_threshold() -> None:
    # 16 device blocks, threshold 25% = 4 blocks
    async with Harness(max_batch_tokens=64) as h:
        rid = h.submit("x", list(range(1, 30)), max_tokens=1)  # 8 blocks, 8 free after
        await h.wait(rid)
        assert h.swapper.orders == []
        rid = h.submit("y", list(range(100, 121)), max_tokens=1)  # 6 more: 2 free < 4
        await h.wait(rid)
        outs = [o for o in h.swapper.orders if o.direction == "out"]
        assert outs and sum(len(o.pairs) for o in outs) == 2
        x = h.conv("x")
        assert x.chunks[0].host is not None and x.chunks[0].device is not None  # lazy
        h.cache.check()


async def test_pressure_suspends_newest_and_everything_finishes() -> None:
    async with Harness(
        device_cache_tokens=32, host_cache_tokens=64, max_batch_tokens=32, decode_reserve=0.0
    ) as h:
        rids = [h.submit(f"c{i}", [i + 1] * 6, max_tokens=12) for i in range(3)]
        await h.wait(*rids)
        for rid in rids:
            assert h.sink.events[rid][-1].finish_reason == "length"
            assert len(h.tokens(rid)) == 12
        assert h.scheduler.counters.preemptions > 0  # 15 blocks needed, 8 exist
        h.cache.check()


async def test_cancel_frees_blocks_at_once() -> None:
    async with Harness() as h:
        rid = h.submit("z", [3, 4, 5], max_tokens=10_000)
        while rid not in h.sink.events:  # the first token came back: it is running
            await asyncio.sleep(0)
        h.scheduler.send(Cancel(rid, "cancelled"))
        await h.wait(rid)
        assert h.sink.events[rid][-1].finish_reason == "cancelled"
        conv = h.conv("z")
        assert conv.owner is None and not conv.running
        assert h.cache.device.num_used == -(-len(conv.tokens) // 4)
        h.cache.check()


async def test_exception_in_admission_fails_only_that_request() -> None:
    async with Harness() as h:
        real = h.cache.plan_admission

        def plan_admission(cid: str, target: list[int]) -> tuple[int, int]:
            if cid == scoped("", "bad"):
                raise RuntimeError("injected")
            return real(cid, target)

        h.cache.plan_admission = plan_admission  # type: ignore[method-assign]
        rids = [h.submit("a", [1, 2, 3]), h.submit("bad", [4, 5, 6]), h.submit("b", [7, 8, 9])]
        await h.wait(*rids)
        assert h.finish(rids[1]).finish_reason == "error"
        assert "injected" in (h.finish(rids[1]).error or "")
        for rid in (rids[0], rids[2]):
            assert h.finish(rid).finish_reason == "length" and len(h.tokens(rid)) == 3
        later = h.submit("c", [1, 1, 1])  # and it keeps serving
        await h.wait(later)
        assert h.finish(later).finish_reason == "length"
        assert scoped("", "bad") not in h.cache.conversations
        h.cache.check()


async def test_exception_while_planning_a_row_fails_only_that_request() -> None:
    async with Harness() as h:
        real = h.cache.block_table
        h.cache.block_table = lambda cid: 1 / 0 if cid == scoped("", "bad") else real(cid)  # type: ignore
        rids = [h.submit("a", [1, 2, 3]), h.submit("bad", [4, 5, 6])]
        await h.wait(*rids)
        assert h.finish(rids[0]).finish_reason == "length"
        assert "ZeroDivisionError" in (h.finish(rids[1]).error or "")
        h.cache.check()


async def test_two_requests_on_one_conversation_run_one_after_the_other() -> None:
    for keep in (True, False):  # stateful, and stateless (the first forgets the conversation)
        async with Harness() as h:
            first = h.submit("same", [1, 2, 3], max_tokens=4, keep=keep)
            second = h.submit("same", [1, 2, 3, 4, 5, 6, 7, 9], max_tokens=4, keep=keep)
            await h.wait(first, second)
            assert h.sink.accepted == {first: "same", second: "same"}
            for rid in (first, second):
                assert h.finish(rid).finish_reason == "length" and len(h.tokens(rid)) == 4
            # never in one step together: the second waited for the first to finish
            assert not any(
                {first, second} <= {r.request_id for r in p.rows} for p in h.executor.plans
            )
            assert (scoped("", "same") in h.cache.conversations) == keep
            if keep:
                assert h.finish(second).usage.cached_tokens == 6  # 7 had no KV yet
            h.cache.check()


async def test_full_queue_rejects_new_requests() -> None:
    async with Harness(max_queue=2) as h:
        rids = [h.submit(f"q{i}", [1, 2, 3]) for i in range(3)]  # queued before any step
        await h.wait(*rids)
        assert list(h.sink.rejected) == [rids[2]]
        assert h.sink.rejected[rids[2]].error.kind == "OverloadedError"
        assert all(h.finish(r).finish_reason == "length" for r in rids[:2])


async def test_failed_swap_out_leaves_chunks_on_device() -> None:
    async with Harness(max_batch_tokens=64) as h:
        h.swapper.fail.add("out")
        await h.wait(h.submit("x", list(range(1, 30)), max_tokens=1))
        await h.wait(h.submit("y", list(range(100, 121)), max_tokens=1))  # below the threshold
        assert any(o.direction == "out" for o in h.swapper.orders)
        x = h.conv("x")
        assert all(ch.host is None and ch.device is not None for ch in x.chunks)
        assert h.cache.host is not None and h.cache.host.num_used == 0
        h.cache.check()
        h.swapper.fail.clear()
        again = h.submit("x", list(range(1, 30)) + h.tokens(1) + [5, 6], max_tokens=1)
        await h.wait(again)
        assert h.finish(again).usage.cached_tokens == 29  # the device copy was still good
        h.cache.check()


async def test_failed_restore_fails_the_turn_and_the_retry_recomputes() -> None:
    async with Harness(device_cache_tokens=32, host_cache_tokens=64, max_batch_tokens=32) as h:
        first = h.submit("x", list(range(1, 20)), max_tokens=1)
        await h.wait(first)
        await h.wait(h.submit("y", list(range(40, 60)), max_tokens=1))  # pushes x to the host
        assert any(ch.device is None and ch.host is not None for ch in h.conv("x").chunks)
        h.swapper.fail.add("in")
        prompt = list(range(1, 20)) + h.tokens(first) + [7]
        failed = h.submit("x", prompt, max_tokens=1)
        await h.wait(failed)
        assert h.finish(failed).finish_reason == "error"
        assert scoped("", "x") not in h.cache.conversations  # a failed turn's state is not trusted
        h.cache.check()
        h.swapper.fail.clear()
        retry = h.submit("x", prompt, max_tokens=1)
        await h.wait(retry)
        assert h.finish(retry).finish_reason == "length"
        h.cache.check()


async def test_shutdown_does_not_wait_forever_for_an_unanswered_disk_order(monkeypatch) -> None:
    from pensieve.actors import scheduler_disk
    from pensieve.messages import Shutdown

    monkeypatch.setattr(scheduler_disk, "SHUTDOWN_DRAIN_SECONDS", 0.2)
    async with Harness() as h:
        h.scheduler.disk_pending = 1  # a commit whose answer never comes
        reply = asyncio.get_running_loop().create_future()
        h.scheduler.send(Shutdown(reply=reply))
        await asyncio.wait_for(reply, 5)


async def test_admission_waits_for_a_copy_in_flight_instead_of_refusing() -> None:
    """Room that a copy still holds (here: x's blocks, being written to disk) is freed when the
    copy ends; a turn that needs it waits for that instead of failing as "too large"."""
    async with Harness(device_cache_tokens=32, host_cache_tokens=0, max_batch_tokens=32) as h:
        await h.wait(h.submit("x", list(range(1, 21)), max_tokens=1))
        held = {ch.device for ch in h.conv("x").chunks if ch.device is not None}
        h.cache._busy["device"].update(held)  # as `plan_persist` marks a disk write's source
        y = h.submit("y", list(range(40, 64)), max_tokens=1)  # 6 blocks; 3 are free
        await asyncio.sleep(0.05)
        assert not h.sink.done(y).is_set(), "refused or served while the room was held"
        for block in held:  # the copy ends (`persist_done`), and its reply wakes the scheduler
            h.cache._unbusy("device", block)
        h.cache._free_deferred()
        h.scheduler.send(Cancel(10_000))
        await h.wait(y)
        assert h.finish(y).finish_reason == "length"
        h.cache.check()


async def test_room_made_in_rounds_when_a_drop_uncovers_host_copies() -> None:
    """x = [device only | device + host x4], host full: nothing is reclaimable until the leading
    chunk is dropped, and then its four host-backed chunks are. A turn needing them is served,
    not refused as too large (1 in ~10 invariant runs under load hit this)."""
    async with Harness(device_cache_tokens=32, host_cache_tokens=16, max_batch_tokens=32) as h:
        await h.wait(h.submit("x", list(range(1, 20)), max_tokens=1))
        x = h.conv("x")
        assert h.cache.host is not None and len(x.chunks) == 5
        for ch in x.chunks[1:]:  # as a restore leaves them, behind a recomputed leading chunk
            ch.host = h.cache.host.allocate(1)[0]
        h.cache._reindex(x)
        assert h.cache.host.num_free == 0 and h.cache.reclaimable() == 0
        y = h.submit("y", list(range(40, 64)), max_tokens=1)  # 6 blocks; 3 are free
        await h.wait(y)
        assert h.finish(y).finish_reason == "length", h.finish(y).error
        assert x.dropped == 1 and any(ch.device is None and ch.host is not None for ch in x.chunks)
        h.cache.check()
