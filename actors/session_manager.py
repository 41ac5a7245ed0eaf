"""The session manager actor: conversations in, text out.

It renders and tokenizes each turn with the model's chat template, finds the conversation the
turn continues (explicit id, or the longest stored token prefix), checks the context window,
submits the turn to the scheduler, and turns the token events that come back into text deltas
(incremental detokenizing, stop strings) on each request's stream.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import dataclass, field

from pensieve.actors.base import Actor
from pensieve.cache import TieredCache
from pensieve.errors import ContextLengthError, InvalidRequestError, OverloadedError
from pensieve.messages import Cancel, Submit, TokenEvent, Usage
from pensieve.sampling import SamplingParams, StopChecker
from pensieve.tokenizer import ChatTokenizer, IncrementalDecoder


@dataclass
class Finished:
    """The last item of a request's stream."""

    reason: str
    usage: Usage
    error: str | None = None


@dataclass
class OpenRequest:
    request_id: int
    conversation_id: str
    prompt_tokens: int
    decoder: IncrementalDecoder
    stop: StopChecker
    skip_ids: frozenset[int]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    stopped: bool = False  # a stop string ended it; later tokens are not shown
    token_ids: list[int] = field(default_factory=list)  # every generated id, EOS included


class SessionManager(Actor):
    name = "session_manager"

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        cache: TieredCache,
        scheduler: Actor,
        max_context: int,
        max_queue: int,
        stateless: bool,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.cache = cache  # read only here: the scheduler owns it
        self.scheduler = scheduler
        self.max_context = max_context
        self.max_queue = max_queue
        self.stateless = stateless
        self.requests: dict[int, OpenRequest] = {}
        self.claimed: dict[str, int] = {}  # conversation -> request that continues it
        self._ids = itertools.count(1)

    def open(
        self, messages: object, conversation_id: str | None, sampling: SamplingParams
    ) -> OpenRequest:
        """Validate, tokenize and submit one turn. Raises PensieveError subclasses."""
        sampling.validate()
        if conversation_id is not None and not (
            isinstance(conversation_id, str) and 0 < len(conversation_id) <= 256
        ):
            raise InvalidRequestError(
                "conversation_id must be 1-256 characters", param="conversation_id"
            )
        prompt = self.tokenizer.encode_chat(messages)
        if len(prompt) >= self.max_context:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; this model's context window is "
                f"{self.max_context} tokens"
            )
        if sampling.max_tokens is not None and len(prompt) + sampling.max_tokens > self.max_context:
            raise ContextLengthError(
                f"prompt ({len(prompt)} tokens) plus max_tokens ({sampling.max_tokens}) exceeds "
                f"the context window of {self.max_context} tokens",
                param="max_tokens",
            )
        if getattr(self.scheduler, "num_waiting", 0) >= self.max_queue:
            raise OverloadedError(
                "the server is busy: too many requests waiting", retry_after_s=1.0
            )
        cid = self._resolve(prompt, conversation_id)
        request = OpenRequest(
            request_id=next(self._ids),
            conversation_id=cid,
            prompt_tokens=len(prompt),
            decoder=IncrementalDecoder(self.tokenizer),
            stop=StopChecker(sampling.stop),
            skip_ids=frozenset(() if sampling.ignore_eos else self.tokenizer.eos_token_ids),
        )
        self.requests[request.request_id] = request
        self.claimed[cid] = request.request_id
        self.scheduler.send(
            Submit(
                request.request_id,
                cid,
                prompt,
                sampling,
                keep_cache=not self.stateless,
                named=conversation_id is not None,
            )
        )
        return request

    def _resolve(self, prompt: list[int], conversation_id: str | None) -> str:
        if conversation_id is not None:
            return conversation_id
        if not self.stateless:
            cid, _ = self.cache.match(prompt, exclude=set(self.claimed))
            if cid is not None:
                return cid
        return uuid.uuid4().hex

    def cancel(self, request_id: int, reason: str = "cancelled") -> None:
        if request_id in self.requests:
            self.scheduler.send(Cancel(request_id, reason))

    async def handle(self, message: TokenEvent) -> None:
        request = self.requests.get(message.request_id)
        if request is None:
            return
        for token in message.tokens:
            if not request.stopped:
                request.token_ids.append(token)
            if request.stopped or token in request.skip_ids:
                continue
            text, hit = request.stop.push(request.decoder.push(token))
            if text:
                request.queue.put_nowait(text)
            if hit:
                request.stopped = True
                self.scheduler.send(Cancel(request.request_id, "stop"))
        if message.finish_reason is None:
            return
        if not request.stopped:
            tail = request.stop.push(request.decoder.flush())[0] + request.stop.flush()
            if tail:
                request.queue.put_nowait(tail)
        reason = "stop" if request.stopped else message.finish_reason
        usage = message.usage or Usage(request.prompt_tokens)
        request.queue.put_nowait(Finished(reason, usage, message.error))
        del self.requests[request.request_id]
        if self.claimed.get(request.conversation_id) == request.request_id:
            del self.claimed[request.conversation_id]
