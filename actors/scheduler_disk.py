"""The scheduler's disk tier and import: commits after each turn, reads before a returning
conversation is admitted, and imported conversations. Part of the scheduler actor (a mixin of
`Scheduler`, split off to keep one file readable); it runs on the scheduler's task only."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pensieve.messages import (
    ForgetOnDisk,
    ImportConversation,
    LoadDone,
    LoadOrder,
    PersistDone,
    PersistOrder,
)

SHUTDOWN_DRAIN_SECONDS = 60.0
log = logging.getLogger("pensieve.scheduler")

if TYPE_CHECKING:
    from pensieve.actors.base import Actor
    from pensieve.durable import DurableCache
    from pensieve.stats import Counters


def scoped(tenant: str, cid: str) -> str:
    """The cache's key of a tenant's conversation: two tenants may both use `chat-1`."""
    return f"{tenant}\x00{cid}"


def public_id(key: str) -> str:
    return key.partition("\x00")[2]


class DiskTier:
    """The Scheduler's methods for the disk tier (its state lives on the Scheduler)."""

    cache: DurableCache
    counters: Counters
    disk: Actor | None
    disk_pending: int
    mailbox: asyncio.Queue
    pools: dict | None

    def _import(self, msg: ImportConversation) -> str | None:
        """Make an exported conversation this server's; an error text if it cannot be now."""
        key = scoped(msg.tenant, msg.conversation_id)
        if self.pools is None or self.cache.host is None:
            return "importing needs a host tier (stateful mode)"
        if self.cache.owner(key) is not None:
            return f"conversation {msg.conversation_id!r} is in use"
        if key in self.cache.conversations:
            self.cache.delete(key)
        msg.record.key, msg.record.tenant = key, msg.tenant
        self.cache.import_chunks(msg.record, msg.chunks, self.pools)  # type: ignore[attr-defined]
        if self.disk is not None:
            self._commit(key)
        return None

    # ---- the disk tier -------------------------------------------------------------------

    def _commit(self, cid: str) -> None:
        """After a turn: write the conversation's new full chunks and commit its record."""
        self._forget_on_disk()
        if cid not in self.cache.conversations:
            return
        record, writes, stale = self.cache.plan_persist(cid)  # type: ignore[attr-defined]
        self._ask_disk(PersistOrder, record=record, writes=writes, stale=stale)

    def _reading(self, cid: str) -> bool:
        """True while the conversation's disk chunks are being read back (starting it here)."""
        conv = self.cache.conversations.get(cid)
        if self.disk is None or conv is None:
            return False
        if not conv.loading and not conv.running and self.cache.needs_load(cid):  # type: ignore[attr-defined]
            loads = self.cache.plan_load(cid)  # type: ignore[attr-defined]
            if loads:
                self._ask_disk(LoadOrder, key=cid, loads=loads)
        return conv.loading

    def _ask_disk(self, make: type, **fields: object) -> None:
        """Send an order to the disk actor; its answer comes back through the mailbox."""
        reply = asyncio.get_running_loop().create_future()
        self.disk_pending += 1
        reply.add_done_callback(lambda done: self.send(done.result()))
        self.disk.send(make(reply=reply, **fields))  # type: ignore[union-attr]

    async def _drain_disk(self) -> None:
        """Until every finished turn is committed to disk, within SHUTDOWN_DRAIN_SECONDS: an
        answer that never comes must not hold the shutdown forever."""
        deadline = asyncio.get_running_loop().time() + SHUTDOWN_DRAIN_SECONDS
        while self.disk_pending:
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(self.mailbox.get(), max(left, 0.0))
            except asyncio.TimeoutError:
                log.error("shutdown: %d disk orders unanswered, not waiting", self.disk_pending)
                return
            await self.handle(message)  # type: ignore[attr-defined]

    def disk_done(self, done: PersistDone | LoadDone) -> None:
        """Apply a commit's or a load's outcome to the cache."""
        self.disk_pending -= 1
        if isinstance(done, LoadDone):
            self.cache.load_done(done.key, done.loads, done.failed)  # type: ignore[attr-defined]
            self.counters.disk_reads += len(done.loads) - len(done.failed)
            return
        self.cache.persist_done(done.refs, done.writes, done.error is None)  # type: ignore[attr-defined]
        self.counters.disk_writes += len(done.refs)
        self.counters.commit_lag_seconds = done.seconds
        self._forget_on_disk()

    def _forget_on_disk(self) -> None:
        if self.disk is None:
            self.cache.forgotten.clear()
        for key, uids in self.cache.forgotten:
            self.disk.send(ForgetOnDisk(key, uids))  # type: ignore[union-attr]
        self.cache.forgotten.clear()
