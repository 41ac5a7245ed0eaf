"""The disk tier's files: KV chunks and committed conversation records under a state directory.

    STATE_DIR/<fingerprint>/chunks/<uid>.kv           one chunk: K then V of every layer
    STATE_DIR/<fingerprint>/conversations/<h>.json    one conversation's committed record

The fingerprint names the model weights, dtype, block size and KV layout, so state written for
another model is never read. A record lists the conversation's token ids and, per chunk, the
uid and CRC-32 of its file (or null); it is written to a temporary file, fsync'd and renamed over
the old one, so a crash leaves the old record or the new one, never half of either. A chunk file
is fsync'd before any record names it, and one that fails its checksum reads as missing. Used
from one thread at a time (the disk actor's worker).
"""

from __future__ import annotations

import hashlib
import logging
import os
import zlib
from pathlib import Path

import msgspec
import torch

log = logging.getLogger("pensieve.disk")


PENDING = -1  # a ChunkRef's crc32 while its file is still being written by an earlier order


class ChunkRef(msgspec.Struct, array_like=True):
    uid: str
    crc32: int


class ConversationRecord(msgspec.Struct):
    """What a restart needs to bring a conversation back (its KV read lazily)."""

    key: str  # the cache's key (tenant-scoped)
    tokens: list[int]
    last_prompt_len: int
    named: bool
    tenant: str
    turns: int
    chunks: list[ChunkRef | None]  # per chunk: its file, or None (dropped: recomputed)


class CorruptChunk(Exception):
    """A chunk file is missing, truncated or fails its checksum."""


def fingerprint(model: torch.nn.Module, block_size: int, layout: tuple[int, ...]) -> str:
    """A digest of the weights, dtype, block size and KV layout (layers, kv heads, head dim)."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(repr((block_size, layout)).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskStore:
    def __init__(self, state_dir: str | Path, fingerprint: str):
        self.root = Path(state_dir) / fingerprint
        self.chunk_dir = self.root / "chunks"
        self.record_dir = self.root / "conversations"
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        self.record_dir.mkdir(parents=True, exist_ok=True)
        self._encode = msgspec.json.Encoder()
        self._decode = msgspec.json.Decoder(ConversationRecord)
        others = [p.name for p in Path(state_dir).iterdir() if p.is_dir() and p != self.root]
        if others:
            log.warning("ignoring state of %d other model(s) in %s", len(others), state_dir)

    # ---- chunks --------------------------------------------------------------------------

    def write_chunk(self, uid: str, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Write and fsync one chunk ([layers, block, heads, dim] each); return its CRC-32."""
        data = torch.stack([keys, values]).cpu().contiguous().view(torch.uint8).numpy().tobytes()
        path = self.chunk_dir / f"{uid}.kv"
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return zlib.crc32(data)

    def read_chunk(self, ref: ChunkRef, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's K and V shaped and typed like `like`; CorruptChunk if it is not intact."""
        try:
            data = (self.chunk_dir / f"{ref.uid}.kv").read_bytes()
        except OSError as exc:
            raise CorruptChunk(f"chunk {ref.uid}: {exc}") from exc
        expected = 2 * like.numel() * like.element_size()
        if len(data) != expected or zlib.crc32(data) != ref.crc32:
            raise CorruptChunk(f"chunk {ref.uid}: size or checksum mismatch")
        both = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(like.dtype)
        both = both.view(2, *like.shape)
        return both[0], both[1]

    def delete_chunks(self, uids: list[str]) -> None:
        for uid in uids:
            (self.chunk_dir / f"{uid}.kv").unlink(missing_ok=True)

    # ---- conversation records -------------------------------------------------------------

    def _record_path(self, key: str) -> Path:
        return self.record_dir / f"{hashlib.sha1(key.encode()).hexdigest()}.json"

    def commit(self, record: ConversationRecord) -> None:
        """Atomically replace the conversation's record (its chunk files are already synced)."""
        path = self._record_path(record.key)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(self._encode.encode(record))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.record_dir)

    def forget(self, key: str) -> None:
        self._record_path(key).unlink(missing_ok=True)

    def load_records(self) -> list[ConversationRecord]:
        """Every committed record; unreadable ones and files no record names are removed."""
        records = []
        for path in self.record_dir.glob("*.json"):
            try:
                records.append(self._decode.decode(path.read_bytes()))
            except (OSError, msgspec.DecodeError) as exc:
                log.warning("dropping unreadable conversation record %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
        for tmp in self.record_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        named = {ref.uid for r in records for ref in r.chunks if ref is not None}
        for path in self.chunk_dir.glob("*.kv"):
            if path.stem not in named:
                path.unlink(missing_ok=True)
        return records

    def usage_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.chunk_dir.glob("*.kv"))
