"""The stateless reference generator: one conversation, contiguous KV, from scratch every time.

This is the oracle. Every cached, swapped, dropped-and-recomputed path of the engine must give
the tokens this gives for the same history.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from pensieve.attention import ContiguousKV
from pensieve.model import LlamaForCausalLM
from pensieve.sampling import RequestSampler, Sampled, SamplingParams


def generate_sampled(
    model: LlamaForCausalLM,
    prompt: list[int],
    sampling: SamplingParams,
    stop_token_ids: Iterable[int] = (),
    block_size: int | None = None,
) -> Iterator[tuple[int, Sampled | None]]:
    """Yield (token id, its log-probabilities when asked for) until EOS (unless ignore_eos),
    max_tokens or the context end.

    `block_size`: attend in the paged kernel's batch-invariant order over blocks of that size
    (the engine's, for bitwise comparisons with `--deterministic`); None: torch SDPA."""
    if not prompt:
        raise ValueError("the prompt is empty")
    max_context = model.config.max_position_embeddings
    limit = min(sampling.max_tokens or max_context, max_context - len(prompt))
    stops = frozenset(stop_token_ids)
    sampler = RequestSampler(sampling, model.device)
    kv = ContiguousKV(model.config.num_hidden_layers, block_size)
    inputs = torch.tensor(prompt, dtype=torch.long, device=model.device)
    position = 0
    for _ in range(max(limit, 0)):
        positions = torch.arange(position, position + len(inputs), device=model.device)
        hidden = model(inputs, positions, kv)
        token, logprobs = sampler.sample(model.logits(hidden[-1:])[0])
        yield token, logprobs
        if token in stops and not sampling.ignore_eos:
            return
        position += len(inputs)
        inputs = torch.tensor([token], dtype=torch.long, device=model.device)


def generate_tokens(
    model: LlamaForCausalLM,
    prompt: list[int],
    sampling: SamplingParams,
    stop_token_ids: Iterable[int] = (),
    block_size: int | None = None,
) -> Iterator[int]:
    """`generate_sampled`'s token ids only."""
    for token, _ in generate_sampled(model, prompt, sampling, stop_token_ids, block_size):
        yield token


def reference_generate(
    model: LlamaForCausalLM,
    prompt: list[int],
    sampling: SamplingParams,
    stop_token_ids: Iterable[int] = (),
    block_size: int | None = None,
) -> list[int]:
    return list(generate_tokens(model, prompt, sampling, stop_token_ids, block_size))
