"""Engine counters, and the snapshot the library and the server's /metrics expose."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec


@dataclass
class Counters:
    """Monotonic counts, bumped by the actors as they work."""

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
    step_seconds: float = 0.0


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


class ConversationInfo(msgspec.Struct):
    id: str
    tokens_total: int
    tokens_device: int
    tokens_host: int
    tokens_dropped: int
    last_active: float  # unix seconds
    turns: int
    active: bool
