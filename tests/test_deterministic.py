"""Deterministic serving: with the batch-invariant forward, a token's logits are bitwise those of
its whole history served from scratch, whatever its batch neighbours, chunking, tier moves,
drops and recomputation (issue: bitwise-equal logits stateful vs stateless, bf16 too)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from pensieve.attention import ContiguousKV
from pensieve.batch_invariant import TILE_ROWS, make_batch_invariant
from pensieve.block_allocator import KVPool
from pensieve.linear import pack_for_cpu, tiled_linear
from pensieve.messages import SequenceRows
from pensieve.model import LlamaForCausalLM, build_model
from pensieve.paged import PagedAttentionBackend, StepMetadata
from pensieve.runtime import LoadedModel
from pensieve.sampling import SamplingParams

BLOCK = 16
GREEDY = SamplingParams(temperature=0)
GREEDY_12 = SamplingParams(temperature=0, max_tokens=12)


def with_dtype(loaded: LoadedModel, dtype: torch.dtype) -> LlamaForCausalLM:
    """The loaded model's weights in `dtype`, batch-invariant."""
    model = loaded.model
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    twin = build_model(model.config, state, dtype, torch.device("cpu"))
    pack_for_cpu(twin)  # as the engine serves it
    make_batch_invariant(twin)
    return twin


