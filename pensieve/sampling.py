"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import msgspec
import torch

from pensieve.errors import InvalidRequestError


class SamplingParams(msgspec.Struct, kw_only=True):
    """How to pick each next token and when to stop. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    max_tokens: int | None = None  # None = until EOS, a stop string or the context window
    stop: list[str] = msgspec.field(default_factory=list)
    ignore_eos: bool = False  # benchmarks replay a recorded reply length past EOS

    def validate(self) -> SamplingParams:
        """Raise InvalidRequestError naming the first out-of-range field; return self."""
        checks = [
            ("temperature", 0.0 <= self.temperature <= 2.0, "must be between 0 and 2"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("stop", len(self.stop) <= 4, "accepts at most 4 sequences"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for param, ok, why in checks:
            if not ok:
                raise InvalidRequestError(f"{param} {why}", param=param)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator so that a seeded request samples the same tokens in any batch."""
    if params.greedy or params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> int:
    """Pick the next token from one row of logits [vocab]."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator).item())


class StopChecker:
    """Finds stop strings in streamed text, holding back text that may begin a stop string."""

    def __init__(self, stop: list[str]):
        self.stop = stop
        self.pending = ""
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, delta: str) -> tuple[str, bool]:
        """Add a text delta; return (text safe to emit, whether a stop string was hit)."""
        if not self.stop:
            return delta, False
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
