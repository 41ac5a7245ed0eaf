"""Engine counters, and the snapshots the library and the server's /metrics expose."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from pensieve.cache import TieredCache


@dataclass
class Counters:
    """Monotonic counts, owned and bumped by the scheduler."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    computed_prompt_tokens: int = 0
    recomputed_tokens: int = 0
    generated_tokens: int = 0
    swap_out_blocks: int = 0
    swap_in_blocks: int = 0
    preemptions: int = 0
    steps: int = 0
    disk_writes: int = 0  # chunk files written
    disk_reads: int = 0  # chunk files read back
    commit_lag_seconds: float = 0.0  # the last commit: from the turn's end to its record on disk


class EngineStats(msgspec.Struct):
    requests_total: int
    requests_running: int
    requests_waiting: int
    prompt_tokens_total: int
    cached_tokens_total: int
    computed_prompt_tokens_total: int
    recomputed_tokens_total: int
    generated_tokens_total: int
    swap_out_blocks_total: int
    swap_in_blocks_total: int
    dropped_tokens_total: int
    preemptions_total: int
    device_blocks_used: int
    device_blocks_total: int
    host_blocks_used: int
    host_blocks_total: int
    block_size: int
    steps_total: int
    conversations: int
    disk_blocks_used: int = 0
    disk_blocks_total: int = 0
    disk_writes_total: int = 0
    disk_reads_total: int = 0
    disk_checksum_failures_total: int = 0
    commit_lag_seconds: float = 0.0


class ConversationInfo(msgspec.Struct):
    id: str
    tokens_total: int
    tokens_device: int
    tokens_host: int
    tokens_dropped: int
    last_active: float  # unix seconds
    turns: int
    active: bool
    tokens_disk: int = 0  # only on disk (restored to host when the conversation returns)


def conversation_info(cache: TieredCache, cid: str, public_id: str) -> ConversationInfo:
    conv = cache.conversations[cid]
    device, host, disk, dropped = conv.tier_tokens(cache.block_size)
    wall = time.time() - (cache.clock() - conv.last_active)
    return ConversationInfo(
        public_id,
        len(conv.tokens),
        device,
        host,
        dropped,
        wall,
        conv.turns,
        conv.owner is not None,
        tokens_disk=disk,
    )


def engine_stats(c: Counters, cache: TieredCache, running: int, waiting: int) -> EngineStats:
    return EngineStats(
        requests_total=c.requests,
        requests_running=running,
        requests_waiting=waiting,
        prompt_tokens_total=c.prompt_tokens,
        cached_tokens_total=c.cached_tokens,
        computed_prompt_tokens_total=c.computed_prompt_tokens,
        recomputed_tokens_total=c.recomputed_tokens,
        generated_tokens_total=c.generated_tokens,
        swap_out_blocks_total=c.swap_out_blocks,
        swap_in_blocks_total=c.swap_in_blocks,
        dropped_tokens_total=cache.dropped_chunks * cache.block_size,
        preemptions_total=c.preemptions,
        device_blocks_used=cache.device.num_used,
        device_blocks_total=cache.device.num_blocks,
        host_blocks_used=cache.host.num_used if cache.host else 0,
        host_blocks_total=cache.host.num_blocks if cache.host else 0,
        block_size=cache.block_size,
        steps_total=c.steps,
        conversations=len(cache.conversations),
        disk_blocks_used=cache.disk_used,
        disk_blocks_total=getattr(cache, "disk_blocks", 0),
        disk_writes_total=c.disk_writes,
        disk_reads_total=c.disk_reads,
        disk_checksum_failures_total=getattr(cache, "checksum_failures", 0),
        commit_lag_seconds=c.commit_lag_seconds,
    )