def oracle_logits(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    """Logits of every position of `tokens` served from scratch in one forward."""
    kv = ContiguousKV(model.config.num_hidden_layers, BLOCK)
    ids = torch.tensor(tokens)
    return model.logits(model(ids, torch.arange(len(tokens)), kv))


@dataclass
class Paged:
    """One sequence in a shared pool: its tokens, how far they are computed, its blocks."""

    tokens: list[int]
    done: int = 0
    table: list[int] = field(default_factory=list)


class Pool:
    """A shuffled device pool; freed blocks are poisoned so that a stale read shows as NaN."""

    def __init__(self, model: LlamaForCausalLM, blocks: int, rng: random.Random):
        cfg = model.config
        self.kv = KVPool.empty(
            cfg.num_hidden_layers, blocks, BLOCK, cfg.num_key_value_heads, cfg.head_dim,
            model.dtype, torch.device("cpu"),
        )  # fmt: skip
        self.free = list(range(blocks))
        rng.shuffle(self.free)

    def take(self) -> int:
        return self.free.pop()

    def give(self, block: int) -> None:
        self.kv.keys[:, block] = math.nan
        self.kv.values[:, block] = math.nan
        self.free.insert(0, block)

    def move(self, seq: Paged) -> None:
        """Swap every block out and back in elsewhere (a tier round trip: exact copies)."""
        for i, old in enumerate(seq.table):
            new = self.take()
            self.kv.keys[:, new] = self.kv.keys[:, old]
            self.kv.values[:, new] = self.kv.values[:, old]
            self.give(old)
            seq.table[i] = new


def step_rows(pool: Pool, seq: Paged, rid: int, count: int, recompute: int = 0) -> SequenceRows:
    """Rows for seq's next `count` tokens, after recomputing its first `recompute` positions."""
    positions = list(range(recompute)) + list(range(seq.done, seq.done + count))
    end = seq.done + count
    while len(seq.table) * BLOCK < end:
        seq.table.append(pool.take())
    seq.done = end
    return SequenceRows(
        request_id=rid, tokens=[seq.tokens[p] for p in positions], positions=positions,
        block_table=list(seq.table), context_len=end, sample=True, sampling=GREEDY,
    )  # fmt: skip


def run_step(model: LlamaForCausalLM, pool: Pool, rows: list[SequenceRows]) -> torch.Tensor:
    """The engine's step (executor.run_step's calls) with the logits of every row."""
    meta = StepMetadata.build(rows, BLOCK, torch.device("cpu"))
    ids = torch.tensor([t for r in rows for t in r.tokens])
    backend = PagedAttentionBackend(pool.kv, meta, deterministic=True)
    return model.logits(model(ids, meta.positions.long(), backend))


def serve_in_pieces(model: LlamaForCausalLM, tokens: list[int], seed: int, pressure: str) -> dict:
    """Serve `tokens` in random chunks beside random neighbours, under `pressure`; return the
    logits of every row computed for it, by position (a recomputed position: its last)."""
    rng = random.Random(seed)
    pool = Pool(model, blocks=160, rng=rng)
    target = Paged(tokens)
    vocab = model.config.vocab_size
    neighbours: list[Paged] = []
    seen: dict[int, torch.Tensor] = {}
    while target.done < len(tokens):
        recompute = 0
        if pressure in ("drop", "swap+drop") and target.done >= 2 * BLOCK and rng.random() < 0.4:
            dropped = rng.randint(1, target.done // BLOCK - 1)  # leading chunks dropped
            for i in range(dropped):
                pool.give(target.table[i])
                target.table[i] = pool.take()
            recompute = dropped * BLOCK
        if pressure in ("swap", "swap+drop") and rng.random() < 0.5:
            pool.move(target)
        count = min(rng.choice([1, 1, 2, 3, 7, 16, 29, 64]), len(tokens) - target.done)
        rows = [step_rows(pool, target, 0, count, recompute)]
        while len(neighbours) < rng.randint(0, 4):
            neighbours.append(Paged([rng.randrange(vocab) for _ in range(rng.randint(1, 90))]))
        for i, other in enumerate(list(neighbours)):
            if other.done == len(other.tokens):
                neighbours.remove(other)
                for block in other.table:
                    pool.give(block)
                continue
            n = min(rng.choice([1, 1, 5, 40]), len(other.tokens) - other.done)
            rows.insert(rng.randint(0, len(rows)), step_rows(pool, other, i + 1, n))
        logits = run_step(model, pool, rows)
        start = 0
        for r in rows:
            if r.request_id == 0:
                for j, p in enumerate(r.positions):
                    seen[p] = logits[start + j]
            start += len(r.tokens)
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pressure", ["none", "swap", "drop", "swap+drop"])
@pytest.mark.parametrize("seed", [0, 1])
def test_logits_bitwise_equal_to_the_oracle(tiny: LoadedModel, dtype, pressure, seed) -> None:
    model = with_dtype(tiny, dtype)
    rng = random.Random(100 + seed)
    tokens = [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(120, 220))]
    want = oracle_logits(model, tokens)
    got = serve_in_pieces(model, tokens, seed, pressure)
    assert sorted(got) == list(range(len(tokens)))
    differ = [p for p, row in got.items() if not torch.equal(row, want[p])]
    assert not differ, f"{len(differ)} positions differ, first {differ[:5]}"


def test_tiled_linear_gives_each_row_the_bits_of_any_batch() -> None:
    """The fallback of weights whose library kernel is not row-invariant (float32 here)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 80, generator=gen)
    x = torch.randn(70, 80, generator=gen)

    def matmul(rows: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(rows, weight)

    whole = tiled_linear(x, matmul, TILE_ROWS)
    for start, count in [(0, 1), (3, 2), (5, 16), (9, 17), (40, 30)]:
        part = tiled_linear(x[start : start + count], matmul, TILE_ROWS)
        assert torch.equal(part, whole[start : start + count])
    torch.testing.assert_close(whole, x @ weight.T)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_default_model_logits_bitwise_equal(default_model_dir: Path, dtype) -> None:
    from pensieve.config import EngineConfig
    from pensieve.runtime import load_pretrained

    loaded = load_pretrained(EngineConfig(model=str(default_model_dir), dtype="float32"))
    model = with_dtype(loaded, dtype)
    text = "Tell me about the rivers of Europe and which cities they pass through."
    tokens = loaded.tokenizer.encode_chat([{"role": "user", "content": text}])
    want = oracle_logits(model, tokens)
    got = serve_in_pieces(model, tokens, seed=7, pressure="swap+drop")
    differ = [p for p, row in got.items() if not torch.equal(row, want[p])]
    assert not differ, f"{len(differ)} of {len(got)} positions differ"


@pytest.mark.parametrize("pressure", ["swap", "swap+drop"])
def test_int8_model_logits_bitwise_equal_to_its_own_oracle(tiny: LoadedModel, pressure) -> None:
    """`--quantize int8`: the invariant holds for the quantized model against itself."""
    from pensieve.quantize import quantize_int8

    model = with_dtype(tiny, torch.bfloat16)
    quantize_int8(model)
    make_batch_invariant(model)
    assert all(m.qweight is not None for m in model.modules() if hasattr(m, "qweight"))
    rng = random.Random(5)
    tokens = [rng.randrange(model.config.vocab_size) for _ in range(150)]
    want = oracle_logits(model, tokens)
    got = serve_in_pieces(model, tokens, 3, pressure)
    assert not [p for p, row in got.items() if not torch.equal(row, want[p])]


@pytest.mark.slow
def test_quantize_int8_flag_loads_an_int8_default_model_that_still_answers(
    default_model_dir: Path,
) -> None:
    from pensieve.config import EngineConfig
    from pensieve.reference import reference_generate
    from pensieve.runtime import load_pretrained

    loaded = load_pretrained(EngineConfig(model=str(default_model_dir), quantize="int8"))
    linears = [m for m in loaded.model.modules() if hasattr(m, "qweight")]
    assert linears and all(m.qweight is not None for m in linears)
    tok = loaded.tokenizer
    question = "What is the capital of France? Answer in one sentence."
    prompt = tok.encode_chat([{"role": "user", "content": question}])
    reply = reference_generate(loaded.model, prompt, GREEDY_12, tok.eos_token_ids)
    assert "Paris" in tok.decode(reply)
