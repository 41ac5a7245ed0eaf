"""The scheduler's answers to the engine's questions about conversations and the cache: list,
delete, stats, the accounting check, export and import. Part of the scheduler actor (a mixin of
`Scheduler`, split off to keep one file readable); it runs on the scheduler's task only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pensieve.actors.scheduler_disk import public_id, scoped
from pensieve.compute_thread import single_threaded_torch
from pensieve.messages import (
    CheckAccounting,
    DeleteConversation,
    ExportConversation,
    GetStats,
    ImportConversation,
    ListConversations,
)
from pensieve.stats import ConversationInfo, conversation_info, engine_stats

if TYPE_CHECKING:
    from pensieve.durable import DurableCache
    from pensieve.sequence import Sequence
    from pensieve.stats import Counters

Question = (
    DeleteConversation
    | ListConversations
    | GetStats
    | CheckAccounting
    | ExportConversation
    | ImportConversation
)


class Questions:
    """The Scheduler's question answering (its state lives on the Scheduler)."""

    cache: DurableCache
    counters: Counters
    requests: dict[int, Sequence]
    running: list[Sequence]
    pools: dict | None

    def answer(self, message: Question) -> None:
        """Set the question's reply future to the answer."""
        if isinstance(message, DeleteConversation):
            key = scoped(message.tenant, message.conversation_id)
            message.reply.set_result(self._delete(key))
        elif isinstance(message, ListConversations):
            message.reply.set_result(self._list(message.tenant, message.conversation_id))
        elif isinstance(message, GetStats):
            waiting = len(self.waiting)  # type: ignore[attr-defined]
            stats = engine_stats(self.counters, self.cache, len(self.running), waiting)
            message.reply.set_result(stats)
        elif isinstance(message, CheckAccounting):
            try:
                self.cache.check()
                message.reply.set_result(None)
            except AssertionError as exc:
                message.reply.set_result(str(exc) or "accounting check failed")
        elif isinstance(message, ExportConversation):
            key = scoped(message.tenant, message.conversation_id)
            with single_threaded_torch():  # KV copies on the event loop's thread
                message.reply.set_result(self.cache.export(key, self.pools))
        else:
            with single_threaded_torch():
                message.reply.set_result(self._import(message))  # type: ignore[attr-defined]

    def _list(self, tenant: str, cid: str | None) -> list[ConversationInfo]:
        known = self.cache.conversations
        keys = [scoped(tenant, cid)] if cid else [k for k, c in known.items() if c.tenant == tenant]
        return [conversation_info(self.cache, k, public_id(k)) for k in keys if k in known]

    def _delete(self, cid: str) -> bool:
        if cid not in self.cache.conversations:
            return False
        for seq in [s for s in self.requests.values() if s.conversation_id == cid]:
            self._finish(seq, "cancelled")  # type: ignore[attr-defined]
        if cid in self.cache.conversations:
            self.cache.delete(cid)
        self._forget_on_disk()  # type: ignore[attr-defined]
        return True
