"""What the cache keeps per conversation: its token ids and, per chunk, where its KV lives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Chunk:
    device: int | None = None  # block id in the device tier
    host: int | None = None  # block id of a complete host copy (a copy when device is set too)
    copy_to: int | None = None  # host block a device->host copy is writing (not valid yet)
    restoring: bool = False  # the device block is being filled from `host` (not valid yet)
    disk: Any = None  # disk_store.ChunkRef of a complete, committed file of this chunk
    disk_pending: str | None = None  # uid of a file being written for it (not valid yet)
    loading_to: int | None = None  # host block a disk read is filling (not valid yet)

    @property
    def dropped(self) -> bool:
        return self.device is None and self.host is None and self.disk is None


@dataclass
class Conversation:
    id: str
    tokens: list[int] = field(default_factory=list)  # every token whose KV exists or was dropped
    chunks: list[Chunk] = field(default_factory=list)
    dropped: int = 0  # leading chunks whose KV is gone (their token ids stay in `tokens`)
    recompute_end: int = 0  # positions below this are being recomputed by the running request
    recomputed: int = 0  # how far that recompute has come
    last_active: float = 0.0
    owner: int | None = None  # the request that holds this conversation (acquire/release)
    running: bool = False  # its request is in the batch: its chunks must stay on device
    turns: int = 0
    last_prompt_len: int = 0
    named: bool = False  # the client chose the id: never matched by prefix
    tenant: str = ""  # whose it is: only that tenant's requests see or continue it
    loading: bool = False  # its disk chunks are being read back: not admitted until done
    stale_files: list[str] = field(default_factory=list)  # chunk files its record may still name
    on_disk: bool = False  # a record of it was (or is being) committed to the disk tier

    def tier_tokens(self, block_size: int) -> tuple[int, int, int, int]:
        """(device, host-only, disk-only, dropped) token counts."""
        device = host = disk = dropped = 0
        for i, ch in enumerate(self.chunks):
            n = max(0, min(block_size, len(self.tokens) - i * block_size))
            if ch.device is not None:
                device += n
            elif ch.host is not None:
                host += n
            elif ch.disk is not None:
                disk += n
            else:
                dropped += n
        return device, host, disk, dropped


@dataclass
class Admission:
    """What admitting a request changed: inputs to run, blocks to restore, what was reused."""

    pending: list[tuple[int, int]]  # (token id, position): dropped range first, then the new prompt
    swap_in: list[tuple[int, int]]  # (host block, device block)
    cached_tokens: int
    recomputed_tokens: int
