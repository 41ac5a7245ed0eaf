"""Every message that crosses between actors, as msgspec Structs.

Flow of one turn: SessionManager --Submit--> Scheduler --SwapOrder--> Swapper,
Scheduler --StepPlan--> Executor --StepResult--> Scheduler --TokenEvent--> SessionManager.
"""

from __future__ import annotations

import msgspec

from pensieve.sampling import SamplingParams


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused (device or host tier)
    recomputed_tokens: int = 0  # dropped history tokens computed again


class Submit(msgspec.Struct):
    """A turn to serve: make `prompt_tokens` the conversation's history and generate."""

    request_id: int
    conversation_id: str
    prompt_tokens: list[int]
    sampling: SamplingParams
    keep_cache: bool = True  # False in stateless mode: forget the conversation afterwards
    named: bool = False  # the client named the conversation (explicit id)


class Cancel(msgspec.Struct):
    """Stop a request now (client gone, stop string hit); its blocks are freed at once."""

    request_id: int
    reason: str = "cancelled"


class DeleteConversation(msgspec.Struct):
    conversation_id: str
    reply_to: int


class TokenEvent(msgspec.Struct):
    """Tokens generated for one request in one step; the last event carries finish and usage."""

    request_id: int
    tokens: list[int] = msgspec.field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    usage: Usage | None = None
    error: str | None = None


class SequenceRows(msgspec.Struct):
    """One sequence's part of a step: its input tokens with their true positions."""

    request_id: int
    tokens: list[int]
    positions: list[int]
    slots: list[int]
    block_table: list[int]
    context_len: int
    sample: bool  # the last row completes the prompt or is a decode row: sample a token
    sampling: SamplingParams


class StepPlan(msgspec.Struct):
    step_id: int
    rows: list[SequenceRows]
    swap_in_ticket: int | None = None  # layer-wise restore this step's attention waits for
    reply_to: int = 0


class StepResult(msgspec.Struct):
    step_id: int
    sampled: dict[int, int]  # request id -> sampled token
    seconds: float
    error: str | None = None


class SwapOrder(msgspec.Struct):
    """Copy blocks between tiers, layer by layer. direction: "in" (host->device) or "out"."""

    ticket: int
    direction: str
    pairs: list[tuple[int, int]]  # (source block, destination block)


class SwapDone(msgspec.Struct):
    ticket: int
    blocks: int
    seconds: float
