"""The tiered cache with a disk tier: what to write after a turn, what to read back, and how
a conversation comes back after a restart or an import.

Every finished turn mirrors the conversation's chunks that have no file yet to disk and commits
its record (`plan_persist` / `persist_done`), within a budget of `disk_blocks` chunk files; the
lowest-value disk-only chunks make room. When the host tier must make room, a host copy that
is also on disk is simply freed (the chunk becomes disk-only). A returning conversation's
disk-only chunks are read into host blocks before it is admitted (`plan_load` / `load_done`),
unless recomputing a leading chunk is cheaper than reading it; a file that fails its checksum
is treated as dropped, and everything before it too, so the chunks stay [dropped | ... ].
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import torch

from pensieve.cache import TieredCache, _ceil_div
from pensieve.conversation import Chunk, Conversation
from pensieve.disk_store import PENDING, ChunkRef, ConversationRecord
from pensieve.messages import ChunkWrite
from pensieve.policy import CostModel

Load = tuple[int, ChunkRef, int]  # (chunk index, its file, the host block it is read into)
KV = tuple[torch.Tensor, torch.Tensor]  # one chunk's keys and values, [layers, block, heads, dim]


class DurableCache(TieredCache):
    def __init__(
        self,
        block_size: int,
        device_blocks: int,
        host_blocks: int,
        cost: CostModel,
        disk_blocks: int,
        read_seconds: float = 0.0,
        **kwargs: Callable[[], float],
    ):
        super().__init__(block_size, device_blocks, host_blocks, cost, **kwargs)
        self.disk_blocks = disk_blocks
        self.read_seconds = read_seconds  # time to read one chunk file (profiled at start-up)
        self.checksum_failures = 0
        self._persisting: dict[str, tuple[Conversation, Chunk, tuple[str, int]]] = {}

    # ---- writing ---------------------------------------------------------------------------

    def plan_persist(self, cid: str) -> tuple[ConversationRecord, list[ChunkWrite], list[str]]:
        """The record to commit for a conversation, the chunk files to write first, and the
        files its previous record named that can go. Only full chunks are written (their KV
        never changes; a partly filled tail is recomputed after a restart). Their blocks stay
        busy until `persist_done`."""
        conv = self.conversations[cid]
        refs: list[ChunkRef | None] = []
        writes = []
        for ch in conv.chunks[: len(conv.tokens) // self.block_size]:
            if ch.disk is not None or ch.restoring:
                refs.append(ch.disk)
                continue
            if ch.disk_pending is not None:  # written by an earlier order: the disk actor knows
                refs.append(ChunkRef(ch.disk_pending, PENDING))
                continue
            source = ("host", ch.host) if ch.host is not None else ("device", ch.device)
            if source[1] is None or not self._disk_room():
                refs.append(None)
                continue
            uid = secrets.token_hex(12)
            writes.append(ChunkWrite(len(refs), uid, source[0], source[1]))  # type: ignore[arg-type]
            self._busy[source[0]].add(source[1])  # type: ignore[arg-type]
            ch.disk_pending = uid
            self.disk_used += 1
            self._persisting[uid] = (conv, ch, source)  # type: ignore[assignment]
            refs.append(None)
        record = ConversationRecord(
            cid, list(conv.tokens), conv.last_prompt_len, conv.named, conv.tenant, conv.turns, refs
        )
        stale, conv.stale_files = conv.stale_files, []
        conv.on_disk = True
        return record, writes, stale

    def _disk_room(self) -> bool:
        if self.disk_used < self.disk_blocks:
            return True
        picks = self._pick("disk_drop", 1)
        for conv, i in picks:
            self._free_chunk(conv.chunks[i], conv)
            conv.dropped = i + 1
            self.dropped_chunks += 1
            self._reindex(conv)
        return self.disk_used < self.disk_blocks

    def persist_done(self, refs: dict[int, ChunkRef], writes: list[ChunkWrite], ok: bool) -> None:
        """Files written and the record committed: the chunks' disk copies become valid."""
        touched = []
        for write in writes:
            conv, ch, (tier, block) = self._persisting.pop(write.uid, (None, None, ("", -1)))
            if tier:
                self._unbusy(tier, block)
            if ch is None or ch.disk_pending != write.uid:
                continue  # freed meanwhile: its uid is already among the conversation's stale files
            ch.disk_pending = None
            if ok and write.index in refs:
                ch.disk = refs[write.index]
            else:
                conv.stale_files.append(write.uid)  # type: ignore[union-attr]
                self.disk_used -= 1
            touched.append(conv)
        self._free_deferred()
        self._reindex_all(c for c in touched if c is not None)

    # ---- reading back ---------------------------------------------------------------------

    def plan_load(self, cid: str) -> list[Load]:
        """Host blocks for a returning conversation's disk-only chunks, newest first (they are
        the costliest to recompute); leading ones cheaper to recompute than to read, or that
        find no host room, are dropped instead."""
        conv = self.conversations[cid]
        disk_only = [
            i
            for i in range(conv.dropped, len(conv.chunks))
            if conv.chunks[i].device is None and conv.chunks[i].host is None
        ]
        loads = []
        conv.loading = True  # pinned: making host room must not evict its own chunks
        self._reindex(conv)
        for i in reversed(disk_only):
            if self.cost(i * self.block_size) < self.read_seconds:
                break
            block = self._host_block()
            if block is None:
                break
            ch = conv.chunks[i]
            ch.loading_to = block
            self._busy["host"].add(block)
            loads.append((i, ch.disk, block))
        conv.loading = bool(loads)
        if not loads:
            self._drop_through(conv, disk_only[-1] if disk_only else -1)
        return loads

    def load_done(self, cid: str, loads: list[Load], failed: list[int]) -> None:
        conv = self.conversations.get(cid)
        last_bad = -1
        for i, _, block in loads:
            self._unbusy("host", block)
            ch = conv.chunks[i] if conv is not None and i < len(conv.chunks) else None
            if ch is None or ch.loading_to != block:
                continue  # freed meanwhile (its block with it, once no longer busy)
            ch.loading_to = None
            if i in failed:
                self._free_block("host", block)
                self.checksum_failures += 1
                last_bad = max(last_bad, i)
            else:
                ch.host = block
        self._free_deferred()
        if conv is None:
            return
        conv.loading = False
        unread = [
            i
            for i in range(conv.dropped, len(conv.chunks))
            if conv.chunks[i].device is None and conv.chunks[i].host is None
        ]
        self._drop_through(conv, max([last_bad, *unread]))

    def _drop_through(self, conv: Conversation, last: int) -> None:
        """Drop chunks [dropped, last]: a chunk that cannot be read takes those before it."""
        for i in range(conv.dropped, last + 1):
            self._free_chunk(conv.chunks[i], conv)
        conv.dropped = max(conv.dropped, last + 1)
        self._reindex(conv)

    def needs_load(self, cid: str) -> bool:
        conv = self.conversations.get(cid)
        return conv is not None and any(
            ch.device is None and ch.host is None and ch.disk is not None
            for ch in conv.chunks[conv.dropped :]
        )

    # ---- bringing conversations back ------------------------------------------------------

    def restore_record(self, record: ConversationRecord) -> None:
        """A committed conversation, its KV on disk: [dropped | disk ...] up to the last chunk
        of an unbroken run of files (tokens past it are recomputed when it returns)."""
        refs = record.chunks
        first = next((i for i, r in enumerate(refs) if r is not None), len(refs))
        end = first
        while end < len(refs) and refs[end] is not None:
            end += 1
        tokens = record.tokens[: end * self.block_size] if end else list(record.tokens)
        conv = Conversation(record.key, tokens=tokens, last_active=self.clock())
        conv.chunks = [Chunk(disk=refs[i]) if first <= i < end else Chunk() for i in range(end)]
        if not end:
            conv.chunks = [Chunk() for _ in range(_ceil_div(len(tokens), self.block_size))]
        conv.dropped = first if end else len(conv.chunks)
        conv.last_prompt_len = min(record.last_prompt_len, len(tokens))
        conv.named, conv.tenant, conv.turns = record.named, record.tenant, record.turns
        conv.stale_files = [r.uid for r in refs[end:] if r is not None]
        conv.on_disk = True  # restored from a record, or about to be committed (import)
        self.conversations[record.key] = conv
        self.disk_used += end - first
        if not conv.named:
            self.prefixes.add(conv.id, conv.tokens, conv.last_prompt_len, conv.tenant)
        self._reindex(conv)

    def import_chunks(self, record: ConversationRecord, chunks: list[object], pools: dict) -> None:
        """An exported conversation: its KV chunks ([layers, block, heads, dim] pairs, or None)
        into host blocks, newest first; leading chunks that find no room are dropped."""
        record.chunks = [None] * len(chunks)
        self.restore_record(record)  # every chunk dropped, for now
        conv = self.conversations[record.key]
        conv.loading = True  # pinned while host room is made
        self._reindex(conv)
        host, lowest = pools["host"], len(conv.chunks)
        for i in reversed(range(len(conv.chunks))):
            kv = chunks[i]
            block = self._host_block() if kv is not None else None
            if block is None:
                break
            host.keys[:, block].copy_(kv[0])  # type: ignore[index]
            host.values[:, block].copy_(kv[1])  # type: ignore[index]
            conv.chunks[i].host, lowest = block, i
        conv.dropped, conv.loading = lowest, False
        self._reindex(conv)

    def export(self, cid: str, pools: dict | None) -> tuple[ConversationRecord, list] | None:
        """A conversation's record and a copy of each chunk's KV that is in memory (None where
        it is only on disk or dropped: the importer recomputes those)."""
        conv = self.conversations.get(cid)
        if conv is None or pools is None:
            return None
        record = ConversationRecord(
            cid, list(conv.tokens), conv.last_prompt_len, conv.named, conv.tenant, conv.turns, []
        )
        out: list[KV | None] = []
        for ch in conv.chunks[: _ceil_div(len(conv.tokens), self.block_size)]:
            tier, block = ("host", ch.host) if ch.host is not None else ("device", ch.device)
            if block is None or ch.restoring:
                out.append(None)
                continue
            pool = pools[tier]
            out.append((pool.keys[:, block].cpu().clone(), pool.values[:, block].cpu().clone()))
        return record, out
