"""Replay conversation traces the way the Pensieve paper evaluates: open-loop, turn by turn.

Conversations start at Poisson arrival times. Within a conversation the next question is sent
only after the reply has ended plus an exponential think time, and it carries the history with
the target's OWN replies (what a real client would resend), not the recorded ones. Reply
lengths follow the recorded replies, capped, generated past EOS so every system does the same
work.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

import msgspec
from tqdm import tqdm

from pensieve.bench.arrivals import poisson_arrivals, think_times
from pensieve.bench.targets import Message, Target, TurnResult, describe
from pensieve.bench.traces import Conversation, Turn, approx_tokens


class ReplayConfig(msgspec.Struct, kw_only=True):
    rate: float  # conversations started per second
    think_time_mean: float = 2.0  # seconds; the paper uses 60 s on a GPU, scaled for a CPU
    seed: int = 0
    reply_tokens: int | None = None  # fixed reply length; None: recorded length, capped
    max_reply_tokens: int = 128
    duration: float | None = None  # no new conversation starts after this many seconds
    time_limit: float | None = None  # no new turn is sent after this many seconds
    max_requests: int | None = None  # no new turn is sent once this many were sent
    tag: str = "run"  # prefixes conversation ids so runs never share a cached conversation


class TurnRecord(msgspec.Struct, kw_only=True):
    """One replayed turn. Times are seconds since the replay started; None when not reached."""

    system: str
    rate: float
    conversation_id: str
    turn_index: int
    think_s: float  # think time waited before this turn (0 for the first)
    send_time: float
    first_token_time: float | None
    end_time: float
    requested_tokens: int
    prompt_tokens: int | None
    cached_tokens: int | None
    recomputed_tokens: int | None
    completion_tokens: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def reply_budget(turn: Turn, reply_tokens: int | None, max_reply_tokens: int) -> int:
    """Tokens to ask for: the fixed length, or the recorded reply's length capped."""
    if reply_tokens is not None:
        return reply_tokens
    recorded = turn.reply_tokens if turn.reply_tokens is not None else approx_tokens(turn.reply)
    return max(1, min(recorded, max_reply_tokens))


class _Run:
    """Shared state of one replay: the clock origin, the send budget, the records."""

    def __init__(self, target: Target, config: ReplayConfig, system: str, bar: tqdm):
        self.target, self.config, self.system, self.bar = target, config, system, bar
        self.t0 = time.perf_counter()
        self.sent = 0
        self.records: list[TurnRecord] = []

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def may_send(self) -> bool:
        cfg = self.config
        if cfg.time_limit is not None and self.now() >= cfg.time_limit:
            return False
        return cfg.max_requests is None or self.sent < cfg.max_requests

    async def conversation(self, index: int, conv: Conversation, start: float) -> None:
        cfg = self.config
        if cfg.duration is not None and start > cfg.duration:
            self.bar.update(len(conv.turns))  # arrives after the run stops taking newcomers
            return
        await asyncio.sleep(max(0.0, start - self.now()))
        cid = f"{cfg.tag}-{index}-{conv.id}"
        thinks = think_times(cfg.think_time_mean, cfg.seed, index)
        history: list[Message] = []
        done = 0
        for i, turn in enumerate(conv.turns):
            think = next(thinks) if i > 0 else 0.0
            await asyncio.sleep(think)
            if not self.may_send():
                break
            self.sent += 1
            history.append({"role": "user", "content": turn.user})
            budget = reply_budget(turn, cfg.reply_tokens, cfg.max_reply_tokens)
            record, reply = await self.turn(cid, i, think, list(history), budget)
            self.records.append(record)
            done += 1
            self.bar.update(1)
            if not record.ok:
                break  # without a reply there is no history to continue from
            history.append({"role": "assistant", "content": reply})
        self.bar.update(len(conv.turns) - done)

    async def turn(
        self, cid: str, index: int, think: float, messages: list[Message], budget: int
    ) -> tuple[TurnRecord, str]:
        """Send one turn; the record and the reply text that joins the history."""
        send = self.now()
        try:
            result = await self.target.chat(messages, budget, cid)
        except Exception as exc:  # a target that raises still yields a failed turn
            result = TurnResult(error=describe(exc), end_time=time.perf_counter())
        if result.error is None and not result.text:
            result.error = "empty reply"
        first = result.first_token_time
        record = TurnRecord(
            system=self.system,
            rate=self.config.rate,
            conversation_id=cid,
            turn_index=index,
            think_s=think,
            send_time=send,
            first_token_time=None if first is None else first - self.t0,
            end_time=(result.end_time or time.perf_counter()) - self.t0,
            requested_tokens=budget,
            prompt_tokens=result.prompt_tokens,
            cached_tokens=result.cached_tokens,
            recomputed_tokens=result.recomputed_tokens,
            completion_tokens=result.completion_tokens,
            error=result.error,
        )
        return record, result.text


async def replay(
    target: Target,
    conversations: Sequence[Conversation],
    config: ReplayConfig,
    *,
    system: str = "",
    progress: bool = True,
) -> list[TurnRecord]:
    """Replay every conversation against the target; the records are sorted by send time."""
    if math.isnan(config.rate):
        raise ValueError("rate must be a number")
    starts = poisson_arrivals(len(conversations), config.rate, config.seed)
    total = sum(len(c.turns) for c in conversations)
    desc = f"{system or 'replay'} @ {config.rate:g} conv/s"
    with tqdm(total=total, desc=desc, unit="turn", disable=not progress, leave=False) as bar:
        run = _Run(target, config, system, bar)
        pairs = enumerate(zip(conversations, starts, strict=True))
        await asyncio.gather(*(run.conversation(i, c, s) for i, (c, s) in pairs))
    return sorted(run.records, key=lambda r: (r.send_time, r.conversation_id))
