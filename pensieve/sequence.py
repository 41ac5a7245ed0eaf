"""A request in flight: the turn's prompt, what it generated, and the inputs still to compute."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TypeAlias

from pensieve.messages import SequenceRows, Submit, Usage
from pensieve.sampling import SamplingParams


@dataclass
class Sequence:
    request_id: int
    conversation_id: str
    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop_token_ids: frozenset[int]
    keep_cache: bool = True
    tenant: str = ""  # whose conversation it continues (or creates again, if it was forgotten)
    named: bool = False  # the client named the conversation
    arrival: float = 0.0
    generated: list[int] = field(default_factory=list)
    pending: list[tuple[int, int]] = field(default_factory=list)  # (token, position) to compute
    usage: Usage | None = None  # set at first admission

    @classmethod
    def from_submit(
        cls, msg: Submit, cid: str, max_context: int, stop_token_ids: frozenset[int]
    ) -> Sequence:
        budget = max_context - len(msg.prompt_tokens)
        return cls(
            request_id=msg.request_id,
            conversation_id=cid,
            prompt=list(msg.prompt_tokens),
            sampling=msg.sampling,
            max_tokens=min(msg.sampling.max_tokens or budget, budget),
            stop_token_ids=stop_token_ids,
            keep_cache=msg.keep_cache,
            tenant=msg.tenant,
            named=msg.conversation_id is not None,
            arrival=time.monotonic(),
        )

    def step_rows(self, take: list[tuple[int, int]], block_table: list[int]) -> SequenceRows:
        """This sequence's part of a step: the inputs `take` (a prefix of `pending`)."""
        positions = [p for _, p in take]
        return SequenceRows(
            request_id=self.request_id,
            tokens=[t for t, _ in take],
            positions=positions,
            block_table=block_table,
            context_len=max(positions) + 1,
            sample=len(take) == len(self.pending),
            sampling=self.sampling,
        )

    @property
    def target(self) -> list[int]:
        """Every token the conversation should hold to continue this request."""
        return self.prompt + self.generated

    def finish_reason(self, max_context: int) -> str | None:
        """Why generation stops after the newest token, or None to continue."""
        if not self.generated:
            return None
        if self.generated[-1] in self.stop_token_ids and not self.sampling.ignore_eos:
            return "stop"
        if len(self.generated) >= self.max_tokens or len(self.target) >= max_context:
            return "length"
        return None


Rows: TypeAlias = "tuple[Sequence, list[tuple[int, int]]]"  # a sequence and its inputs in a step
