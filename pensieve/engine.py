"""The async library: `Engine` wires the actors together; `ChatStream` is one streamed turn.

async with Engine(EngineConfig()) as engine:
    stream = engine.chat([{"role": "user", "content": "Hi!"}], conversation_id="demo")
    async for delta in stream:
        print(delta, end="")
    print(stream.usage)
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from pensieve.actors.base import Replies
from pensieve.actors.executor import Executor
from pensieve.actors.scheduler import Scheduler
from pensieve.actors.session_manager import Finished, OpenRequest, SessionManager
from pensieve.actors.swapper import Swapper
from pensieve.block_allocator import KVPool
from pensieve.cache import TieredCache
from pensieve.config import EngineConfig
from pensieve.errors import EngineError, InvalidRequestError, NotFoundError, PensieveError
from pensieve.messages import DeleteConversation, Usage
from pensieve.policy import CostModel
from pensieve.runtime import LoadedModel, load_pretrained, profile_chunk_cost
from pensieve.sampling import SamplingParams
from pensieve.stats import ConversationInfo, Counters, EngineStats
from pensieve.tokenizer import ChatTokenizer

__all__ = ["ChatStream", "Engine", "EngineConfig", "PensieveError", "SamplingParams", "Usage"]

log = logging.getLogger("pensieve.engine")


class ChatStream:
    """Text deltas of one turn as they are generated; usage and finish reason at the end.

    Errors in the request (bad messages, context too long, overload) are raised by the first
    `__anext__`, before any text. `aclose()` cancels the turn and frees its blocks.
    """

    def __init__(
        self,
        engine: Engine,
        messages: object,
        conversation_id: str | None,
        sampling: SamplingParams,
    ):
        self._engine = engine
        self._args = (messages, conversation_id, sampling)
        self._request: OpenRequest | None = None
        self._done = False
        self.conversation_id: str | None = conversation_id
        self.prompt_tokens: int | None = None
        self.usage: Usage | None = None
        self.finish_reason: str | None = None

    def __aiter__(self) -> ChatStream:
        return self

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _open(self) -> OpenRequest:
        if self._request is None:
            self._request = self._engine._open(*self._args)
            self.conversation_id = self._request.conversation_id
            self.prompt_tokens = self._request.prompt_tokens
        return self._request

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        request = self._open()
        while True:
            item = await request.queue.get()
            if isinstance(item, str):
                if item:
                    return item
                continue
            assert isinstance(item, Finished)
            self._done = True
            self.usage, self.finish_reason = item.usage, item.reason
            if item.error is not None:
                raise EngineError(f"generation failed: {item.error}")
            raise StopAsyncIteration

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids so far (EOS included when it ended the reply)."""
        return list(self._request.token_ids) if self._request is not None else []

    async def text(self) -> str:
        """The whole reply (consumes the stream)."""
        return "".join([delta async for delta in self])

    async def aclose(self) -> None:
        """Cancel the turn if it is still running; its blocks are freed at the next step."""
        if self._request is not None and not self._done:
            self._engine._sessions.cancel(self._request.request_id)
            try:
                while True:  # wait for the scheduler to confirm, so nothing leaks
                    item = await self._request.queue.get()
                    if isinstance(item, Finished):
                        self.usage, self.finish_reason = item.usage, item.reason
                        break
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
        self.counters = Counters()

    # ---- life cycle ----------------------------------------------------------------------

    async def start(self) -> Engine:
        if self._started:
            return self
        cfg = self.config
        if cfg.mode not in ("stateful", "stateless", "device-only"):
            raise InvalidRequestError(f"unknown mode {cfg.mode!r}", param="mode")
        if self._loaded is None:
            self._loaded = await asyncio.to_thread(load_pretrained, cfg)
        model = self._loaded.model
        mc = model.config
        self.max_context = mc.max_position_embeddings
        if self._cost_model is None:
            self._cost_model = (
                await asyncio.to_thread(
                    profile_chunk_cost, model, cfg.block_size, min(self.max_context, 8192)
                )
                if cfg.profile_cost
                else CostModel.linear()
            )
        device_blocks = max(1, cfg.device_cache_tokens // cfg.block_size)
        # A conversation must fit the device tier whole while it runs.
        self.max_context = min(self.max_context, device_blocks * cfg.block_size)
        host_blocks = cfg.host_cache_tokens // cfg.block_size if cfg.mode == "stateful" else 0
        layout = (cfg.block_size, mc.num_key_value_heads, mc.head_dim, model.dtype)
        layers = mc.num_hidden_layers
        self.device_pool = KVPool.empty(layers, device_blocks, *layout, device=model.device)
        host_pool = None
        if host_blocks:
            host_pool = KVPool.empty(
                layers, host_blocks, *layout, device=torch.device("cpu"), pin_memory=True
            )
        self.cache = TieredCache(cfg.block_size, device_blocks, host_blocks, self._cost_model)
        replies = Replies()
        stop_ids = frozenset(self._loaded.tokenizer.eos_token_ids)
        self._scheduler = Scheduler(
            self.cache, cfg, self.max_context, stop_ids, replies, self.counters
        )
        self._swapper = Swapper(self.device_pool, host_pool, replies, self.counters)
        self._executor = Executor(model, self.device_pool, replies, self._swapper.wait_for_layer)
        self._sessions = SessionManager(
            self._loaded.tokenizer,
            self.cache,
            self._scheduler,
            self.max_context,
            cfg.max_queue,
            stateless=cfg.mode == "stateless",
        )
        self._scheduler.connect(self._executor, self._swapper, self._sessions)
        for actor in (self._swapper, self._executor, self._scheduler, self._sessions):
            actor.start()
        self._started = True
        return self

    async def stop(self) -> None:
        """Cancel what is in flight, stop every actor, and wait for their tasks and threads."""
        if not self._started:
            return
        self._started = False
        await self._scheduler.stop()
        await asyncio.sleep(0)
        while not self._sessions.mailbox.empty():  # deliver the final events
            await self._sessions.handle(self._sessions.mailbox.get_nowait())
        for actor in (self._sessions, self._executor, self._swapper):
            await actor.stop()

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- serving -------------------------------------------------------------------------

    def chat(
        self,
        messages: object,
        conversation_id: str | None = None,
        sampling: SamplingParams | None = None,
    ) -> ChatStream:
        """Stream the reply to `messages` (OpenAI-style dicts), continuing a cached conversation
        named by `conversation_id` or found by its token prefix."""
        return ChatStream(self, messages, conversation_id, sampling or SamplingParams())

    def _open(
        self, messages: object, conversation_id: str | None, sampling: SamplingParams
    ) -> OpenRequest:
        if not self._started:
            raise EngineError("the engine is not running")
        return self._sessions.open(messages, conversation_id, sampling)

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

    # ---- conversations and counters -----------------------------------------------------

    def _info(self, cid: str) -> ConversationInfo:
        conv = self.cache.conversations[cid]
        device, host, dropped = conv.tier_tokens(self.cache.block_size)
        wall = time.time() - (time.monotonic() - conv.last_active)
        return ConversationInfo(
            cid, len(conv.tokens), device, host, dropped, wall, conv.turns, conv.owner is not None
        )

    def conversations(self) -> list[ConversationInfo]:
        return [self._info(cid) for cid in list(self.cache.conversations)]

    def conversation(self, conversation_id: str) -> ConversationInfo:
        if conversation_id not in self.cache.conversations:
            raise NotFoundError(f"no conversation {conversation_id!r}", param="conversation_id")
        return self._info(conversation_id)

    async def delete_conversation(self, conversation_id: str) -> None:
        reply_to, done = self._scheduler.replies.open()
        self._scheduler.send(DeleteConversation(conversation_id, reply_to))
        if not await done:
            raise NotFoundError(f"no conversation {conversation_id!r}", param="conversation_id")

    def blocks_in_use(self) -> int:
        host = self.cache.host.num_used if self.cache.host else 0
        return self.cache.device.num_used + host

    def check_accounting(self) -> None:
        """Every block is free or owned by exactly one chunk of a live conversation."""
        self.cache.check()

    def stats(self) -> EngineStats:
        c, cache = self.counters, self.cache
        return EngineStats(
            requests_total=c.requests,
            requests_running=len(self._scheduler.running),
            requests_waiting=len(self._scheduler.waiting),
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
        )
