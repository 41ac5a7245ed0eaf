"""The async library: `Engine` wires the actors together; `ChatStream` is one streamed turn.

async with Engine(EngineConfig()) as engine:
    stream = engine.chat([{"role": "user", "content": "Hi!"}], conversation_id="demo")
    async for delta in stream:
        print(delta, end="")
    print(stream.usage)

Both talk to the actors only by message: a turn is an OpenTurn to the session manager, whose
answers arrive on the turn's own queue; questions about conversations and counters go to the
scheduler, which owns the cache, and come back on a future.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

import torch

from pensieve.actors.base import Actor
from pensieve.actors.disk import DiskActor
from pensieve.actors.executor import Executor
from pensieve.actors.scheduler import Scheduler
from pensieve.actors.session_manager import SessionManager
from pensieve.actors.swapper import Swapper
from pensieve.batch_invariant import make_batch_invariant
from pensieve.block_allocator import KVPool
from pensieve.cache import TieredCache
from pensieve.compute_thread import run_on_compute_thread, single_threaded_torch
from pensieve.config import EngineConfig
from pensieve.cpu_decoder import warm_up as warm_up_cpu_decoder
from pensieve.disk_store import DiskStore, fingerprint
from pensieve.durable import DurableCache
from pensieve.errors import (
    ConflictError,
    EngineError,
    InvalidRequestError,
    NotFoundError,
    PensieveError,
    from_info,
)
from pensieve.export import decode_export, encode_export, profile_disk_read
from pensieve.kernels.cpu_attention import warm_up as warm_up_cpu_attention
from pensieve.kv_events import KvEventTracker
from pensieve.linear import pack_for_cpu
from pensieve.messages import (
    Cancel,
    CheckAccounting,
    DeleteConversation,
    Delta,
    ExportConversation,
    Finished,
    GetStats,
    ImportConversation,
    ListConversations,
    OpenTurn,
    Shutdown,
    Started,
    TokenLogprob,
    Usage,
)
from pensieve.policy import CostModel
from pensieve.runtime import LoadedModel, load_pretrained, profile_chunk_cost
from pensieve.sampling import SamplingParams
from pensieve.stats import ConversationInfo, EngineStats
from pensieve.tokenizer import ChatTokenizer

__all__ = ["ChatStream", "Engine", "EngineConfig", "PensieveError", "SamplingParams", "Usage"]

log = logging.getLogger("pensieve.engine")


class ChatStream:
    """Text deltas of one turn as they are generated; usage and finish reason at the end.

    Errors in the request (bad messages, context too long, overload) are raised by the first
    `__anext__`, before any text. `aclose()` cancels the turn and frees its blocks.
    """

    def __init__(self, open_turn: Callable[[asyncio.Queue], int], send: Callable[[Any], None]):
        self._open_turn = open_turn  # sends the OpenTurn, returns its request id
        self._send = send  # the session manager's mailbox
        self._queue: asyncio.Queue | None = None
        self._request_id: int | None = None
        self._done = False
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprob] = []
        self.conversation_id: str | None = None
        self.prompt_tokens: int | None = None
        self.usage: Usage | None = None
        self.finish_reason: str | None = None

    def __aiter__(self) -> ChatStream:
        return self

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _next_item(self) -> Started | Delta | Finished:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._request_id = self._open_turn(self._queue)
        item = await self._queue.get()
        if isinstance(item, Started):
            self.conversation_id, self.prompt_tokens = item.conversation_id, item.prompt_tokens
        elif isinstance(item, Delta):
            self._token_ids += item.token_ids
            self._logprobs += item.logprobs
        else:
            self._done = True
            self.usage, self.finish_reason = item.usage, item.reason
        return item

    async def __anext__(self) -> str:
        while not self._done:
            item = await self._next_item()
            if isinstance(item, Delta) and item.text:
                return item.text
            if isinstance(item, Finished) and item.error is not None:
                if self.conversation_id is None:  # refused before it started
                    raise from_info(item.error)
                raise EngineError(f"generation failed: {item.error.message}")
        raise StopAsyncIteration

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids so far (EOS included when it ended the reply)."""
        return list(self._token_ids)

    def take_logprobs(self) -> list[TokenLogprob]:
        """Log-probabilities of the tokens generated since the last call (if the turn asked)."""
        out, self._logprobs = self._logprobs, []
        return out

    async def text(self) -> str:
        """The whole reply (consumes the stream)."""
        return "".join([delta async for delta in self])

    async def aclose(self) -> None:
        """Cancel the turn if it is still running; waits until its blocks are freed."""
        if self._request_id is not None and not self._done:
            self._send(Cancel(self._request_id))
            try:
                while not self._done:  # wait for the scheduler to confirm, so nothing leaks
                    await self._next_item()
            finally:
                self._done = True
        self._done = True


