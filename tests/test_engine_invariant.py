"""The invariant: a conversation served statefully (cached, swapped, partly dropped and
recomputed, in any batch) yields the greedy tokens of its whole history served from scratch."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from pensieve.config import EngineConfig
from pensieve.engine import Engine
from pensieve.policy import CostModel
from pensieve.reference import reference_generate
from pensieve.runtime import LoadedModel
from pensieve.sampling import SamplingParams

WORDS = "the a cat dog sees runs blue red tree house why how many seven rivers quietly".split()


async def replay(
    engine: Engine,
    n_convs: int,
    turns: int,
    seed: int,
    explicit_ids: bool,
    *,
    round_robin: int = 0,
) -> list[tuple[list[int], SamplingParams, list[int]]]:
    """Run conversations concurrently in random order, then `round_robin` more turns of each,
    one conversation after another; return (prompt, sampling, generated) of every turn. The
    round-robin turns come back after the others have taken the device tier: where it is small,
    each restores what was swapped out, whatever the timing of the concurrent part."""
    rng = random.Random(seed)
    records: list[tuple[list[int], SamplingParams, list[int]]] = []
    histories: list[list[dict]] = [[] for _ in range(n_convs)]

    async def turn(i: int) -> None:
        history = histories[i]
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25)))
        history.append({"role": "user", "content": words})
        sampling = SamplingParams(temperature=0, max_tokens=rng.randint(2, 14))
        prompt = engine.tokenizer.encode_chat(history)
        stream = engine.chat(history, f"conv-{seed}-{i}" if explicit_ids else None, sampling)
        reply = await stream.text()
        records.append((prompt, sampling, stream.token_ids))
        history.append({"role": "assistant", "content": reply})

    async def conversation(i: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(rng.random() * 0.05)
            await turn(i)

    await asyncio.wait_for(asyncio.gather(*(conversation(i) for i in range(n_convs))), 120)
    for _ in range(round_robin):
        for i in range(n_convs):
            await asyncio.wait_for(turn(i), 60)
    return records


def assert_matches_reference(loaded: LoadedModel, records: list) -> None:
    eos = loaded.tokenizer.eos_token_ids
    for prompt, sampling, generated in records:
        expected = reference_generate(loaded.model, prompt, sampling, eos)
        assert generated == expected


PRESSURES = {
    # name: (device tokens, host tokens, mode); prompts reach ~250 tokens
    "no-eviction": (8192, 8192, "stateful"),
    "swap-only": (512, 8192, "stateful"),
    "swap-and-drop": (384, 96, "stateful"),
    "device-only": (384, 0, "device-only"),
}


@pytest.mark.parametrize("pressure", list(PRESSURES))
@pytest.mark.parametrize("seed", [1, 2])
async def test_stateful_equals_stateless_under_pressure(
    tiny: LoadedModel, pressure: str, seed: int
) -> None:
    device, host, mode = PRESSURES[pressure]
    config = EngineConfig(
        block_size=16,
        device_cache_tokens=device,
        host_cache_tokens=host,
        mode=mode,
        max_batch_tokens=64,
        profile_cost=False,
    )
    async with Engine(config, loaded=tiny, cost_model=CostModel.linear()) as engine:
        # swap-only: one more turn each, in turn, restores what the others pushed to the host
        # (512 device tokens; the other tiers' prompts would outgrow their 384 with it)
        more = 1 if pressure == "swap-only" else 0
        records = await replay(
            engine, n_convs=4, turns=4, seed=seed, explicit_ids=seed == 1, round_robin=more
        )
        stats = await engine.stats()
        await engine.check_accounting()
        assert all(not c.active for c in (await engine.conversations()))
    assert_matches_reference(tiny, records)
    later = [r for r in records if len(r[0]) > 60]
    assert later, "the replay should build up history"
    if pressure == "no-eviction":
        assert stats.cached_tokens_total > 0 and stats.swap_out_blocks_total == 0
    if pressure == "swap-only":
        assert stats.swap_out_blocks_total > 0 and stats.dropped_tokens_total == 0
        assert stats.swap_in_blocks_total > 0  # returning conversations were restored
    if pressure in ("swap-and-drop", "device-only"):
        assert stats.dropped_tokens_total > 0 and stats.recomputed_tokens_total > 0


async def test_cancel_mid_stream_frees_everything(tiny: LoadedModel) -> None:
    config = EngineConfig(
        block_size=16, device_cache_tokens=512, host_cache_tokens=512, profile_cost=False
    )
    async with Engine(config, loaded=tiny, cost_model=CostModel.linear()) as engine:
        sampling = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        stream = engine.chat([{"role": "user", "content": "tell me a long story"}], "c", sampling)
        async for _ in stream:
            if len(stream.token_ids) >= 5:
                break
        await stream.aclose()
        assert stream.finish_reason == "cancelled"
        await engine.check_accounting()
        info = await engine.conversation("c")
        assert not info.active
        assert (await engine.blocks_in_use()) == -(-info.tokens_total // 16)
        await engine.delete_conversation("c")
        assert (await engine.blocks_in_use()) == 0


async def test_stateless_mode_forgets(tiny: LoadedModel) -> None:
    config = EngineConfig(block_size=16, mode="stateless", profile_cost=False)
    async with Engine(config, loaded=tiny, cost_model=CostModel.linear()) as engine:
        records = await replay(engine, n_convs=2, turns=2, seed=3, explicit_ids=False)
        assert (await engine.stats()).cached_tokens_total == 0
        assert (await engine.blocks_in_use()) == 0 and (await engine.conversations()) == []
    assert_matches_reference(tiny, records)


async def test_default_model_stateful_equals_stateless_with_swaps_and_drops(
    default_model_dir: Path,
) -> None:
    """The real SmolLM2 weights, float32: cached, swapped and dropped turns keep their tokens."""
    from pensieve.runtime import load_pretrained

    base = EngineConfig(model=str(default_model_dir), dtype="float32", device="cpu")
    loaded = load_pretrained(base)
    config = EngineConfig(
        block_size=16,
        device_cache_tokens=320,
        host_cache_tokens=64,
        max_batch_tokens=96,
        profile_cost=False,
    )
    async with Engine(config, loaded=loaded, cost_model=CostModel.linear()) as engine:
        records = await replay(engine, n_convs=3, turns=3, seed=5, explicit_ids=False)
        stats = await engine.stats()
        await engine.check_accounting()
    assert stats.cached_tokens_total > 0 and stats.swap_out_blocks_total > 0
    assert stats.dropped_tokens_total > 0
    assert_matches_reference(loaded, records)


async def test_anonymous_request_never_takes_over_a_named_conversation(tiny: LoadedModel) -> None:
    config = EngineConfig(block_size=16, device_cache_tokens=1024, profile_cost=False)
    async with Engine(config, loaded=tiny, cost_model=CostModel.linear()) as engine:
        greedy = SamplingParams(temperature=0, max_tokens=4)
        first = [{"role": "user", "content": "hi"}]
        await engine.chat(first, "demo", greedy).text()
        before = (await engine.conversation("demo")).tokens_total
        other = engine.chat([{"role": "user", "content": "hi there, who are you?"}], None, greedy)
        await other.text()
        assert other.conversation_id != "demo"
        assert (await engine.conversation("demo")).tokens_total == before
        # an anonymous client resending its own history does find its conversation again
        history = [
            {"role": "user", "content": "hi there, who are you?"},
            {"role": "assistant", "content": engine.tokenizer.decode(other.token_ids)},
            {"role": "user", "content": "and then?"},
        ]
        again = engine.chat(history, None, greedy)
        await again.text()
        assert again.conversation_id == other.conversation_id
        assert again.usage.cached_tokens > 0
        await engine.check_accounting()


async def test_suspension_restores_and_keeps_tokens(tiny: LoadedModel) -> None:
    """Three long replies at once on a device tier that holds two: the newest is suspended,
    its chunks swapped out, and it resumes (restored) with the tokens it would have had."""
    config = EngineConfig(
        block_size=16,
        device_cache_tokens=224,
        host_cache_tokens=1024,
        max_batch_tokens=128,
        decode_reserve=0.0,
        profile_cost=False,
    )
    sampling = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    async with Engine(config, loaded=tiny, cost_model=CostModel.linear()) as engine:

        async def one(i: int) -> tuple[list[int], SamplingParams, list[int]]:
            history = [{"role": "user", "content": " ".join(WORDS[i:] + WORDS[:i]) * 2}]
            stream = engine.chat(history, f"s{i}", sampling)
            await stream.text()
            return engine.tokenizer.encode_chat(history), sampling, stream.token_ids

        records = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(3))), 120)
        stats = await engine.stats()
        await engine.check_accounting()
    assert stats.preemptions_total > 0 and stats.swap_in_blocks_total > 0
    assert_matches_reference(tiny, records)
