"""KV events for vllm-router's `kv_aware` policy: which blocks of tokens this worker holds, and
in which tier, published over ZMQ in vLLM's KV event format.

Why: a router that only sees requests guesses where a conversation's KV is (cache_aware keeps a
tree of what it sent where). With events it knows, and it credits a block by its tier: 1 on the
device, `--kv-penalty-host` in host memory, `--kv-penalty-disk` on disk. Pensieve's tiers are
exactly those three, so a returning conversation goes to the worker that holds it cheapest.

What vllm-router 0.1.17 takes (checked against the installed router, docs/scale-out.md):

- a ZMQ PUB socket, messages of three frames: topic b"", sequence number (8 bytes, big-endian),
  payload. On connecting and on a gap in the numbers it asks the optional replay socket
  (ROUTER: [empty, first seq] in; [empty, topic, seq, payload] per buffered batch, then seq -1,
  out; vLLM's replay leaves the topic out, which this router refuses).
- payload: the msgpack array [ts, events, data_parallel_rank]; each event a map tagged "type":
  BlockStored {block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
  lora_name}, BlockRemoved {block_hashes, medium}, AllBlocksCleared {}; medium GPU, CPU, DISK.
- it renders each request on a worker (POST /v1/chat/completions/render) and keys each block of
  `--kv-event-block-size` ids by `router_block_hash`, as it keys stored blocks by their
  `token_ids`, walking from the first block. `block_hashes` are ours: they only place a block
  under its parent and name it in BlockRemoved.

The scheduler owns a `KvEventTracker`: the cache tells it which conversations moved, and once
per scheduler loop `flush` turns that into events. A block counts in a tier when all of its
tokens' KV is valid there; blocks after the first one held nowhere are not published (the
router only credits a prefix). Blocks shared by several conversations are one block to the
router. `KvEventPublisher` does the socket I/O on a thread of its own.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import queue
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pensieve.config import EngineConfig
    from pensieve.conversation import Conversation

DEVICE, HOST, DISK = "GPU", "CPU", "DISK"  # the media names vllm-router maps to its tiers
MEDIA = (DEVICE, HOST, DISK)
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # ends a replay
_MASK = (1 << 63) - 1  # block hashes stay non-negative int64s (the router rejects negatives)
Event = dict[str, Any]


def router_block_hash(tokens: Sequence[int]) -> bytes:
    """How vllm-router keys a block: SHA-256 of its token ids as little-endian u32s (no chaining:
    a block's position comes from its parent). Stated here for the tests and the docs."""
    return hashlib.sha256(struct.pack(f"<{len(tokens)}I", *tokens)).digest()


def chain_hashes(tokens: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Our hash of each full block: SHA-256 over the parent's hash and the block's token ids, so
    equal prefixes (in any conversation) get equal hashes and a block names its whole prefix."""
    out: list[int] = []
    prev = b"" if parent is None else parent.to_bytes(8, "big")
    for start in range(0, len(tokens) - block_size + 1, block_size):
        ids = struct.pack(f"<{block_size}I", *tokens[start : start + block_size])
        value = int.from_bytes(hashlib.sha256(prev + ids).digest()[:8], "big") & _MASK
        out.append(value)
        prev = value.to_bytes(8, "big")
    return out


def block_media(
    conv: Conversation, chunk_size: int, block_size: int, start: int = 0
) -> list[tuple[str, ...]]:
    """Per full block of `block_size` committed tokens from block `start` on, the media that
    hold all of its KV; it ends before the first block held nowhere. A copy still being made
    counts nowhere yet."""
    chunks: dict[int, tuple[str, ...]] = {}

    def media_of(i: int) -> tuple[str, ...]:
        if i not in chunks:
            ch = conv.chunks[i]
            on_device = ch.device is not None and not ch.restoring
            if i < conv.dropped:  # only what the running request has recomputed so far
                on_device = on_device and (i + 1) * chunk_size <= conv.recomputed
            held = (on_device, ch.host is not None, ch.disk is not None)
            chunks[i] = tuple(m for m, here in zip(MEDIA, held, strict=True) if here)
        return chunks[i]

    out: list[tuple[str, ...]] = []
    for j in range(start, len(conv.tokens) // block_size):
        first, last = j * block_size // chunk_size, ((j + 1) * block_size - 1) // chunk_size
        if last >= len(conv.chunks):
            break
        covering = [media_of(c) for c in range(first, last + 1)]
        media = tuple(m for m in covering[0] if all(m in c for c in covering))
        if not media:
            break
        out.append(media)
    return out


def block_stored(hashes: list[int], parent: int | None, tokens: list[int], size: int, medium: str):
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": size,
        "lora_id": None,
        "medium": medium,
        "lora_name": None,
    }


def block_removed(hashes: list[int], medium: str) -> Event:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium}


class EventSink(Protocol):
    def publish(self, events: list[Event]) -> None: ...

    def close(self) -> None: ...


@dataclass
class _Published:
    """What one conversation has published: its hashed tokens and (hash, medium) pairs."""

    tokens: list[int] = field(default_factory=list)  # the full blocks' tokens
    hashes: list[int] = field(default_factory=list)
    held: set[tuple[int, str]] = field(default_factory=set)
    prefix: int = 0  # blocks published: those before the first one held nowhere


class KvEventTracker:
    """Turns tier moves into BlockStored / BlockRemoved events (the cache's TierListener).

    A conversation that only grew (a step appended tokens, on the device) costs its new full
    blocks; any other change re-reads its chunks and publishes the difference."""

    def __init__(self, chunk_size: int, block_size: int, sink: EventSink):
        self.chunk_size = chunk_size  # the cache's block size
        self.block_size = block_size  # the router's (--kv-event-block-size)
        self.sink = sink
        self.events_published = 0
        self._dirty: dict[str, bool] = {}  # conversation -> re-read it whole (else: it grew)
        self._convs: dict[str, _Published] = {}
        self._refs: collections.Counter[tuple[int, str]] = collections.Counter()

    @classmethod
    def from_config(cls, config: EngineConfig) -> KvEventTracker | None:
        """A tracker publishing on config.kv_events_endpoint; None when that is unset."""
        if not config.kv_events_endpoint:
            return None
        if config.kv_events_block_size < 1:
            from pensieve.errors import InvalidRequestError

            raise InvalidRequestError(
                "kv_events_block_size must be at least 1", param="kv_events_block_size"
            )
        publisher = KvEventPublisher(config.kv_events_endpoint, config.kv_events_replay_endpoint)
        return cls(config.block_size, config.kv_events_block_size, publisher)

    def changed(self, cid: str) -> None:
        self._dirty[cid] = True

    def grew(self, cid: str) -> None:
        self._dirty.setdefault(cid, False)

    def flush(self, conversations: Mapping[str, Conversation]) -> None:
        """Publish what the changed conversations now hold against what they held."""
        if not self._dirty:
            return
        events: list[Event] = []
        for cid, whole in self._dirty.items():
            conv = conversations.get(cid)
            if whole or conv is None or cid not in self._convs:
                self._update(cid, conv, events)
            else:
                self._grow(self._convs[cid], conv, events)
        self._dirty.clear()
        if events:
            self.events_published += len(events)
            self.sink.publish(events)

    def close(self) -> None:
        self.sink.close()

    def _hashes(self, known: _Published, tokens: list[int]) -> list[int]:
        """The chain hashes of tokens' full blocks, rehashing only from the first changed one."""
        size, n = self.block_size, len(tokens) // self.block_size
        keep = min(len(known.hashes), n)
        if tokens[: keep * size] != known.tokens[: keep * size]:
            keep = next(
                j
                for j in range(keep)
                if tokens[j * size : (j + 1) * size] != known.tokens[j * size : (j + 1) * size]
            )
        if keep < n or n < len(known.hashes):
            parent = known.hashes[keep - 1] if keep else None
            tail = chain_hashes(tokens[keep * size : n * size], size, parent)
            known.hashes = known.hashes[:keep] + tail
            known.tokens = tokens[: n * size]
        return known.hashes

    def _update(self, cid: str, conv: Conversation | None, events: list[Event]) -> None:
        known = self._convs.setdefault(cid, _Published())
        held: list[tuple[int, int, str]] = []  # (block index, hash, medium)
        if conv is not None:
            hashes = self._hashes(known, conv.tokens)
            media = block_media(conv, self.chunk_size, self.block_size)[: len(hashes)]
            held = [(j, hashes[j], m) for j, ms in enumerate(media) for m in ms]
            known.prefix = len(media)
        now = {(h, m) for _, h, m in held}
        # first use of a (block, medium) by any conversation: stored; last one gone: removed
        fresh = [(j, h, m) for j, h, m in held if (h, m) not in known.held and self._hold((h, m))]
        gone = [key for key in known.held - now if self._release(key)]
        self._stored(known, conv, fresh, events)
        for medium in MEDIA:
            removed = [h for h, m in gone if m == medium]
            if removed:
                events.append(block_removed(removed, medium))
        known.held = now
        if conv is None:
            del self._convs[cid]

    def _grow(self, known: _Published, conv: Conversation, events: list[Event]) -> None:
        """Only tokens were appended (on the device): hash and publish the new full blocks."""
        size, old, n = self.block_size, len(known.hashes), len(conv.tokens) // self.block_size
        if n <= old:
            return
        parent = known.hashes[-1] if old else None
        known.hashes += chain_hashes(conv.tokens[old * size : n * size], size, parent)
        known.tokens += conv.tokens[old * size : n * size]
        if known.prefix < old:  # a block before them is held nowhere: the router cannot use them
            return
        media = block_media(conv, self.chunk_size, size, start=old)
        held = [(old + k, known.hashes[old + k], m) for k, ms in enumerate(media) for m in ms]
        known.prefix += len(media)
        fresh = [(j, h, m) for j, h, m in held if (h, m) not in known.held and self._hold((h, m))]
        known.held.update((h, m) for _, h, m in held)
        self._stored(known, conv, fresh, events)

    def _stored(
        self,
        known: _Published,
        conv: Conversation | None,
        fresh: list[tuple[int, int, str]],
        events: list[Event],
    ) -> None:
        """BlockStored events for newly held blocks: one per run of consecutive blocks on one
        medium, each run after the one holding its parent."""
        runs: list[list[tuple[int, int, str]]] = []  # consecutive blocks on one medium
        for j, h, m in sorted(fresh, key=lambda b: (b[2], b[0])):
            if runs and runs[-1][-1][2] == m and runs[-1][-1][0] == j - 1:
                runs[-1].append((j, h, m))
            else:
                runs.append([(j, h, m)])
        size = self.block_size
        for run in sorted(runs, key=lambda r: r[0][0]):  # a parent is stored before its child
            start, end, medium = run[0][0], run[-1][0] + 1, run[0][2]
            parent = known.hashes[start - 1] if start else None
            tokens = conv.tokens[start * size : end * size]  # type: ignore[union-attr]
            events.append(block_stored([h for _, h, _ in run], parent, tokens, size, medium))

    def _hold(self, key: tuple[int, str]) -> bool:
        """One more conversation holds (block, medium); True for the first."""
        self._refs[key] += 1
        return self._refs[key] == 1

    def _release(self, key: tuple[int, str]) -> bool:
        """One conversation less holds (block, medium); True when none is left."""
        self._refs[key] -= 1
        if self._refs[key] > 0:
            return False
        del self._refs[key]
        return True


def _zmq_and_msgpack() -> tuple[Any, Any]:
    try:
        import msgpack
        import zmq
    except ImportError as exc:  # an optional dependency: only workers behind vllm-router need it
        from pensieve.errors import InvalidRequestError

        raise InvalidRequestError(
            f"KV events need pyzmq and msgpack ({exc.name} is missing): "
            'pip install -e ".[cluster]"',
            param="kv_events_endpoint",
        ) from exc
    return zmq, msgpack


class KvEventPublisher:
    """vLLM's ZmqEventPublisher: a PUB socket (bound at `endpoint`, e.g. tcp://*:5557) and an
    optional ROUTER replay socket, served by a thread of their own, so that the scheduler never
    waits on I/O. Sequence numbers are taken when a batch is queued: a batch dropped because
    the queue is full leaves a gap the router sees."""

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        buffer_batches: int = 10_000,
        max_queued: int = 10_000,
    ):
        self._zmq, self._msgpack = _zmq_and_msgpack()
        self._queue: queue.Queue[tuple[int, float, list[Event]] | None] = queue.Queue(max_queued)
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(
            maxlen=buffer_batches
        )
        self._seq = itertools.count()
        self._closed = False
        self.dropped = 0
        self._error: Exception | None = None
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(endpoint, replay_endpoint, started),
            name="pensieve-kv-events",
            daemon=True,
        )
        self._thread.start()
        started.wait()
        if self._error is not None:
            raise self._error

    def publish(self, events: list[Event]) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait((next(self._seq), time.time(), events))
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        """Tell subscribers this worker's blocks are gone, then stop the thread."""
        if self._closed:
            return
        self.publish([{"type": "AllBlocksCleared"}])
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self, endpoint: str, replay_endpoint: str | None, started: threading.Event) -> None:
        zmq = self._zmq
        ctx = zmq.Context.instance()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, 100_000)
        pub.setsockopt(zmq.LINGER, 500)  # the last batch (AllBlocksCleared) still goes out
        replay = ctx.socket(zmq.ROUTER) if replay_endpoint else None
        try:
            pub.bind(endpoint)
            if replay is not None:
                replay.setsockopt(zmq.LINGER, 0)
                replay.bind(replay_endpoint)
        except zmq.ZMQError as exc:
            from pensieve.errors import InvalidRequestError

            self._error = InvalidRequestError(
                f"cannot bind the KV event socket: {exc}", param="kv_events_endpoint"
            )
            for sock in (pub, replay):
                if sock is not None:
                    sock.close(linger=0)
            started.set()
            return
        started.set()
        try:
            while True:
                if replay is not None and replay.poll(0):
                    self._serve_replay(replay)
                try:
                    item = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                if item is None:
                    break
                seq, ts, events = item
                payload = self._msgpack.packb([ts, events, 0])
                seq_bytes = seq.to_bytes(8, "big")
                pub.send_multipart([b"", seq_bytes, payload])  # PUB drops, never blocks
                self._buffer.append((seq, payload))
        finally:
            pub.close()
            if replay is not None:
                replay.close()

    def _serve_replay(self, replay: Any) -> None:
        """Answer one replay request: every buffered batch from the asked sequence number on."""
        frames = replay.recv_multipart()
        if len(frames) != 3:
            return
        client, _, first = frames
        start = int.from_bytes(first, "big")
        for seq, payload in list(self._buffer):
            if seq >= start:
                replay.send_multipart([client, b"", b"", seq.to_bytes(8, "big"), payload])
        replay.send_multipart([client, b"", b"", END_SEQ, b""])
