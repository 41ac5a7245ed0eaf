"""The scheduler actor: forms each step's unified batch and keeps the tiers in shape.

Each step: running sequences first (decode rows, then the rest of chunked prefills), then
waiting requests admitted FCFS while the step's token budget and the device tier allow,
keeping a reserve of free blocks so running decodes are rarely suspended. When the device tier
runs low it swaps low-value chunks out ahead of time; when a block is needed it reclaims those
lazily, then evicts idle conversations, and only then suspends the newest running sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque

from pensieve.actors.base import Actor, Replies
from pensieve.block_allocator import OutOfBlocks
from pensieve.cache import TieredCache
from pensieve.config import EngineConfig
from pensieve.messages import (
    Cancel,
    DeleteConversation,
    SequenceRows,
    StepPlan,
    StepResult,
    Submit,
    SwapOrder,
    TokenEvent,
    Usage,
)
from pensieve.sequence import Sequence
from pensieve.stats import Counters

log = logging.getLogger("pensieve.scheduler")


class Scheduler(Actor):
    name = "scheduler"

    def __init__(
        self,
        cache: TieredCache,
        config: EngineConfig,
        max_context: int,
        stop_token_ids: frozenset[int],
        replies: Replies,
        counters: Counters,
    ):
        super().__init__()
        self.cache = cache
        self.config = config
        self.max_context = max_context
        self.stop_token_ids = stop_token_ids
        self.replies = replies
        self.counters = counters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.executor: Actor | None = None
        self.swapper: Actor | None = None
        self.sessions: Actor | None = None
        self.step_id = 0
        total = cache.device.num_blocks
        self.reserve_blocks = math.ceil(config.decode_reserve * total)
        self.swap_threshold_blocks = math.ceil(config.swap_out_threshold * total)

    def connect(self, executor: Actor, swapper: Actor, sessions: Actor) -> None:
        self.executor, self.swapper, self.sessions = executor, swapper, sessions

    # ---- mailbox -------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            if not self.waiting and not self.running:
                await self._on(await self.mailbox.get())
            while not self.mailbox.empty():
                await self._on(self.mailbox.get_nowait())
            if self.waiting or self.running:
                try:
                    await self.step()
                except Exception as exc:  # fail the batch, keep serving
                    log.exception("step failed")
                    for seq in list(self.running):
                        self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")

    async def _on(self, message: object) -> None:
        if isinstance(message, Submit):
            self._submit(message)
        elif isinstance(message, Cancel):
            self._cancel(message)
        elif isinstance(message, DeleteConversation):
            self._delete(message)

    def _submit(self, msg: Submit) -> None:
        conv = self.cache.get_or_create(msg.conversation_id)
        conv.named = conv.named or msg.named
        if conv.owner is None:
            conv.owner = msg.request_id
        budget = self.max_context - len(msg.prompt_tokens)
        limit = msg.sampling.max_tokens or budget
        self.counters.requests += 1
        self.waiting.append(
            Sequence(
                request_id=msg.request_id,
                conversation_id=msg.conversation_id,
                prompt=list(msg.prompt_tokens),
                sampling=msg.sampling,
                max_tokens=min(limit, budget),
                stop_token_ids=self.stop_token_ids,
                keep_cache=msg.keep_cache,
                arrival=time.monotonic(),
            )
        )

    def _cancel(self, msg: Cancel) -> None:
        for seq in [*self.running, *self.waiting]:
            if seq.request_id == msg.request_id:
                self._finish(seq, msg.reason)

    def _delete(self, msg: DeleteConversation) -> None:
        cid = msg.conversation_id
        if cid not in self.cache.conversations:
            self.replies.resolve(msg.reply_to, False)
            return
        for seq in [*self.running, *self.waiting]:
            if seq.conversation_id == cid:
                self._finish(seq, "cancelled")
        if cid in self.cache.conversations:
            self.cache.delete(cid)
        self.replies.resolve(msg.reply_to, True)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ------------------------------------------------------------------------

    async def step(self) -> None:
        rows: list[tuple[Sequence, list[tuple[int, int]]]] = []
        budget = self.config.max_batch_tokens
        swap_in: list[tuple[int, int]] = []
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget <= 0:
                break
            if seq not in self.running:  # suspended to make room for an older one
                continue
            take = seq.pending[:budget]
            if not await self._ensure_slots(seq, take):
                continue
            rows.append((seq, take))
            budget -= len(take)
        budget = await self._admit(rows, budget, swap_in)
        if not rows:
            return
        ticket = swap_in_done = None
        if swap_in:
            ticket, swap_in_done = self.replies.open()
            self.swapper.send(SwapOrder(ticket, "in", swap_in))  # type: ignore[union-attr]
        # queued behind the restore (one copy at a time), overlapping this step's compute
        swap_out_done = self._swap_out_ahead()
        result = await self._execute(rows, ticket)
        for done in (swap_in_done, swap_out_done):
            if done is not None:
                with contextlib.suppress(Exception):
                    await done
        self.cache.end_step()
        if result.error is not None:
            for seq, _ in rows:
                self._finish(seq, "error", error=result.error)
            return
        self._advance(rows, result)

    async def _execute(
        self, rows: list[tuple[Sequence, list[tuple[int, int]]]], ticket: int | None
    ) -> StepResult:
        plan_rows = []
        for seq, take in rows:
            cid = seq.conversation_id
            positions = [p for _, p in take]
            plan_rows.append(
                SequenceRows(
                    request_id=seq.request_id,
                    tokens=[t for t, _ in take],
                    positions=positions,
                    slots=[self.cache.slot(cid, p) for p in positions],
                    block_table=self.cache.block_table(cid),
                    context_len=max(positions) + 1,
                    sample=len(take) == len(seq.pending),
                    sampling=seq.sampling,
                )
            )
        self.step_id += 1
        reply_to, done = self.replies.open()
        self.executor.send(StepPlan(self.step_id, plan_rows, ticket, reply_to))  # type: ignore[union-attr]
        result: StepResult = await done
        self.counters.steps += 1
        self.counters.step_seconds += result.seconds
        return result

    def _advance(
        self, rows: list[tuple[Sequence, list[tuple[int, int]]]], result: StepResult
    ) -> None:
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
            self.sessions.send(TokenEvent(seq.request_id, [token]))  # type: ignore[union-attr]
            reason = seq.finish_reason(self.max_context)
            if reason is not None:
                self._finish(seq, reason)
            else:
                seq.pending = [(token, len(seq.target) - 1)]

    # ---- admission and room --------------------------------------------------------------

    async def _admit(
        self, rows: list[tuple[Sequence, list[tuple[int, int]]]], budget: int, swap_in: list
    ) -> int:
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            seq = self.waiting.popleft()
            conv = self.cache.conversations[seq.conversation_id]
            if conv.owner not in (None, seq.request_id):  # its conversation is busy: wait
                skipped.append(seq)
                continue
            conv.owner = seq.request_id
            target = seq.target
            lcp = self.cache.reusable_prefix(conv, target)
            need = self.cache.blocks_needed(conv, len(target), lcp)
            reserve = self.reserve_blocks if self.running else 0
            conv.running = True  # pin it while room is made for it
            ok = need <= self.cache.device.num_blocks and await self._make_room(need + reserve)
            conv.running = False
            if not ok:
                self.waiting.appendleft(seq)  # _finish expects it queued
                if need > self.cache.device.num_blocks or (not self.running and not rows):
                    self._finish(
                        seq, "error", error="the device cache is too small for this prompt"
                    )
                    continue
                break
            adm = self.cache.admit(seq.conversation_id, target)
            seq.pending = adm.pending
            swap_in += adm.swap_in
            if seq.usage is None:
                seq.usage = Usage(len(seq.prompt), 0, adm.cached_tokens, adm.recomputed_tokens)
                self.counters.prompt_tokens += len(seq.prompt)
                self.counters.cached_tokens += adm.cached_tokens
                self.counters.computed_prompt_tokens += len(seq.prompt) - adm.cached_tokens
            self.counters.recomputed_tokens += adm.recomputed_tokens
            self.running.append(seq)
            take = seq.pending[:budget]
            rows.append((seq, take))
            budget -= len(take)
        self.waiting.extendleft(reversed(skipped))
        return budget

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
        """Free device blocks until n are free: lazy reclaim, then evict idle conversations."""
        cache = self.cache
        short = n - cache.device.num_free
        if short <= 0:
            return True
        cache.reclaim(short)
        short = n - cache.device.num_free
        if short > 0 and cache.host is not None:
            eviction = cache.plan_swap_out(short)
            if eviction.copies:
                await self._swap_out(eviction.copies)
                cache.reclaim(len(eviction.copies))
            short = n - cache.device.num_free
        if short > 0:
            cache.drop_leading(short)
        return cache.device.num_free >= n

    def _swap_out_ahead(self) -> asyncio.Future | None:
        """Below the threshold, start copying low-value chunks to the host ahead of time.

        The chunks stay valid on device; the scheduler waits for the copy before it plans the
        next step, so their blocks are only reclaimed once the host copy exists."""
        cache = self.cache
        if cache.host is None:
            return None
        free_like = cache.device.num_free + cache.reclaimable()
        if free_like >= self.swap_threshold_blocks:
            return None
        eviction = cache.plan_swap_out(self.swap_threshold_blocks - free_like)
        return self._swap_out(eviction.copies) if eviction.copies else None

    def _swap_out(self, copies: list[tuple[int, int]]) -> asyncio.Future:
        ticket, done = self.replies.open()
        self.swapper.send(SwapOrder(ticket, "out", copies))  # type: ignore[union-attr]
        return done

    # ---- endings -------------------------------------------------------------------------

    def _suspend(self, seq: Sequence) -> None:
        """Take a running sequence out of the batch; it resumes from its cached tokens later."""
        self.running.remove(seq)
        self.cache.release(seq.conversation_id)
        self.cache.conversations[seq.conversation_id].owner = seq.request_id
        seq.pending = []
        self.waiting.appendleft(seq)
        self.counters.preemptions += 1

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            return
        conv = self.cache.conversations.get(seq.conversation_id)
        if conv is not None and conv.owner == seq.request_id:
            conv.turns += 1
            self.cache.release(seq.conversation_id, keep=seq.keep_cache and error is None)
        usage = seq.usage or Usage(len(seq.prompt))
        usage.completion_tokens = len(seq.generated)
        self.executor.send([seq.request_id])  # type: ignore[union-attr]
        self.sessions.send(  # type: ignore[union-attr]
            TokenEvent(seq.request_id, finish_reason=reason, usage=usage, error=error)
        )

    async def stop(self) -> None:
        await super().stop()
        for seq in [*self.running, *self.waiting]:
            self._finish(seq, "cancelled")
        await asyncio.sleep(0)
