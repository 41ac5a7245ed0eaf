"""The disk actor: writes committed conversations to the state directory and reads them back.

It owns the DiskStore (files under STATE_DIR/<fingerprint>/) and a worker thread, so file I/O
never runs on the event loop or the compute thread. Chunks it writes are full ones (their KV
never changes) read from pool blocks that the scheduler keeps busy (never reused) until
PersistDone; loads go into host blocks the scheduler set aside.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pensieve.actors.base import Actor
from pensieve.block_allocator import KVPool
from pensieve.compute_thread import helper_executor
from pensieve.disk_store import PENDING, ChunkRef, CorruptChunk, DiskStore
from pensieve.messages import ForgetOnDisk, LoadDone, LoadOrder, PersistDone, PersistOrder

log = logging.getLogger("pensieve.disk")


class DiskActor(Actor):
    name = "disk"

    def __init__(self, store: DiskStore, device_pool: KVPool, host_pool: KVPool):
        super().__init__()
        self.store = store
        self.pools = {"device": device_pool, "host": host_pool}
        self.worker = helper_executor("pensieve-disk")
        self.written: dict[str, int] = {}  # uid -> CRC-32 of files written and not deleted

    async def handle(self, message: object) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(message, PersistOrder):
            started = time.perf_counter()
            try:
                refs = await loop.run_in_executor(self.worker, self.persist, message)
                error = None
            except Exception as exc:
                log.exception("committing %r failed", message.record.key)
                refs, error = {}, f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - started
            done = PersistDone(message.record.key, message.writes, refs, seconds, error)
            message.reply.set_result(done)
        elif isinstance(message, LoadOrder):
            started = time.perf_counter()
            try:
                failed = await loop.run_in_executor(self.worker, self.load, message)
            except Exception:  # answered all the same: an unanswered order stalls shutdown
                log.exception("reading %r back failed", message.key)
                failed = [index for index, _, _ in message.loads]
            seconds = time.perf_counter() - started
            message.reply.set_result(LoadDone(message.key, message.loads, failed, seconds))
        elif isinstance(message, ForgetOnDisk):
            await loop.run_in_executor(self.worker, self.forget, message)

    def persist(self, order: PersistOrder) -> dict[int, ChunkRef]:
        refs = {}
        for write in order.writes:
            pool = self.pools[write.tier]
            keys, values = pool.keys[:, write.block], pool.values[:, write.block]
            crc = self.store.write_chunk(write.uid, keys, values)
            refs[write.index] = ChunkRef(write.uid, crc)
            self.written[write.uid] = crc
        record = order.record
        record.chunks = [self._complete(refs.get(i, ref)) for i, ref in enumerate(record.chunks)]
        self.store.commit(record)
        self._delete(order.stale)
        return refs

    def _complete(self, ref: ChunkRef | None) -> ChunkRef | None:
        """A ref to a file an earlier order wrote, with its checksum (None if that failed)."""
        if ref is None or ref.crc32 != PENDING:
            return ref
        crc = self.written.get(ref.uid)
        return ChunkRef(ref.uid, crc) if crc is not None else None

    def _delete(self, uids: list[str]) -> None:
        self.store.delete_chunks(uids)
        for uid in uids:
            self.written.pop(uid, None)

    def load(self, order: LoadOrder) -> list[int]:
        host = self.pools["host"]
        failed = []
        for index, ref, block in order.loads:
            try:
                keys, values = self.store.read_chunk(ref, host.keys[:, block])
            except CorruptChunk as exc:
                log.warning("%s: %s (recomputed instead)", order.key, exc)
                failed.append(index)
                continue
            host.keys[:, block].copy_(keys)
            host.values[:, block].copy_(values)
        return failed

    def forget(self, order: ForgetOnDisk) -> None:
        self.store.forget(order.key)
        self._delete(order.uids)

    async def stop(self) -> None:
        await super().stop()
        self.worker.shutdown(wait=True)
