"""The scheduler actor: owns the tiered cache, forms each step's unified batch.

Each step: running sequences first (decode rows, then the rest of chunked prefills), then
waiting requests admitted FCFS while the step's token budget and the device tier allow,
keeping a reserve of free blocks so running decodes are rarely suspended. When the device tier
runs low it swaps low-value chunks out ahead of time; when a block is needed it reclaims those
lazily, then evicts idle conversations, and only then suspends the newest running sequence.

It is the only code that touches the cache: conversation resolution, ownership, listing and
statistics are answered here, by message. Whatever goes wrong with one request (a bad
conversation state, an exception while admitting or planning it) fails that request alone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections import deque

from pensieve.actors.base import Actor
from pensieve.actors.scheduler_disk import DiskTier, public_id, scoped
from pensieve.actors.scheduler_questions import Question, Questions
from pensieve.block_allocator import OutOfBlocks
from pensieve.cache import TieredCache
from pensieve.config import EngineConfig
from pensieve.errors import OverloadedError, to_info
from pensieve.kv_events import KvEventTracker
from pensieve.messages import (
    Accepted,
    Cancel,
    Forget,
    LayerProgress,
    LoadDone,
    PersistDone,
    Rejected,
    SequenceRows,
    Shutdown,
    StepPlan,
    StepResult,
    Submit,
    SwapDone,
    SwapOrder,
    TokenEvent,
    Usage,
)
from pensieve.sequence import Rows, Sequence
from pensieve.stats import Counters

log = logging.getLogger("pensieve.scheduler")
TOO_SMALL = "the device cache is too small for this prompt"


class CacheTooSmall(Exception):
    """The request cannot fit the device tier even with everything else evicted."""


class Scheduler(Questions, DiskTier, Actor):
    name = "scheduler"

    def __init__(
        self,
        cache: TieredCache,
        config: EngineConfig,
        max_context: int,
        stop_token_ids: frozenset[int],
        num_layers: int,
        pools: dict | None = None,
        kv_events: KvEventTracker | None = None,
    ):
        super().__init__()
        self.kv_events = kv_events  # tier moves published to vllm-router (kv_aware); None: off
        self.pools = pools  # the KV pools, read between steps only to export and import
        self.cache = cache
        self.config = config
        self.max_context = max_context
        self.stop_token_ids = stop_token_ids
        self.num_layers = num_layers
        self.counters = Counters()
        self.requests: dict[int, Sequence] = {}  # every request not yet finished
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.executor: Actor | None = None
        self.swapper: Actor | None = None
        self.sessions: Actor | None = None
        self.disk: Actor | None = None  # with a state directory: the disk tier's actor
        self.disk_pending = 0  # commits and loads whose answer was not applied yet
        self.step_id = 0
        total = cache.device.num_blocks
        self.reserve_blocks = math.ceil(config.decode_reserve * total)
        self.swap_threshold_blocks = math.ceil(config.swap_out_threshold * total)

    def connect(
        self, executor: Actor, swapper: Actor, sessions: Actor, disk: Actor | None = None
    ) -> None:
        self.executor, self.swapper, self.sessions, self.disk = executor, swapper, sessions, disk

    # ---- mailbox -------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            if self.kv_events is not None:  # what the last step or messages moved between tiers
                self.kv_events.flush(self.cache.conversations)
            if not self.waiting and not self.running:
                await self._on(await self.mailbox.get())
            while not self.mailbox.empty():
                await self._on(self.mailbox.get_nowait())
            if self.waiting or self.running:
                try:
                    worked = await self.step()
                except Exception as exc:  # a bug in the step itself: fail its batch, keep serving
                    log.exception("step failed")
                    for seq in list(self.running):
                        self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
                    worked = True
                if not worked:  # every waiting request waits on something (a disk read)
                    await self._on(await self.mailbox.get())

    async def _on(self, message: object) -> None:
        try:
            await self.handle(message)
        except Exception:  # one bad message must not stop the scheduler
            log.exception("scheduler failed on %s", type(message).__name__)

    async def handle(self, message: object) -> None:
        if isinstance(message, Submit):
            self._submit(message)
        elif isinstance(message, Cancel):
            seq = self.requests.get(message.request_id)
            if seq is not None:
                self._finish(seq, message.reason)
        elif isinstance(message, Question):
            self.answer(message)
        elif isinstance(message, PersistDone | LoadDone):
            self.disk_done(message)
        elif isinstance(message, Shutdown):
            for seq in list(self.requests.values()):
                self._finish(seq, "cancelled")
            await self._drain_disk()
            if self.kv_events is not None:  # subscribers hear that this worker's blocks are gone
                await asyncio.to_thread(self.kv_events.close)
            message.reply.set_result(None)

    def _submit(self, msg: Submit) -> None:
        rid = msg.request_id
        if len(self.waiting) >= self.config.max_queue:
            error = OverloadedError("the server is busy: too many requests waiting")
            self.sessions.send(Rejected(rid, to_info(error)))  # type: ignore[union-attr]
            return
        key = None
        if msg.conversation_id is not None:
            key = scoped(msg.tenant, msg.conversation_id)
        elif msg.match_prefix:
            key = self.cache.resolve(msg.prompt_tokens, msg.tenant)[0]
        key = key or scoped(msg.tenant, secrets.token_hex(16))  # 128 random bits: unguessable
        seq = Sequence.from_submit(msg, key, self.max_context, self.stop_token_ids)
        # the first request on a conversation holds it; later ones wait for it (FCFS)
        if self.cache.acquire(key, rid, seq.named, seq.tenant):
            self._reading(key)  # a returning conversation's disk chunks: read them now
        self.requests[rid] = seq
        self.waiting.append(seq)
        self.counters.requests += 1
        self.sessions.send(Accepted(rid, public_id(key)))  # type: ignore[union-attr]

    # ---- one step ------------------------------------------------------------------------

    async def step(self) -> bool:
        """One forward step; False if there was nothing to run."""
        rows: list[Rows] = []
        budget = self.config.max_batch_tokens
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget <= 0:
                break
            if seq not in self.running:  # suspended to make room for an older one
                continue
            take = seq.pending[:budget]
            try:
                if not await self._ensure_slots(seq, take):
                    continue
            except Exception as exc:
                self._fail(seq, exc)
                continue
            rows.append((seq, take))
            budget -= len(take)
        await self._admit(rows, budget)
        plan = self._plan_rows(rows)
        rows = [(seq, take) for seq, take in rows if seq.request_id in plan]
        restores = self.cache.take_restores()
        restoring_for = self.cache.restore_owners(restores)
        progress = LayerProgress(self.num_layers) if restores else None
        restoring = self._swap("in", restores, progress) if restores else None
        # queued behind the restore (one copy at a time), overlapping this step's compute
        ahead = self._swap_out_ahead() if rows else None
        result = None
        try:
            if rows:
                result = await self._execute(list(plan.values()), progress)
        finally:
            restore_error = await self._settle("in", restores, restoring)
            if ahead is not None:
                await self._settle("out", *ahead)
        if result is None:
            return bool(restores)
        if restore_error is not None:  # the turns whose history did not land fail; the rest rerun
            error = f"restoring the cached history failed: {restore_error}"
            for seq, _ in rows:
                if seq.conversation_id in restoring_for:
                    self._finish(seq, "error", error=error)
            return True
        if result.error is not None:
            for seq, _ in rows:
                self._finish(seq, "error", error=result.error)
            return True
        self._advance(rows, result)
        return True

    def _plan_rows(self, rows: list[Rows]) -> dict[int, SequenceRows]:
        """Each sequence's part of the step; a sequence whose plan fails is failed alone."""
        plan = {}
        for seq, take in rows:
            try:
                table = self.cache.block_table(seq.conversation_id)
                plan[seq.request_id] = seq.step_rows(take, table)
            except Exception as exc:
                self._fail(seq, exc)
        return plan

    async def _execute(
        self, rows: list[SequenceRows], progress: LayerProgress | None
    ) -> StepResult:
        self.step_id += 1
        reply = asyncio.get_running_loop().create_future()
        self.executor.send(StepPlan(self.step_id, rows, reply, progress))  # type: ignore[union-attr]
        result: StepResult = await reply
        self.counters.steps += 1
        return result

    def _advance(self, rows: list[Rows], result: StepResult) -> None:
        for seq, take in rows:
            if seq not in self.running:  # cancelled while the step ran
                continue
            self.cache.commit(seq.conversation_id, take)
            seq.pending = seq.pending[len(take) :]
            token = result.sampled.get(seq.request_id)
            if token is None:
                continue
            seq.generated.append(token)
            self.counters.generated_tokens += 1
            lp = result.logprobs.get(seq.request_id)
            event = TokenEvent(seq.request_id, [token], [lp] if lp is not None else [])
            self.sessions.send(event)  # type: ignore[union-attr]
            reason = seq.finish_reason(self.max_context)
            if reason is not None:
                self._finish(seq, reason)
            else:
                seq.pending = [(token, len(seq.target) - 1)]

    # ---- admission and room --------------------------------------------------------------

    async def _admit(self, rows: list[Rows], budget: int) -> None:
        """Admit waiting requests FCFS; one that fails is failed alone, none is ever lost."""
        skipped: list[Sequence] = []  # their conversation is held by an earlier request
        try:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
                seq = self.waiting.popleft()
                try:
                    taken = await self._admit_one(seq, rows, budget)
                except Exception as exc:
                    self._fail(seq, exc)
                    continue
                if taken is None:
                    skipped.append(seq)
                    continue
                if taken == 0:
                    self.waiting.appendleft(seq)  # no room now: wait for the running ones
                    break
                budget -= taken
        finally:
            self.waiting.extendleft(reversed(skipped))

    async def _admit_one(self, seq: Sequence, rows: list[Rows], budget: int) -> int | None:
        """Tokens it takes in this step; 0 when there is no room yet, None when its
        conversation is busy."""
        cid, cache = seq.conversation_id, self.cache
        if not cache.acquire(cid, seq.request_id, seq.named, seq.tenant) or self._reading(cid):
            return None
        target = seq.target
        _, need = cache.plan_admission(cid, target)
        if need > cache.device.num_blocks:
            raise CacheTooSmall(TOO_SMALL)
        cache.begin(cid)  # pinned while room is made for it
        reserve = self.reserve_blocks if self.running else 0
        if not await self._make_room(need + reserve):
            cache.suspend(cid)
            if self.running or rows or cache.copies_in_flight():
                return 0  # retried after the next step, or once a copy's reply comes in
            raise CacheTooSmall(TOO_SMALL)
        adm = cache.admit(cid, target)
        seq.pending = adm.pending
        if seq.usage is None:
            seq.usage = Usage(len(seq.prompt), 0, adm.cached_tokens, adm.recomputed_tokens)
            self.counters.prompt_tokens += len(seq.prompt)
            self.counters.cached_tokens += adm.cached_tokens
            self.counters.computed_prompt_tokens += len(seq.prompt) - adm.cached_tokens
        self.counters.recomputed_tokens += adm.recomputed_tokens
        self.running.append(seq)
        take = seq.pending[:budget]
        rows.append((seq, take))
        return len(take)

    async def _ensure_slots(self, seq: Sequence, take: list[tuple[int, int]]) -> bool:
        """Blocks for a decode row's new position; suspends newer sequences if it must."""
        last = take[-1][1]
        while True:
            try:
                self.cache.ensure_slot(seq.conversation_id, last)
                return True
            except OutOfBlocks:
                if await self._make_room(1):
                    continue
                victim = max(self.running, key=lambda s: s.arrival)
                self._suspend(victim)
                if victim is seq:
                    return False

    async def _make_room(self, n: int) -> bool:
        """Free device blocks until n are free, in rounds while a round frees any: a drop of a
        leading device-only chunk can make the host-backed chunks behind it reclaimable."""
        cache = self.cache
        while cache.device.num_free < n:
            before = cache.device.num_free
            await self._free_blocks(n)
            if cache.device.num_free == before:
                return False
        return True

    async def _free_blocks(self, n: int) -> None:
        """One round: lazy reclaim, then evict idle conversations (to the host, else to their
        disk files, else dropped)."""
        cache = self.cache
        cache.reclaim(n - cache.device.num_free)
        short = n - cache.device.num_free
        if short > 0 and cache.host is not None:
            copies = cache.plan_swap_out(short)
            if copies:
                await self._settle("out", copies, self._swap("out", copies))
                cache.reclaim(len(copies))
            short = n - cache.device.num_free
        if short > 0:  # no host room: chunks already on disk leave the device before any drop
            cache.reclaim_to_disk(short)
            short = n - cache.device.num_free
        if short > 0:
            cache.drop_leading(short)

    def _swap_out_ahead(self) -> tuple[list[tuple[int, int]], asyncio.Future] | None:
        """Below the threshold, start copying low-value chunks to the host ahead of time.

        The chunks stay valid on device, and their host copies count only once the copy is
        done, so their blocks can only be reclaimed after it."""
        cache = self.cache
        if cache.host is None:
            return None
        free_like = cache.device.num_free + cache.reclaimable()
        if free_like >= self.swap_threshold_blocks:
            return None
        copies = cache.plan_swap_out(self.swap_threshold_blocks - free_like)
        return (copies, self._swap("out", copies)) if copies else None

    def _swap(
        self, direction: str, pairs: list[tuple[int, int]], progress: LayerProgress | None = None
    ) -> asyncio.Future:
        reply = asyncio.get_running_loop().create_future()
        self.swapper.send(SwapOrder(direction, pairs, reply, progress))  # type: ignore[union-attr]
        return reply

    async def _settle(
        self, direction: str, pairs: list[tuple[int, int]], reply: asyncio.Future | None
    ) -> str | None:
        """Wait for a copy and tell the cache whether it landed; None if it did, else why not."""
        if reply is None:
            return None
        done: SwapDone = await reply
        ok = done.error is None
        if not ok:
            log.error("swap-%s of %d blocks failed: %s", direction, len(pairs), done.error)
        if direction == "in":
            self.cache.restore_done(pairs, ok)
            self.counters.swap_in_blocks += done.blocks
        else:
            self.cache.swap_out_done(pairs, ok)
            self.counters.swap_out_blocks += done.blocks
        return done.error

    # ---- endings -------------------------------------------------------------------------

    def _suspend(self, seq: Sequence) -> None:
        """Take a running sequence out of the batch; it resumes from its cached tokens later."""
        self.running.remove(seq)
        self.cache.suspend(seq.conversation_id)
        seq.pending = []
        self.waiting.appendleft(seq)
        self.counters.preemptions += 1

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        if isinstance(exc, CacheTooSmall):
            self._finish(seq, "error", error=str(exc))
            return
        log.exception("request %d failed while being scheduled", seq.request_id)
        self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if self.requests.pop(seq.request_id, None) is None:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        keep = seq.keep_cache and error is None
        self.cache.release(seq.conversation_id, seq.request_id, keep=keep)
        if self.disk is not None:
            self._commit(seq.conversation_id)
        usage = seq.usage or Usage(len(seq.prompt))
        usage.completion_tokens = len(seq.generated)
        self.executor.send(Forget([seq.request_id]))  # type: ignore[union-attr]
        self.sessions.send(  # type: ignore[union-attr]
            TokenEvent(seq.request_id, finish_reason=reason, usage=usage, error=error)
        )
