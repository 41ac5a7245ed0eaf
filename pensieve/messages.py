"""Every message that crosses between actors, and every item of a turn's stream, as msgspec
Structs.

One turn: ChatStream --OpenTurn--> SessionManager --Submit--> Scheduler, which answers Accepted
(or Rejected); each step Scheduler --SwapOrder--> Swapper and Scheduler --StepPlan--> Executor,
whose StepResult comes back; Scheduler --TokenEvent--> SessionManager --Started/Delta/Finished-->
ChatStream.

A message that asks a question carries its reply address: a future (`reply`) owned by the asker
and resolved by the actor that answers. A turn's stream is a queue owned by its ChatStream. The
one object that is not a message is `LayerProgress`: a one-shot channel that travels inside a
SwapOrder and a StepPlan so that the executor's thread waits on the swapper's copy thread layer by
layer without either actor touching the other.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import msgspec

from pensieve.sampling import Sampled, SamplingParams


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused (device or host tier)
    recomputed_tokens: int = 0  # dropped history tokens computed again


class ErrorInfo(msgspec.Struct):
    """A PensieveError as data, so that it can travel in a message (see errors.from_info)."""

    kind: str  # the PensieveError subclass name
    message: str
    param: str | None = None
    code: str | None = None


# ---- client -> session manager ----------------------------------------------------------------


class OpenTurn(msgspec.Struct):
    """Serve one turn; everything that happens to it arrives on `stream`."""

    request_id: int
    messages: Any  # OpenAI-style message dicts (validated by the session manager), or a str:
    # a raw text prompt (legacy completions), tokenized without the chat template
    conversation_id: str | None  # None: continue the conversation whose history this resends
    sampling: SamplingParams
    stream: asyncio.Queue  # receives Started, Delta and Finished
    tenant: str = ""  # whose conversations this turn may see and continue


class Cancel(msgspec.Struct):
    """Stop a request now (client gone, stop string hit); its blocks are freed at once."""

    request_id: int
    reason: str = "cancelled"


# ---- stream items (session manager -> ChatStream) ------------------------------------------


class Started(msgspec.Struct):
    """The turn was accepted: which conversation it continues, and its prompt length."""

    conversation_id: str
    prompt_tokens: int


class TopLogprob(msgspec.Struct):
    token_id: int
    token: str  # the decoded text of this one token
    logprob: float


class TokenLogprob(msgspec.Struct):
    """A generated token's log-probability under the model, and the likeliest alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob]


class Delta(msgspec.Struct):
    text: str  # may be "" while a multi-byte character or a possible stop string is held back
    token_ids: list[int]
    logprobs: list[TokenLogprob] = msgspec.field(default_factory=list)  # if the turn asked


class Finished(msgspec.Struct):
    """The last item of a turn's stream. `error` set: it failed (before Started: rejected)."""

    reason: str  # "stop", "length", "cancelled", "error"
    usage: Usage
    error: ErrorInfo | None = None


# ---- session manager <-> scheduler -----------------------------------------------------------


class Submit(msgspec.Struct):
    """A turn to serve: make `prompt_tokens` the conversation's history and generate."""

    request_id: int
    conversation_id: str | None  # None: resolve by token prefix (or start a new conversation)
    prompt_tokens: list[int]
    sampling: SamplingParams
    keep_cache: bool = True  # False in stateless mode: forget the conversation afterwards
    match_prefix: bool = True  # may continue a stored conversation this prompt resends
    tenant: str = ""


class Accepted(msgspec.Struct):
    """The scheduler queued the request on this conversation."""

    request_id: int
    conversation_id: str


class Rejected(msgspec.Struct):
    """The scheduler refused the request before queueing it (e.g. the queue is full)."""

    request_id: int
    error: ErrorInfo


class TokenEvent(msgspec.Struct):
    """Tokens generated for one request in one step; the last event carries finish and usage."""

    request_id: int
    tokens: list[int] = msgspec.field(default_factory=list)
    logprobs: list[Sampled] = msgspec.field(default_factory=list)  # per token, if asked
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    usage: Usage | None = None
    error: str | None = None


# ---- engine -> scheduler: questions about the cache it owns -------------------------------


class DeleteConversation(msgspec.Struct):
    conversation_id: str
    reply: asyncio.Future  # -> bool: whether it existed (for this tenant)
    tenant: str = ""


class ListConversations(msgspec.Struct):
    reply: asyncio.Future  # -> list[ConversationInfo]: the tenant's conversations
    conversation_id: str | None = None  # only this one (empty list if unknown)
    tenant: str = ""


class ExportConversation(msgspec.Struct):
    conversation_id: str
    reply: asyncio.Future  # -> (ConversationRecord, [KV pairs or None per chunk]) or None
    tenant: str = ""