class Engine:
    """A stateful serving engine for one model. Use as `async with Engine(config) as engine`."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        loaded: LoadedModel | None = None,
        cost_model: CostModel | None = None,
    ):
        self.config = config or EngineConfig()
        self._loaded = loaded
        self._cost_model = cost_model
        self._started = False
        self._request_ids = itertools.count(1)
        self._actors: list[Actor] = []
        self._fingerprint: str | None = None

    # ---- life cycle ----------------------------------------------------------------------

    async def start(self) -> Engine:
        if self._started:
            return self
        cfg = self.config
        if cfg.mode not in ("stateful", "stateless", "device-only"):
            raise InvalidRequestError(f"unknown mode {cfg.mode!r}", param="mode")
        if self._loaded is None:
            self._loaded = await run_on_compute_thread(load_pretrained, cfg)
        model = self._loaded.model
        if cfg.deterministic and model.device.type != "cpu":
            raise InvalidRequestError(
                "--deterministic is built for CPU only so far", param="deterministic"
            )
        await run_on_compute_thread(pack_for_cpu, model)  # no-op where load_pretrained did it
        linears = await run_on_compute_thread(make_batch_invariant, model, cfg.deterministic)
        if cfg.deterministic:
            tiled = sorted(name for name, how in linears.items() if how == "tiles")
            log.info("deterministic: %d of %d matmuls in fixed tiles", len(tiled), len(linears))
        mc = model.config
        self.max_context = mc.max_position_embeddings
        if self._cost_model is None:
            self._cost_model = (
                await run_on_compute_thread(
                    profile_chunk_cost, model, cfg.block_size, min(self.max_context, 8192)
                )
                if cfg.profile_cost
                else CostModel.linear()
            )
        device_blocks = max(1, cfg.device_cache_tokens // cfg.block_size)
        # A conversation must fit the device tier whole while it runs.
        self.max_context = min(self.max_context, device_blocks * cfg.block_size)
        if cfg.max_model_len is not None:
            if cfg.max_model_len < 2:
                raise InvalidRequestError("max_model_len must be >= 2", param="max_model_len")
            self.max_context = min(self.max_context, cfg.max_model_len)
        host_blocks = cfg.host_cache_tokens // cfg.block_size if cfg.mode == "stateful" else 0
        layout = (cfg.block_size, mc.num_key_value_heads, mc.head_dim, model.dtype)
        layers = mc.num_hidden_layers
        # zero-filled on the compute thread, like every parallel op (a CPU pool: `huge_pages`)
        device_pool = await run_on_compute_thread(
            KVPool.empty, layers, device_blocks, *layout, device=model.device
        )
        if model.device.type == "cpu":  # the attention kernel compiles now, not in a request
            await run_on_compute_thread(
                warm_up_cpu_attention, device_pool.keys[0], device_pool.values[0],
                mc.num_attention_heads,
            )  # fmt: skip
            await run_on_compute_thread(warm_up_cpu_decoder, model, device_pool)
        host_pool = None
        if host_blocks:
            host_pool = await run_on_compute_thread(
                KVPool.empty, layers, host_blocks, *layout, torch.device("cpu"), pin_memory=True
            )
        self._layout = (layers, mc.num_key_value_heads, mc.head_dim)
        pools = {"device": device_pool, "host": host_pool}
        disk = None
        kv_events = KvEventTracker.from_config(cfg)  # None unless --kv-events-endpoint
        if cfg.state_dir is not None:
            if host_pool is None:
                raise InvalidRequestError(
                    "--state-dir needs the host tier (stateful mode, host cache > 0)",
                    param="state_dir",
                )
            store = DiskStore(cfg.state_dir, await self.fingerprint())
            records = await asyncio.to_thread(store.load_records)
            read_seconds = await run_on_compute_thread(profile_disk_read, store, host_pool)
            cache: TieredCache = DurableCache(
                cfg.block_size, device_blocks, host_blocks, self._cost_model,
                disk_blocks=max(1, cfg.disk_cache_tokens // cfg.block_size),
                read_seconds=read_seconds,
            )  # fmt: skip
            cache.listener = kv_events  # restored conversations are announced too
            for record in records:
                cache.restore_record(record)  # type: ignore[attr-defined]
            log.info("state dir %s: %d conversations restored", cfg.state_dir, len(records))
            disk = DiskActor(store, device_pool, host_pool)
        else:  # no disk tier; export and import still work
            cache = DurableCache(
                cfg.block_size, device_blocks, host_blocks, self._cost_model, disk_blocks=0
            )
            cache.listener = kv_events
        stop_ids = frozenset(self._loaded.tokenizer.eos_token_ids)
        self._scheduler = Scheduler(
            cache, cfg, self.max_context, stop_ids, layers, pools, kv_events=kv_events
        )
        swapper = Swapper(device_pool, host_pool)
        executor = Executor(model, device_pool, deterministic=cfg.deterministic)
        self._sessions = SessionManager(
            self._loaded.tokenizer, self._scheduler, self.max_context, cfg.mode == "stateless"
        )
        self._scheduler.connect(executor, swapper, self._sessions, disk)
        self._actors = [swapper, executor, self._scheduler, self._sessions]
        if disk is not None:
            self._actors.append(disk)
        for actor in self._actors:
            actor.start()
        self._started = True
        return self

    async def stop(self) -> None:
        """Cancel what is in flight, deliver the final events, and stop every actor."""
        if not self._started:
            return
        await self._ask(self._scheduler, Shutdown)  # every request finishes as cancelled
        await self._ask(self._sessions, Shutdown)  # and its final events reach its stream
        self._started = False
        for actor in self._actors:
            await actor.stop()

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _ask(self, actor: Actor, make: Callable[..., Any], **fields: Any) -> Any:
        """Send a question to an actor and wait for its answer."""
        if not self._started:
            raise EngineError("the engine is not running")
        reply = asyncio.get_running_loop().create_future()
        actor.send(make(reply=reply, **fields))
        return await reply

    # ---- serving -------------------------------------------------------------------------

    def chat(
        self,
        messages: object,
        conversation_id: str | None = None,
        sampling: SamplingParams | None = None,
        *,
        tenant: str = "",
    ) -> ChatStream:
        """Stream the reply to `messages` (OpenAI-style dicts), continuing a cached conversation
        named by `conversation_id` or found by its token prefix, among the tenant's own."""
        if isinstance(messages, str):
            raise InvalidRequestError("messages must be a list of messages", param="messages")
        return self._turn(messages, conversation_id, sampling, tenant)

    def complete(
        self,
        prompt: str,
        conversation_id: str | None = None,
        sampling: SamplingParams | None = None,
        *,
        tenant: str = "",
    ) -> ChatStream:
        """Stream the continuation of a raw text prompt (no chat template): legacy completions.
        A prompt that repeats an earlier prompt and its completion continues its cache too."""
        if not isinstance(prompt, str):
            raise InvalidRequestError("prompt must be a string", param="prompt")
        return self._turn(prompt, conversation_id, sampling, tenant)

    def _turn(
        self, messages: object, cid: str | None, sampling: SamplingParams | None, tenant: str
    ) -> ChatStream:
        turn_sampling = sampling or SamplingParams()

        def open_turn(queue: asyncio.Queue) -> int:
            if not self._started:
                raise EngineError("the engine is not running")
            rid = next(self._request_ids)
            turn = OpenTurn(rid, messages, cid, turn_sampling, queue, tenant=tenant)
            self._sessions.send(turn)
            return rid

        return ChatStream(open_turn, lambda message: self._sessions.send(message))

    async def fingerprint(self) -> str:
        """The digest of weights, dtype, block size and KV layout that disk state is keyed by."""
        if self._fingerprint is None:
            self._fingerprint = await asyncio.to_thread(
                fingerprint, self.loaded.model, self.config.block_size, self._layout
            )
        return self._fingerprint

    async def export_conversation(self, conversation_id: str, tenant: str = "") -> bytes:
        """One conversation as a self-describing safetensors file: token ids, metadata and the
        KV chunks it has in memory (chunks only on disk are left out and recomputed)."""
        found = await self._ask(
            self._scheduler, ExportConversation, conversation_id=conversation_id, tenant=tenant
        )
        if found is None:
            raise NotFoundError(f"no conversation {conversation_id!r}", param="conversation_id")
        record, chunks = found
        fingerprint = await self.fingerprint()
        with single_threaded_torch():
            return encode_export(record, chunks, fingerprint)

    async def import_conversation(
        self, data: bytes, conversation_id: str, tenant: str = ""
    ) -> ConversationInfo:
        """Restore an exported conversation under `conversation_id` (replacing an idle one).
        ConflictError (409) if it was written for another model or the id is in use."""
        fingerprint = await self.fingerprint()
        with single_threaded_torch():
            record, chunks = decode_export(data, fingerprint)
        problem = await self._ask(
            self._scheduler,
            ImportConversation,
            conversation_id=conversation_id,
            record=record,
            chunks=chunks,
            tenant=tenant,
        )
        if problem is not None:
            raise ConflictError(problem, param="conversation_id")
        return await self.conversation(conversation_id, tenant)

    @property
    def tokenizer(self) -> ChatTokenizer:
        return self.loaded.tokenizer

    @property
    def loaded(self) -> LoadedModel:
        """The model and tokenizer; pass to another Engine to share them (benchmarks)."""
        if self._loaded is None:
            raise EngineError("the engine has not loaded its model yet")
        return self._loaded

    @property
    def cost_model(self) -> CostModel | None:
        """The profiled Cost(l); pass to another Engine to skip profiling again."""
        return self._cost_model

    @property
    def model_name(self) -> str:
        return self._loaded.name if self._loaded else "unloaded"

    # ---- conversations and counters (answered by the scheduler) -------------------------

    async def conversations(self, tenant: str = "") -> list[ConversationInfo]:
        """The tenant's stored conversations."""
        return await self._ask(self._scheduler, ListConversations, tenant=tenant)

    async def conversation(self, conversation_id: str, tenant: str = "") -> ConversationInfo:
        """One of the tenant's conversations; another tenant's is NotFoundError, as if absent."""
        found = await self._ask(
            self._scheduler, ListConversations, conversation_id=conversation_id, tenant=tenant
        )
        if not found:
            raise NotFoundError(f"no conversation {conversation_id!r}", param="conversation_id")
        return found[0]

    async def delete_conversation(self, conversation_id: str, tenant: str = "") -> None:
        existed = await self._ask(
            self._scheduler, DeleteConversation, conversation_id=conversation_id, tenant=tenant
        )
        if not existed:
            raise NotFoundError(f"no conversation {conversation_id!r}", param="conversation_id")

    async def stats(self) -> EngineStats:
        return await self._ask(self._scheduler, GetStats)

    async def blocks_in_use(self) -> int:
        stats = await self.stats()
        return stats.device_blocks_used + stats.host_blocks_used

    async def check_accounting(self) -> None:
        """Every block is free or owned by exactly one chunk of a live conversation."""
        problem = await self._ask(self._scheduler, CheckAccounting)
        if problem is not None:
            raise AssertionError(problem)
