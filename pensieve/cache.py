"""The tiered conversation cache: which chunk of which conversation sits in which tier.

A conversation's KV is cut into chunks of one block each. An idle conversation's chunks lie as
[dropped | host only | device + host copy | device only] (after a recompute, the recomputed
leading range sits on device alone in front): the oldest tokens go first, to the host tier and
then away, so a returning conversation restores a contiguous middle and recomputes only a
leading range. The scheduler owns this object (only its task calls it).

Two rules keep the tiers honest while copies run: a copy is only a plan until the swapper
reports it done (`swap_out_done`, `restore_done`), so a chunk's host copy or restored device
block counts as valid only after its bytes landed, and a failed copy leaves the chunk where it
was; and a block that a copy still reads or writes is never reused before that copy ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

from pensieve.block_allocator import BlockAllocator, OutOfBlocks
from pensieve.conversation import Admission, Chunk, Conversation
from pensieve.policy import CostModel, EvictionIndex
from pensieve.prefix_index import PrefixIndex, common_prefix

# the ways a chunk leaves a tier: a disk copy deleted, a host copy freed (it has a disk copy) or
# dropped, a device block freed (it has a host copy), copied out, or dropped
KINDS = ("disk_drop", "host_reclaim", "host_drop", "reclaim", "swap", "disk_reclaim", "drop")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class TierListener(Protocol):
    """Told which conversations' chunks may have changed tier (the scheduler's KV events)."""

    def changed(self, cid: str) -> None: ...

    def grew(self, cid: str) -> None:  # only tokens were appended, on the device
        ...


class TieredCache:
    def __init__(
        self,
        block_size: int,
        device_blocks: int,
        host_blocks: int,
        cost: CostModel,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.block_size = block_size
        self.device = BlockAllocator(device_blocks)
        self.host = BlockAllocator(host_blocks) if host_blocks > 0 else None
        self.cost = cost
        self.clock = clock
        self.conversations: dict[str, Conversation] = {}
        self.prefixes = PrefixIndex()  # idle, unnamed conversations by their last prompt
        self.evictable = {kind: EvictionIndex(cost, block_size) for kind in KINDS}
        self.dropped_chunks = 0  # chunks whose KV was dropped (their tokens kept), ever
        self._outgoing: dict[int, tuple[Conversation, Chunk]] = {}  # host block -> swap-out
        self._restoring: dict[int, tuple[Conversation, Chunk]] = {}  # device block -> restore
        self._restores: list[tuple[int, int]] = []  # planned restores not yet handed out
        self._busy: dict[str, set[int]] = {"device": set(), "host": set()}  # a copy uses them
        self._deferred: list[tuple[str, int]] = []  # freed while busy: freed when the copy ends
        self.disk_used = 0  # chunks with a disk file, written or being written
        self.forgotten: list[tuple[str, list[str]]] = []  # deleted conversations' disk files
        self.listener: TierListener | None = None

    # ---- ownership ------------------------------------------------------------------------

    def acquire(self, cid: str, request_id: int, named: bool = False, tenant: str = "") -> bool:
        """Let `request_id` hold the conversation (created if new); False while another does."""
        conv = self.conversations.get(cid)
        if conv is None:
            conv = Conversation(cid, last_active=self.clock(), tenant=tenant)
            self.conversations[cid] = conv
        elif conv.owner not in (None, request_id):
            return False
        conv.owner = request_id
        conv.named = conv.named or named
        self.prefixes.remove(cid)
        return True

    def owner(self, cid: str) -> int | None:
        conv = self.conversations.get(cid)
        return conv.owner if conv is not None else None

    def release(self, cid: str, request_id: int, keep: bool = True) -> None:
        """The request is done with its conversation: free what it cannot reuse; with
        `keep=False` (stateless mode, a failed turn) or nothing cached, forget it."""
        conv = self.conversations.get(cid)
        if conv is None or conv.owner != request_id:
            return
        conv.turns += 1
        self._park(conv)
        if not keep or not conv.tokens:
            self.delete(cid)
            return
        conv.owner = None
        if not conv.named:
            self.prefixes.add(cid, conv.tokens, conv.last_prompt_len, conv.tenant)

    def resolve(self, prompt: list[int], tenant: str = "") -> tuple[str | None, int]:
        """The idle conversation this prompt continues, and the tokens they share.

        The prompt must repeat the conversation's whole last prompt (a client resending its
        history does), so conversations sharing only a system prompt are never taken for one.
        Conversations a client named are only ever continued by that name, and only the
        tenant's own conversations are considered."""
        best, best_len = None, 0
        for cid, length in self.prefixes.candidates(prompt, tenant):
            n = common_prefix(self.conversations[cid].tokens, prompt)
            if n >= length and n > best_len:
                best, best_len = cid, n
        return best, best_len

    def delete(self, cid: str) -> None:
        conv = self.conversations.pop(cid)
        for ch in conv.chunks:
            self._free_chunk(ch, conv)
        self.prefixes.remove(cid)
        self._reindex(conv)
        if conv.on_disk:  # its record and files go too
            self.forgotten.append((cid, conv.stale_files))

    # ---- admission and progress ---------------------------------------------------------

    def begin(self, cid: str) -> None:
        """The conversation's request is being admitted: pin its chunks to their tiers."""
        conv = self.conversations[cid]
        conv.running = True
        self._reindex(conv)

    def suspend(self, cid: str) -> None:
        """Its request leaves the batch but keeps the conversation (it resumes later)."""
        self._park(self.conversations[cid])

    def _blocks_needed(self, conv: Conversation, target_len: int, lcp: int) -> int:
        n_chunks = _ceil_div(target_len, self.block_size)
        kept = _ceil_div(lcp, self.block_size)
        have = sum(1 for ch in conv.chunks[: min(kept, n_chunks)] if ch.device is not None)
        return n_chunks - have

    def plan_admission(self, cid: str, target: list[int]) -> tuple[int, int]:
        """(reusable prefix, device blocks needed) for making `target` the history."""
        conv = self.conversations[cid]
        lcp = min(common_prefix(conv.tokens, target), len(target) - 1)
        return lcp, self._blocks_needed(conv, len(target), lcp)

    def admit(self, cid: str, target: list[int]) -> Admission:
        """Make `target` this conversation's token list: reuse the common prefix, plan its
        restore to the device tier, and return the inputs still to compute. Raises OutOfBlocks."""
        conv = self.conversations[cid]
        lcp, need = self.plan_admission(cid, target)
        self._truncate(conv, lcp)
        if need > self.device.num_free:
            raise OutOfBlocks(f"admission needs {need} device blocks, {self.device.num_free} free")
        swap_in = []
        for ch in conv.chunks:
            if ch.device is None:
                (ch.device,) = self.device.allocate(1)
                if ch.host is not None:
                    ch.restoring = True
                    swap_in.append((ch.host, ch.device))
                    self._restoring[ch.device] = (conv, ch)
                    self._busy["host"].add(ch.host)
                    self._busy["device"].add(ch.device)
        self._restores += swap_in
        while len(conv.chunks) * self.block_size < len(target):
            conv.chunks.append(Chunk(device=self.device.allocate(1)[0]))
        if lcp % self.block_size:  # the chunk the prompt continues will change: its copies go stale
            tail = conv.chunks[lcp // self.block_size]
            if tail.host is not None:
                self._free_block("host", tail.host)  # after its restore, if one reads it
                tail.host = None
            self._forget_file(conv, tail)
        recompute = min(conv.dropped * self.block_size, lcp)
        conv.recompute_end, conv.recomputed = recompute, 0
        conv.running = True
        conv.last_prompt_len = len(target)
        pending = [(target[p], p) for p in range(recompute)]
        pending += [(target[p], p) for p in range(lcp, len(target))]
        self._moved(conv)
        return Admission(pending, swap_in, lcp - recompute, recompute)

    def take_restores(self) -> list[tuple[int, int]]:
        """The (host, device) copies admissions planned since the last call, still wanted."""
        out = [(h, d) for h, d in self._restores if d in self._restoring]
        self._restores.clear()
        return out

    def restore_owners(self, pairs: Iterable[tuple[int, int]]) -> set[str]:
        """The conversations these restores are for."""
        return {self._restoring[d][0].id for _, d in pairs if d in self._restoring}

    def restore_done(self, pairs: Iterable[tuple[int, int]], ok: bool) -> None:
        """A restore ended: its device blocks now hold the KV, or (failed) go back free and
        the chunks stay host-only."""
        for host, device in pairs:
            self._unbusy("host", host)
            self._unbusy("device", device)
            conv, ch = self._restoring.pop(device, (None, None))
            if ch is None:
                continue
            ch.restoring = False
            if not ok:
                self._free_block("device", device)
                ch.device = None
            self._moved(conv)  # type: ignore[arg-type]
        self._free_deferred()

    def _truncate(self, conv: Conversation, n_tokens: int) -> None:
        """Forget everything past the first n_tokens (a diverging history)."""
        keep = _ceil_div(n_tokens, self.block_size)
        for ch in conv.chunks[keep:]:
            self._free_chunk(ch, conv)
        del conv.chunks[keep:]
        del conv.tokens[n_tokens:]
        conv.dropped = min(conv.dropped, keep)

    def ensure_slot(self, cid: str, position: int) -> None:
        """Give a decoding sequence a block for `position`. Raises OutOfBlocks."""
        conv = self.conversations[cid]
        while len(conv.chunks) * self.block_size <= position:
            conv.chunks.append(Chunk(device=self.device.allocate(1)[0]))

    def commit(self, cid: str, inputs: list[tuple[int, int]]) -> None:
        """Record that the KV of these (token, position) inputs is now written."""
        conv = self.conversations[cid]
        recomputing = conv.recompute_end > 0
        for token, pos in inputs:
            if pos < conv.recompute_end:
                conv.recomputed = max(conv.recomputed, pos + 1)
            elif pos == len(conv.tokens):
                conv.tokens.append(token)
            else:
                raise AssertionError(f"{cid}: position {pos} written out of order")
        if conv.recompute_end and conv.recomputed >= conv.recompute_end:
            conv.dropped = conv.recompute_end = conv.recomputed = 0
        conv.last_active = self.clock()
        if recomputing:  # the recomputed range is at the front
            self._moved(conv)
        elif self.listener is not None:
            self.listener.grew(cid)

    def block_table(self, cid: str) -> list[int]:
        return [ch.device if ch.device is not None else -1 for ch in self.conversations[cid].chunks]

    def _park(self, conv: Conversation) -> None:
        """Out of the batch: free blocks past its tokens and an unfinished recompute's range."""
        keep_chunks = _ceil_div(len(conv.tokens), self.block_size)
        for ch in conv.chunks[keep_chunks:]:
            self._free_chunk(ch, conv)
        del conv.chunks[keep_chunks:]
        if conv.recompute_end:  # an unfinished recompute leaves its range dropped again
            for ch in conv.chunks[: conv.dropped]:
                self._free_chunk(ch, conv)
            conv.recompute_end = conv.recomputed = 0
        conv.running = False
        conv.last_active = self.clock()
        self._reindex(conv)

    # ---- blocks ---------------------------------------------------------------------------

    def _allocator(self, tier: str) -> BlockAllocator:
        return self.device if tier == "device" else self.host  # type: ignore[return-value]

    def _free_block(self, tier: str, block: int) -> None:
        if block in self._busy[tier]:
            self._deferred.append((tier, block))
        else:
            self._allocator(tier).free(block)

    def _unbusy(self, tier: str, block: int) -> None:
        self._busy[tier].discard(block)

    def _free_deferred(self) -> None:
        still = [(t, b) for t, b in self._deferred if b in self._busy[t]]
        for tier, block in self._deferred:
            if block not in self._busy[tier]:
                self._allocator(tier).free(block)
        self._deferred = still

    def _free_chunk(self, ch: Chunk, conv: Conversation) -> None:
        if ch.device is not None:
            self._restoring.pop(ch.device, None)
            self._free_block("device", ch.device)
        for block in (ch.host, ch.copy_to, ch.loading_to):
            if block is not None:
                self._outgoing.pop(block, None)
                self._free_block("host", block)
        ch.device = ch.host = ch.copy_to = ch.loading_to = None
        ch.restoring = False
        self._forget_file(conv, ch)

    def _forget_file(self, conv: Conversation, ch: Chunk) -> None:
        """The chunk's disk file (written or being written) no longer holds its KV."""
        for uid in (ch.disk.uid if ch.disk is not None else None, ch.disk_pending):
            if uid is not None:
                conv.stale_files.append(uid)
                self.disk_used -= 1
        ch.disk = ch.disk_pending = None

    # ---- eviction ------------------------------------------------------------------------

    def _runs(self, conv: Conversation) -> dict[str, tuple[int, int]]:
        """Per kind, the run of chunks that may leave next: (first, count). Only leading runs
        count: a recomputed prefix can sit on device alone before restored chunks."""
        chunks, end = conv.chunks, len(conv.chunks)

        def run(start: int, test: Callable[[Chunk], bool]) -> int:
            i = start
            while i < end and test(chunks[i]):
                i += 1
            return i

        def device_only(ch: Chunk) -> bool:
            return ch.device is not None and ch.host is None and ch.copy_to is None

        def host_only(ch: Chunk) -> bool:
            return ch.device is None and ch.host is not None

        d = conv.dropped
        k = run(d, lambda ch: ch.device is None and ch.host is None)  # [d, k): on disk only
        h = run(k, host_only)  # [k, h): host only
        c = run(h, lambda ch: ch.device is not None and ch.host is not None)  # [h, c): both
        i = run(c, lambda ch: ch.copy_to is not None)  # [c, i): being copied out right now
        no_file = run(d, lambda ch: host_only(ch) and ch.disk is None) if k == d else d
        return {
            "disk_drop": (d, k - d),
            "host_reclaim": (k, run(k, lambda ch: host_only(ch) and ch.disk is not None) - k),
            "host_drop": (d, no_file - d),
            "reclaim": (h, c - h),
            "swap": (i, run(i, device_only) - i),
            "disk_reclaim": (i, run(i, lambda ch: device_only(ch) and ch.disk is not None) - i),
            "drop": (d, run(d, device_only) - d),
        }

    def _moved(self, conv: Conversation) -> None:
        if self.listener is not None:
            self.listener.changed(conv.id)

    def _reindex(self, conv: Conversation) -> None:
        """Refresh the conversation's eviction candidates (none while running or deleted); every
        tier move of an idle conversation passes here, so the listener hears of it too."""
        self._moved(conv)
        live = not (conv.running or conv.loading) and self.conversations.get(conv.id) is conv
        runs = self._runs(conv) if live else dict.fromkeys(KINDS, (0, 0))
        for kind, (first, count) in runs.items():
            self.evictable[kind].set(conv.id, first, count, conv.last_active)

    def _pick(self, kind: str, n: int) -> list[tuple[Conversation, int]]:
        picks = self.evictable[kind].lowest(n, self.clock())
        return [(self.conversations[cid], chunk) for cid, chunk in picks]

    def copies_in_flight(self) -> bool:
        """Device blocks that a copy still reads or writes (a disk write, a restore): room that
        cannot be made now may exist once it ends."""
        return bool(self._busy["device"])

    def reclaimable(self) -> int:
        """Device blocks that also have a host copy (freed lazily, only when needed)."""
        return self.evictable["reclaim"].total

    def reclaim(self, n: int) -> int:
        """Free up to n device blocks whose chunks already have a host copy, lowest value first."""
        return self._leave_device("reclaim", n)

    def reclaim_to_disk(self, n: int) -> int:
        """Free up to n device blocks whose chunks are on disk (no host copy), lowest value
        first: they stay disk-only and are read back when their conversation returns, where a
        drop would throw the file away and recompute them."""
        return self._leave_device("disk_reclaim", n)

    def _leave_device(self, kind: str, n: int) -> int:
        picks = self._pick(kind, n)
        for conv, i in picks:
            ch = conv.chunks[i]
            self._free_block("device", ch.device)  # type: ignore[arg-type]
            ch.device = None
        self._reindex_all(conv for conv, _ in picks)
        return len(picks)

    def _host_block(self) -> int | None:
        """A free host block. When the tier is full: free the lowest-value host copy that is
        also on disk, else drop the lowest-value leading host-only chunk."""
        if self.host is None:
            return None
        if self.host.num_free == 0:
            for kind in ("host_reclaim", "host_drop"):
                victims = self._pick(kind, 1)
                if victims:
                    break
            else:
                return None
            conv, i = victims[0]
            ch = conv.chunks[i]
            if kind == "host_reclaim":
                self._free_block("host", ch.host)  # type: ignore[arg-type]
                ch.host = None
            else:
                self._free_chunk(ch, conv)
                conv.dropped = i + 1
                self.dropped_chunks += 1
            self._reindex(conv)
            if self.host.num_free == 0:  # its block is still read by a copy
                return None
        return self.host.allocate(1)[0]

    def plan_swap_out(self, n: int) -> list[tuple[int, int]]:
        """Ahead-of-time swap-out: (device block, host block) copies of up to n low-value chunks.
        The chunks stay valid on device; their host copies count once `swap_out_done` says so."""
        copies = []
        picks = self._pick("swap", n)
        for conv, i in picks:
            host = self._host_block()
            if host is None:
                break
            ch = conv.chunks[i]
            ch.copy_to = host
            self._outgoing[host] = (conv, ch)
            self._busy["device"].add(ch.device)  # type: ignore[arg-type]
            self._busy["host"].add(host)
            copies.append((ch.device, host))
        self._reindex_all(conv for conv, _ in picks)
        return copies  # type: ignore[return-value]

    def swap_out_done(self, copies: Iterable[tuple[int, int]], ok: bool) -> None:
        """A swap-out ended: the host copies become valid, or (failed) their blocks go back."""
        touched = []
        for device, host in copies:
            self._unbusy("device", device)
            self._unbusy("host", host)
            conv, ch = self._outgoing.pop(host, (None, None))
            if ch is None:  # the chunk was freed meanwhile
                continue
            ch.copy_to = None
            if ok:
                ch.host = host
            else:
                self._free_block("host", host)
            touched.append(conv)
        self._free_deferred()
        self._reindex_all(touched)

    def drop_leading(self, n: int) -> int:
        """Drop up to n leading device chunks that have no host copy (no host tier, or it is
        full), lowest value first."""
        picks = self._pick("drop", n)
        for conv, i in picks:
            self._free_chunk(conv.chunks[i], conv)
            conv.dropped = i + 1
        self.dropped_chunks += len(picks)
        self._reindex_all(conv for conv, _ in picks)
        return len(picks)

    def _reindex_all(self, convs: Iterable[Conversation]) -> None:
        for conv in {id(c): c for c in convs}.values():
            self._reindex(conv)

    # ---- accounting ----------------------------------------------------------------------

    def check(self) -> None:
        """Every allocated block is owned by exactly one chunk, and the tier layout holds."""
        dev: list[int] = [b for t, b in self._deferred if t == "device"]
        host: list[int] = [b for t, b in self._deferred if t == "host"]
        for conv in self.conversations.values():
            for i, ch in enumerate(conv.chunks):
                if ch.device is not None:
                    dev.append(ch.device)
                for block in (ch.host, ch.copy_to, ch.loading_to):
                    if block is not None:
                        host.append(block)
                if i < conv.dropped and not conv.running:
                    assert ch.dropped, f"{conv.id}: chunk {i} in the dropped prefix holds a block"
            if not conv.running:
                assert all(not ch.dropped for ch in conv.chunks[conv.dropped :]), conv.id
                assert not any(ch.restoring for ch in conv.chunks), f"{conv.id}: restoring"
        self._check_tier(self.device, dev, "device")
        if self.host is not None:
            self._check_tier(self.host, host, "host")

    @staticmethod
    def _check_tier(alloc: BlockAllocator, owned: list[int], name: str) -> None:
        assert len(owned) == len(set(owned)), f"{name} block owned twice"
        assert len(owned) == alloc.num_used, f"{name}: {alloc.num_used} used, {len(owned)} owned"
        assert all(alloc.allocated[b] for b in owned), f"{name}: a free block is owned"