class ImportConversation(msgspec.Struct):
    conversation_id: str
    record: Any  # disk_store.ConversationRecord
    chunks: list[Any]  # per chunk: (keys, values) tensors, or None (recomputed)
    reply: asyncio.Future  # -> None, or why it could not be imported now
    tenant: str = ""


class GetStats(msgspec.Struct):
    reply: asyncio.Future  # -> EngineStats


class CheckAccounting(msgspec.Struct):
    """Check every block's owner (tests); the reply is None or the AssertionError text."""

    reply: asyncio.Future  # -> str | None


class Shutdown(msgspec.Struct):
    """Finish every request as cancelled; resolved once the actor has processed all before it."""

    reply: asyncio.Future  # -> None


# ---- scheduler <-> executor, swapper ---------------------------------------------------------


class LayerProgress:
    """A restore's progress, layer by layer: set by the swapper's thread, awaited by the
    executor's. Created by the scheduler, so it exists before either side looks at it."""

    def __init__(self, num_layers: int):
        self.ready = [threading.Event() for _ in range(num_layers)]
        self.cuda_events: list[Any] = [None] * num_layers  # per-layer CUDA events on a GPU host
        self.error: str | None = None

    def fail(self, error: str) -> None:
        self.error = error
        for event in self.ready:
            event.set()

    def wait(self, layer: int) -> None:
        """Block until `layer` landed (on a GPU host: order the current stream after it)."""
        self.ready[layer].wait()
        if self.error is not None:
            raise RuntimeError(f"swap-in failed: {self.error}")
        event = self.cuda_events[layer]
        if event is not None:
            import torch

            torch.cuda.current_stream(event.device).wait_event(event)


class SequenceRows(msgspec.Struct):
    """One sequence's part of a step: its input tokens with their true positions."""

    request_id: int
    tokens: list[int]
    positions: list[int]
    block_table: list[int]  # device block of each chunk; -1 where the chunk is not on device
    context_len: int
    sample: bool  # the last row completes the prompt or is a decode row: sample a token
    sampling: SamplingParams


class StepPlan(msgspec.Struct):
    step_id: int
    rows: list[SequenceRows]
    reply: asyncio.Future  # -> StepResult
    restore: LayerProgress | None = None  # the swap-in this step's attention waits for


class StepResult(msgspec.Struct):
    step_id: int
    sampled: dict[int, int]  # request id -> sampled token
    seconds: float
    error: str | None = None
    logprobs: dict[int, Sampled] = msgspec.field(default_factory=dict)  # requests that asked


class Forget(msgspec.Struct):
    """These requests ended: drop their per-request state (sampling generators)."""

    request_ids: list[int]


class SwapOrder(msgspec.Struct):
    """Copy blocks between tiers, layer by layer. direction: "in" (host->device) or "out"."""

    direction: str
    pairs: list[tuple[int, int]]  # (source block, destination block)
    reply: asyncio.Future  # -> SwapDone
    progress: LayerProgress | None = None  # signalled per layer (swap-in)


class ChunkWrite(msgspec.Struct):
    """One full chunk to write to disk, read from a pool block kept busy until PersistDone."""

    index: int  # the chunk's position in its conversation
    uid: str
    tier: str  # "device" or "host"
    block: int


class PersistOrder(msgspec.Struct):
    """Write these chunks, then commit `record` (its refs for `writes` filled in) atomically."""

    record: Any  # disk_store.ConversationRecord
    writes: list[ChunkWrite]
    stale: list[str]  # chunk files the previous record named that this one no longer does
    reply: asyncio.Future  # -> PersistDone


class PersistDone(msgspec.Struct):
    key: str
    writes: list[ChunkWrite]  # the order's
    refs: dict[int, Any]  # chunk index -> disk_store.ChunkRef of each write
    seconds: float
    error: str | None = None


class LoadOrder(msgspec.Struct):
    """Read disk chunks into host blocks (a returning conversation's prefetch)."""

    key: str
    loads: list[tuple[int, Any, int]]  # (chunk index, disk_store.ChunkRef, host block)
    reply: asyncio.Future  # -> LoadDone


class LoadDone(msgspec.Struct):
    key: str
    loads: list[tuple[int, Any, int]]  # the order's
    failed: list[int]  # chunk indexes whose file was missing or corrupt
    seconds: float


class ForgetOnDisk(msgspec.Struct):
    key: str
    uids: list[str]


class SwapDone(msgspec.Struct):
    """A SwapOrder's outcome: either every pair was copied, or `error` says why none counts."""

    blocks: int
    seconds: float
    error: str | None = None
