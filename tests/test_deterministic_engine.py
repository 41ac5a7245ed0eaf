"""`--deterministic` through the whole engine: replies and their log-probabilities under cache
pressure equal, bit for bit, the whole history served from scratch; and a workload gives the
same tokens at concurrency 1 and 8."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from pensieve.config import EngineConfig
from pensieve.engine import Engine
from pensieve.model import LlamaForCausalLM
from pensieve.policy import CostModel
from pensieve.reference import generate_sampled
from pensieve.runtime import LoadedModel
from pensieve.sampling import SamplingParams
from tests.test_deterministic import BLOCK, with_dtype
from tests.test_engine_invariant import WORDS

PRESSURES = {  # name: (device tokens, host tokens); prompts reach ~250 tokens
    "no-eviction": (8192, 8192),
    "swap-only": (512, 8192),
    "swap-and-drop": (384, 96),
}

Record = tuple[list[int], SamplingParams, list[int], list[tuple]]


def sampling_for(rng: random.Random) -> SamplingParams:
    """Greedy or seeded sampling, always with log-probabilities (the bits we compare)."""
    seeded = rng.random() < 0.5
    return SamplingParams(
        temperature=0.8 if seeded else 0.0,
        seed=rng.randrange(1 << 30) if seeded else None,
        max_tokens=rng.randint(2, 12),
        logprobs=True,
        top_logprobs=5,
    )


async def replay(engine: Engine, n_convs: int, turns: int, seed: int, at_once: int) -> list:
    """Conversations with random user turns, `at_once` running concurrently."""
    gate = asyncio.Semaphore(at_once)
    records: dict[tuple[int, int], Record] = {}

    async def conversation(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        history: list[dict] = []
        for turn in range(turns):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25)))
            history.append({"role": "user", "content": words})
            sampling = sampling_for(rng)
            async with gate:
                stream = engine.chat(history, f"c{i}", sampling)
                reply = await stream.text()
            bits = [
                (lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
                for lp in stream.take_logprobs()
            ]
            prompt = engine.tokenizer.encode_chat(history)
            records[(i, turn)] = (prompt, sampling, stream.token_ids, bits)
            history.append({"role": "assistant", "content": reply})

    await asyncio.wait_for(asyncio.gather(*(conversation(i) for i in range(n_convs))), 300)
    return [records[k] for k in sorted(records)]


def oracle_reply(model: LlamaForCausalLM, prompt: list[int], sampling: SamplingParams, eos):
    """Tokens and log-probabilities of the whole history served from scratch."""
    tokens, bits = [], []
    for token, lp in generate_sampled(model, prompt, sampling, eos, block_size=BLOCK):
        tokens.append(token)
        bits.append((token, lp.logprob, list(zip(lp.top_ids, lp.top_logprobs, strict=True))))
    return tokens, bits


def engine_config(pressure: str, **overrides) -> EngineConfig:
    device, host = PRESSURES[pressure]
    return EngineConfig(
        block_size=BLOCK, device_cache_tokens=device, host_cache_tokens=host,
        max_batch_tokens=48, profile_cost=False, deterministic=True, **overrides,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pressure", list(PRESSURES))
async def test_replies_and_logprobs_bitwise_equal_to_the_oracle(
    tiny: LoadedModel, dtype: torch.dtype, pressure: str
) -> None:
    loaded = LoadedModel(with_dtype(tiny, dtype), tiny.tokenizer, tiny.folder, 0.0)
    async with Engine(engine_config(pressure), loaded=loaded, cost_model=CostModel.linear()) as e:
        records = await replay(e, n_convs=4, turns=4, seed=1, at_once=4)
        stats = await e.stats()
        await e.check_accounting()
    if pressure == "swap-only":
        assert stats.swap_out_blocks_total > 0 and stats.swap_in_blocks_total > 0
    if pressure == "swap-and-drop":
        assert stats.dropped_tokens_total > 0 and stats.recomputed_tokens_total > 0
    eos = set(tiny.tokenizer.eos_token_ids)
    for prompt, sampling, tokens, bits in records:
        want_tokens, want_bits = oracle_reply(loaded.model, prompt, sampling, eos)
        assert tokens == want_tokens
        assert bits == want_bits  # float equality: the very same bits


async def test_same_tokens_at_concurrency_1_and_8(tiny: LoadedModel) -> None:
    loaded = LoadedModel(with_dtype(tiny, torch.bfloat16), tiny.tokenizer, tiny.folder, 0.0)
    runs = []
    for at_once in (1, 8):
        config = engine_config("swap-and-drop")
        async with Engine(config, loaded=loaded, cost_model=CostModel.linear()) as engine:
            runs.append(await replay(engine, n_convs=8, turns=3, seed=2, at_once=at_once))
    assert [r[2:] for r in runs[0]] == [r[2:] for r in runs[1]]


async def test_suspended_and_resumed_replies_are_bitwise_equal(tiny: LoadedModel) -> None:
    """Three long replies on a device tier that holds two: the newest is suspended, swapped
    out, restored; its tokens and log-probabilities stay those of the oracle, in bf16."""
    loaded = LoadedModel(with_dtype(tiny, torch.bfloat16), tiny.tokenizer, tiny.folder, 0.0)
    config = EngineConfig(
        block_size=BLOCK, device_cache_tokens=224, host_cache_tokens=1024, max_batch_tokens=128,
        decode_reserve=0.0, profile_cost=False, deterministic=True,
    )  # fmt: skip
    sampling = SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True, logprobs=True, top_logprobs=3
    )
    async with Engine(config, loaded=loaded, cost_model=CostModel.linear()) as engine:

        async def one(i: int) -> tuple[list[int], list[int], list[tuple]]:
            history = [{"role": "user", "content": " ".join(WORDS[i:] + WORDS[:i]) * 2}]
            stream = engine.chat(history, f"s{i}", sampling)
            await stream.text()
            bits = [
                (lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
                for lp in stream.take_logprobs()
            ]
            return engine.tokenizer.encode_chat(history), stream.token_ids, bits

        records = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(3))), 120)
        stats = await engine.stats()
    assert stats.preemptions_total > 0 and stats.swap_in_blocks_total > 0
    for prompt, tokens, bits in records:
        assert (tokens, bits) == oracle_reply(loaded.model, prompt, sampling, set())
