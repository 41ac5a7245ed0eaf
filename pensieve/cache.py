"""The tiered conversation cache: which chunk of which conversation sits in which tier.

A conversation's KV is cut into chunks of one block each. Its chunks always lie as
[dropped | host only | device (+ host copy) | device only]: the oldest tokens go first, to the
host tier and then away, so a returning conversation restores a contiguous middle and
recomputes only a leading range. Only the scheduler mutates this object (from its own task),
so no locks are needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pensieve.block_allocator import BlockAllocator, OutOfBlocks
from pensieve.policy import Candidate, CostModel, rank_candidates


@dataclass
class Chunk:
    device: int | None = None  # block id in the device tier
    host: int | None = None  # block id in the host tier (a copy when device is set too)

    @property
    def dropped(self) -> bool:
        return self.device is None and self.host is None


@dataclass
class Conversation:
    id: str
    tokens: list[int] = field(default_factory=list)  # every token whose KV exists or was dropped
    chunks: list[Chunk] = field(default_factory=list)
    dropped: int = 0  # leading chunks whose KV is gone (their token ids stay in `tokens`)
    recompute_end: int = 0  # positions below this are being recomputed by the running request
    recomputed: int = 0  # how far that recompute has come
    last_active: float = 0.0
    owner: int | None = None  # request that holds this conversation
    running: bool = False  # its request is in the batch: its chunks must stay on device
    turns: int = 0
    last_prompt_len: int = 0
    named: bool = False  # the client chose the id: never matched by prefix

    def tier_tokens(self, block_size: int) -> tuple[int, int, int]:
        """(device, host-only, dropped) token counts."""
        device = host = dropped = 0
        for i, ch in enumerate(self.chunks):
            n = max(0, min(block_size, len(self.tokens) - i * block_size))
            if ch.device is not None:
                device += n
            elif ch.host is not None:
                host += n
            else:
                dropped += n
        return device, host, dropped


@dataclass
class Admission:
    """What admitting a request changed: inputs to run, blocks to restore, what was reused."""

    pending: list[tuple[int, int]]  # (token id, position): dropped range first, then the new prompt
    swap_in: list[tuple[int, int]]  # (host block, device block)
    cached_tokens: int
    recomputed_tokens: int


@dataclass
class Eviction:
    """Chunks that leave the device tier: copies to make, device blocks to free afterwards."""

    copies: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


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
        self.deferred_host_frees: list[int] = []
        self.dropped_chunks = 0  # chunks whose KV was dropped (their tokens kept), ever

    # ---- conversations -------------------------------------------------------------------

    def get_or_create(self, cid: str) -> Conversation:
        conv = self.conversations.get(cid)
        if conv is None:
            conv = self.conversations[cid] = Conversation(cid, last_active=self.clock())
        return conv

    def match(self, tokens: list[int], exclude: set[str] = frozenset()) -> tuple[str | None, int]:
        """The unowned conversation this request continues, by longest common token prefix.

        The request must repeat the stored conversation's whole last prompt (a client resending
        its history does), so that conversations sharing only a system prompt are never taken
        for one. Conversations a client named are only ever continued by that name.
        """
        best, best_len = None, 0
        for conv in self.conversations.values():
            if conv.owner is not None or conv.named or conv.id in exclude or not conv.tokens:
                continue
            n = common_prefix(conv.tokens, tokens)
            if n > best_len and n >= max(conv.last_prompt_len, 1):
                best, best_len = conv.id, n
        return best, best_len

    def delete(self, cid: str) -> None:
        conv = self.conversations.pop(cid)
        for ch in conv.chunks:
            self._free_chunk(ch)

    def _free_chunk(self, ch: Chunk) -> None:
        if ch.device is not None:
            self.device.free(ch.device)
        if ch.host is not None and self.host is not None:
            self.host.free(ch.host)
        ch.device = ch.host = None

    # ---- admission and progress ---------------------------------------------------------

    def blocks_needed(self, conv: Conversation, target_len: int, lcp: int) -> int:
        """Device blocks that admitting `target_len` tokens over a reused prefix of `lcp` takes."""
        n_chunks = -(-target_len // self.block_size)
        kept = -(-lcp // self.block_size)
        have = sum(1 for ch in conv.chunks[: min(kept, n_chunks)] if ch.device is not None)
        return n_chunks - have

    def reusable_prefix(self, conv: Conversation, target: list[int]) -> int:
        return min(common_prefix(conv.tokens, target), len(target) - 1)

    def admit(self, cid: str, target: list[int]) -> Admission:
        """Make `target` this conversation's token list: reuse the common prefix, restore it to
        the device tier, and return the inputs still to compute. Raises OutOfBlocks."""
        conv = self.conversations[cid]
        lcp = self.reusable_prefix(conv, target)
        need = self.blocks_needed(conv, len(target), lcp)
        self._truncate(conv, lcp)
        if need > self.device.num_free:
            raise OutOfBlocks(f"admission needs {need} device blocks, {self.device.num_free} free")
        swap_in = []
        for ch in conv.chunks:
            if ch.device is None:
                (ch.device,) = self.device.allocate(1)
                if ch.host is not None:
                    swap_in.append((ch.host, ch.device))
        while len(conv.chunks) * self.block_size < len(target):
            conv.chunks.append(Chunk(device=self.device.allocate(1)[0]))
        if lcp % self.block_size:  # the chunk the prompt continues will change: its copy goes stale
            tail = conv.chunks[lcp // self.block_size]
            if tail.host is not None:
                self.deferred_host_frees.append(tail.host)
                tail.host = None
        recompute = min(conv.dropped * self.block_size, lcp)
        conv.recompute_end, conv.recomputed = recompute, 0
        conv.running = True
        conv.last_prompt_len = len(target)
        pending = [(target[p], p) for p in range(recompute)]
        pending += [(target[p], p) for p in range(lcp, len(target))]
        return Admission(pending, swap_in, lcp - recompute, recompute)

    def _truncate(self, conv: Conversation, n_tokens: int) -> None:
        """Forget everything past the first n_tokens (a diverging history)."""
        keep = -(-n_tokens // self.block_size)
        for ch in conv.chunks[keep:]:
            self._free_chunk(ch)
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

    def slot(self, cid: str, position: int) -> int:
        ch = self.conversations[cid].chunks[position // self.block_size]
        assert ch.device is not None, f"{cid}: position {position} is not on device"
        return ch.device * self.block_size + position % self.block_size

    def block_table(self, cid: str) -> list[int]:
        return [ch.device if ch.device is not None else -1 for ch in self.conversations[cid].chunks]

    def release(self, cid: str, keep: bool = True) -> None:
        """The request is done with its conversation: free what it cannot reuse."""
        conv = self.conversations.get(cid)
        if conv is None:
            return
        if not keep:
            self.delete(cid)
            return
        keep_chunks = -(-len(conv.tokens) // self.block_size)
        for ch in conv.chunks[keep_chunks:]:
            self._free_chunk(ch)
        del conv.chunks[keep_chunks:]
        if conv.recompute_end:  # an unfinished recompute leaves its range dropped again
            for ch in conv.chunks[: conv.dropped]:
                self._free_chunk(ch)
            conv.recompute_end = conv.recomputed = 0
        conv.running = False
        conv.owner = None
        conv.last_active = self.clock()

    def end_step(self) -> None:
        """Free host copies that went stale during the step (no copy may read them any more)."""
        if self.host is not None:
            for block in self.deferred_host_frees:
                self.host.free(block)
        self.deferred_host_frees.clear()

    # ---- eviction ------------------------------------------------------------------------

    def _idle(self) -> list[Conversation]:
        return [c for c in self.conversations.values() if not c.running]

    def _ranked(self, pick: Callable[[Conversation], tuple[int, int]]) -> list[Candidate]:
        rows = []
        for conv in self._idle():
            first, count = pick(conv)
            if count > 0:
                rows.append((conv.id, first, count, conv.last_active))
        return rank_candidates(rows, self.cost, self.block_size, self.clock())

    @staticmethod
    def _run(conv: Conversation, test: Callable[[Chunk], bool], start: int) -> tuple[int, int]:
        """(start, length) of the run of chunks from `start` that pass `test`."""
        i = start
        while i < len(conv.chunks) and test(conv.chunks[i]):
            i += 1
        return start, i - start

    def _first_device(self, conv: Conversation) -> int:
        i = conv.dropped
        while i < len(conv.chunks) and conv.chunks[i].device is None:
            i += 1
        return i

    def _swap_candidates(self) -> list[Candidate]:
        """Device chunks without a host copy, right after those that have one."""

        def pick(conv: Conversation) -> tuple[int, int]:
            start, n_copied = self._run(
                conv, lambda c: c.host is not None, self._first_device(conv)
            )
            return self._run(
                conv, lambda c: c.device is not None and c.host is None, start + n_copied
            )

        return self._ranked(pick)

    def _host_drop_candidates(self) -> list[Candidate]:
        """Host-only chunks at the leading end."""
        return self._ranked(
            lambda conv: self._run(
                conv, lambda c: c.device is None and c.host is not None, conv.dropped
            )
        )

    def reclaimable(self) -> int:
        """Device blocks that also have a host copy (freed lazily, only when needed)."""
        return sum(
            1
            for conv in self._idle()
            for ch in conv.chunks
            if ch.device is not None and ch.host is not None
        )

    def reclaim(self, n: int) -> int:
        """Free up to n device blocks whose chunks already have a host copy, lowest value first."""
        ranked = self._ranked(
            lambda conv: self._run(conv, lambda c: c.host is not None, self._first_device(conv))
        )
        for cand in ranked[:n]:
            ch = self.conversations[cand.conversation_id].chunks[cand.chunk]
            self.device.free(ch.device)  # type: ignore[arg-type]
            ch.device = None
        return min(n, len(ranked))

    def _host_block(self) -> int | None:
        """A free host block, dropping the lowest-value host-only chunk when the tier is full."""
        if self.host is None:
            return None
        if self.host.num_free == 0:
            victims = self._host_drop_candidates()
            if not victims:
                return None
            conv = self.conversations[victims[0].conversation_id]
            self.host.free(conv.chunks[victims[0].chunk].host)  # type: ignore[arg-type]
            conv.chunks[victims[0].chunk].host = None
            conv.dropped += 1
            self.dropped_chunks += 1
        return self.host.allocate(1)[0]

    def plan_swap_out(self, n: int) -> Eviction:
        """Ahead-of-time swap-out: copy up to n low-value chunks to the host tier, keeping them
        valid on device (their blocks are reclaimed later, only when needed)."""
        out = Eviction()
        for cand in self._swap_candidates()[:n]:
            ch = self.conversations[cand.conversation_id].chunks[cand.chunk]
            host = self._host_block()
            if host is None:
                break
            ch.host = host
            out.copies.append((ch.device, host))  # type: ignore[arg-type]
        return out

    def drop_leading(self, n: int) -> int:
        """Drop up to n leading device chunks that have no host copy (no host tier, or it is
        full), lowest value first."""
        ranked = self._ranked(
            lambda conv: self._run(
                conv, lambda c: c.device is not None and c.host is None, conv.dropped
            )
        )
        for cand in ranked[:n]:
            conv = self.conversations[cand.conversation_id]
            self._free_chunk(conv.chunks[cand.chunk])
            conv.dropped = cand.chunk + 1
        self.dropped_chunks += min(n, len(ranked))
        return min(n, len(ranked))

    # ---- accounting ----------------------------------------------------------------------

    def check(self) -> None:
        """Every allocated block is owned by exactly one chunk, and the tier layout holds."""
        dev: list[int] = []
        host: list[int] = list(self.deferred_host_frees)
        for conv in self.conversations.values():
            for i, ch in enumerate(conv.chunks):
                if ch.device is not None:
                    dev.append(ch.device)
                if ch.host is not None:
                    host.append(ch.host)
                if i < conv.dropped and not conv.running:
                    assert ch.dropped, f"{conv.id}: chunk {i} in the dropped prefix holds a block"
            if not conv.running:
                assert all(not ch.dropped for ch in conv.chunks[conv.dropped :]), conv.id
        self._check_tier(self.device, dev, "device")
        if self.host is not None:
            self._check_tier(self.host, host, "host")

    @staticmethod
    def _check_tier(alloc: BlockAllocator, owned: list[int], name: str) -> None:
        assert len(owned) == len(set(owned)), f"{name} block owned twice"
        assert len(owned) == alloc.num_used, f"{name}: {alloc.num_used} used, {len(owned)} owned"
        assert all(alloc.ref_counts[b] == 1 for b in owned), f"{name}: bad reference count"
