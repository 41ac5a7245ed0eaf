"""The session manager actor: conversations in, text out.

It validates, renders and tokenizes each turn with the model's chat template, checks the
context window, submits the turn to the scheduler (which resolves and owns conversations), and
turns the token events that come back into text deltas (incremental detokenizing, stop strings)
on each turn's stream.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pensieve.actors.base import Actor
from pensieve.errors import ContextLengthError, InvalidRequestError, to_info
from pensieve.messages import (
    Accepted,
    Cancel,
    Delta,
    ErrorInfo,
    Finished,
    OpenTurn,
    Rejected,
    Shutdown,
    Started,
    Submit,
    TokenEvent,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from pensieve.sampling import Sampled, StopChecker
from pensieve.tokenizer import ChatTokenizer, IncrementalDecoder


@dataclass
class OpenRequest:
    """A turn between its OpenTurn and its Finished."""

    request_id: int
    prompt_tokens: int
    decoder: IncrementalDecoder
    stop: StopChecker
    skip_ids: frozenset[int]
    stream: asyncio.Queue
    stopped: bool = False  # a stop string ended it; later tokens are not shown
    generated: list[int] = field(default_factory=list)


class SessionManager(Actor):
    name = "session_manager"

    def __init__(
        self, tokenizer: ChatTokenizer, scheduler: Actor, max_context: int, stateless: bool
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.max_context = max_context
        self.stateless = stateless
        self.requests: dict[int, OpenRequest] = {}

    async def handle(self, message: object) -> None:
        if isinstance(message, TokenEvent):
            self._on_tokens(message)
        elif isinstance(message, OpenTurn):
            self._open(message)
        elif isinstance(message, Accepted):
            request = self.requests.get(message.request_id)
            if request is not None:
                request.stream.put_nowait(Started(message.conversation_id, request.prompt_tokens))
        elif isinstance(message, Rejected):
            self._end(message.request_id, Finished("error", Usage(), message.error))
        elif isinstance(message, Cancel):
            if message.request_id in self.requests:
                self.scheduler.send(message)
        elif isinstance(message, Shutdown):
            message.reply.set_result(None)

    def _open(self, turn: OpenTurn) -> None:
        """Validate and tokenize a turn and submit it; a bad one ends with its error."""
        try:
            prompt = self._prompt(turn)
        except Exception as exc:
            turn.stream.put_nowait(Finished("error", Usage(), to_info(exc)))
            return
        sampling = turn.sampling
        self.requests[turn.request_id] = OpenRequest(
            request_id=turn.request_id,
            prompt_tokens=len(prompt),
            decoder=IncrementalDecoder(self.tokenizer),
            stop=StopChecker(sampling.stop),
            skip_ids=frozenset(() if sampling.ignore_eos else self.tokenizer.eos_token_ids),
            stream=turn.stream,
        )
        self.scheduler.send(
            Submit(
                turn.request_id,
                turn.conversation_id,
                prompt,
                sampling,
                keep_cache=not self.stateless,
                match_prefix=not self.stateless,
                tenant=turn.tenant,
            )
        )

    def _prompt(self, turn: OpenTurn) -> list[int]:
        sampling = turn.sampling.validate()
        if any(t >= self.tokenizer.vocab_size for t in sampling.logit_bias):
            raise InvalidRequestError(
                f"logit_bias names a token id beyond the vocabulary ({self.tokenizer.vocab_size})",
                param="logit_bias",
            )
        cid = turn.conversation_id
        if cid is not None and not (
            isinstance(cid, str) and 0 < len(cid) <= 256 and cid.isprintable()
        ):
            raise InvalidRequestError(
                "conversation_id must be 1-256 printable characters", param="conversation_id"
            )
        if isinstance(turn.messages, str):  # a raw text prompt (legacy completions)
            prompt = self.tokenizer.encode(turn.messages, add_special_tokens=True)
            if not prompt:
                raise InvalidRequestError("the prompt is empty", param="prompt")
        else:
            prompt = self.tokenizer.encode_chat(turn.messages)
        if len(prompt) >= self.max_context:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; this model's context window is "
                f"{self.max_context} tokens"
            )
        max_tokens = turn.sampling.max_tokens
        if max_tokens is not None and len(prompt) + max_tokens > self.max_context:
            raise ContextLengthError(
                f"prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"the context window of {self.max_context} tokens",
                param="max_tokens",
            )
        return prompt

    def _on_tokens(self, event: TokenEvent) -> None:
        request = self.requests.get(event.request_id)
        if request is None:
            return
        logprobs = event.logprobs or [None] * len(event.tokens)
        for token, sampled in zip(event.tokens, logprobs, strict=True):
            if request.stopped:
                continue
            request.generated.append(token)
            entries = [self._logprob(token, sampled)] if sampled is not None else []
            if token in request.skip_ids:
                request.stream.put_nowait(Delta("", [token], entries))
                continue
            text, hit = request.stop.push(request.decoder.push(token))
            request.stream.put_nowait(Delta(text, [token], entries))
            if hit:
                request.stopped = True
                self.scheduler.send(Cancel(request.request_id, "stop"))
        if event.finish_reason is None:
            return
        if not request.stopped:
            tail = request.stop.push(request.decoder.flush())[0] + request.stop.flush()
            if tail:
                request.stream.put_nowait(Delta(tail, []))
        reason = "stop" if request.stopped else event.finish_reason
        error = ErrorInfo("EngineError", event.error) if event.error is not None else None
        self._end(request.request_id, Finished(reason, event.usage or Usage(), error))

    def _logprob(self, token: int, sampled: Sampled) -> TokenLogprob:
        text = self._token_text
        top = [
            TopLogprob(t, text(t), lp)
            for t, lp in zip(sampled.top_ids, sampled.top_logprobs, strict=True)
        ]
        return TokenLogprob(token, text(token), sampled.logprob, top)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _end(self, request_id: int, finished: Finished) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            if not finished.usage.prompt_tokens:
                finished.usage.prompt_tokens = request.prompt_tokens
            request.stream.put_nowait(finished)
