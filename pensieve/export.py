"""One conversation as a portable file, and the disk read time the retention policy weighs.

The export is a safetensors file: each in-memory chunk's keys and values as tensors
`chunk.<i>.keys` / `chunk.<i>.values` ([layers, block, kv heads, head dim]), and in its metadata
the format, the model fingerprint and the conversation's record (token ids and metadata) as
JSON. A server only imports a file written for the same fingerprint.
"""

from __future__ import annotations

import json
import struct
import time

import msgspec
import safetensors.torch

from pensieve.block_allocator import KVPool
from pensieve.disk_store import ChunkRef, ConversationRecord, DiskStore
from pensieve.errors import ConflictError, InvalidRequestError

FORMAT = "pensieve-conversation/1"


def encode_export(record: ConversationRecord, chunks: list, fingerprint: str) -> bytes:
    tensors = {}
    for i, kv in enumerate(chunks):
        if kv is not None:
            tensors[f"chunk.{i}.keys"], tensors[f"chunk.{i}.values"] = kv
    record.chunks = [None] * len(chunks)
    metadata = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "record": msgspec.json.encode(record).decode(),
    }
    return safetensors.torch.save(tensors, metadata=metadata)


def _metadata(data: bytes) -> dict[str, str]:
    try:
        (size,) = struct.unpack("<Q", data[:8])
        return json.loads(data[8 : 8 + size])["__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise InvalidRequestError(f"not a conversation export: {exc}", param="file") from exc


def decode_export(data: bytes, fingerprint: str) -> tuple[ConversationRecord, list]:
    """The record and per-chunk (keys, values) or None; ConflictError for another model."""
    meta = _metadata(data)
    if meta.get("format") != FORMAT:
        raise InvalidRequestError(f"not a {FORMAT} file", param="file")
    if meta.get("fingerprint") != fingerprint:
        raise ConflictError(
            "this conversation was exported by a server with another model, dtype, block size "
            f"or KV layout (fingerprint {meta.get('fingerprint')}, this server {fingerprint})"
        )
    try:
        record = msgspec.json.decode(meta["record"], type=ConversationRecord)
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # msgspec, safetensors and key errors alike
        raise InvalidRequestError(f"a damaged conversation export: {exc}", param="file") from exc
    n = len(record.chunks)
    chunks = [
        (tensors[f"chunk.{i}.keys"], tensors[f"chunk.{i}.values"])
        if f"chunk.{i}.keys" in tensors and f"chunk.{i}.values" in tensors
        else None
        for i in range(n)
    ]
    return record, chunks


def profile_disk_read(store: DiskStore, host: KVPool, repeats: int = 5) -> float:
    """Seconds to read and check one chunk file: beside Cost(l), it decides whether a leading
    chunk is worth reading back or cheaper to recompute."""
    keys, values = host.keys[:, 0], host.values[:, 0]
    ref = ChunkRef("profile", store.write_chunk("profile", keys, values))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        store.read_chunk(ref, keys)
        best = min(best, time.perf_counter() - started)
    store.delete_chunks(["profile"])
    return best
