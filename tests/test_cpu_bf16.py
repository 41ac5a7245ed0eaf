"""The AVX512-BF16 CPU attention tile and its 16-lane helpers (kernels/simd512.py,
kernels/cpu_bf16.py): exact bfloat16 dot products, documented reduction orders, exp2's error,
one result whatever the work split or the batch, and the reference's values. Only on CPUs with
`avx512_bf16` (elsewhere the kernel is never compiled and `cpu_tiles` runs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numba import njit

from pensieve.kernels import cpu_attention
from pensieve.kernels.reference import paged_attention_reference
from pensieve.kernels.simd512 import (
    has_avx512_bf16,
    v16first,
    v16hmax,
    v16hsum,
    v16load,
    v16store,
    v16store_bf16,
    v16transpose_words,
    v16zero,
    vdot_bf16_pair,
)
from pensieve.kernels.simd512_math import v16exp2
from pensieve.kernels.testing import make_paged_case

pytestmark = pytest.mark.skipif(not has_avx512_bf16(), reason="this CPU has no AVX512-BF16")


@njit
def _dot_pair(a, fa, b, out):
    v16store(out, 0, vdot_bf16_pair(v16zero(), a, fa, b, 0))


@njit
def _transpose(dst, src):
    v16transpose_words(dst, 0, 32, src, 0, 32)


@njit
def _exp2(x, out):
    for i in range(0, x.size, 16):
        v16store(out, i, v16exp2(v16load(x, i)))


@njit
def _first_max_sum(x, n):
    v = v16first(v16load(x, 0), n, np.float32(-1e30))
    return v16hmax(v), v16hsum(v16first(v16load(x, 0), n, np.float32(0.0)))


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint16).numpy()


def test_vdot_bf16_pair_adds_exact_products_of_the_broadcast_pair():
    # small integers: every product and sum is exact, so any other pairing would show
    a = torch.tensor([0, 0, 3, -5], dtype=torch.bfloat16)
    b = torch.arange(32, 0, -1, dtype=torch.bfloat16)
    out = np.empty(16, np.float32)
    _dot_pair(_bits(a), 2, _bits(b), out)
    expected = b.double().view(16, 2) @ torch.tensor([3.0, -5.0], dtype=torch.double)
    assert np.array_equal(out, expected.numpy().astype(np.float32))


def test_v16transpose_words_turns_rows_of_pairs_into_columns():
    words = np.arange(256, dtype=np.uint32)  # word k of row j: 16 j + k
    out = np.zeros(256, np.uint32)
    _transpose(out.view(np.uint16), words.view(np.uint16))
    assert np.array_equal(out.reshape(16, 16), words.reshape(16, 16).T)


def test_v16exp2_relative_error():
    x = np.linspace(-125.9, 0.0, 16 * 4096).astype(np.float32)
    out = np.empty_like(x)
    _exp2(x, out)
    assert np.max(np.abs(out / np.exp2(x.astype(np.float64)) - 1)) < 1e-6
    under = np.full(16, -1e30, np.float32)  # clamped: tiny, never inf or nan
    _exp2(under, out[:16])
    assert np.all(out[:16] >= 0) and np.all(out[:16] < 1e-37)


@pytest.mark.parametrize("n", [-3, 0, 1, 7, 16, 40])
def test_v16first_keeps_the_first_n_lanes(n):
    x = np.arange(16, dtype=np.float32)
    top, total = _first_max_sum(x, n)
    kept = x[: max(0, min(n, 16))]
    assert top == (kept.max() if kept.size else np.float32(-1e30))
    assert total == kept.sum()


@njit
def _round_bf16(x, out):
    for i in range(0, x.size, 16):
        v16store_bf16(out, i, v16load(x, i))


def test_bf16_store_rounds_as_torch_does():
    """The kernel writes its bfloat16 output itself: the bits torch's `.to(torch.bfloat16)`
    gives, ties (to even) and subnormals included; a NaN stays a NaN."""
    rng = np.random.default_rng(0)
    wide = rng.standard_normal(4096).astype(np.float32) * np.float32(3.0) ** rng.integers(
        -60, 60, 4096
    ).astype(np.float32)
    ties = (rng.integers(0, 1 << 16, 2048, dtype=np.uint32) << 16 | 0x8000).view(np.float32)
    ties = ties[np.isfinite(ties)]  # NaN payloads: torch's vector and scalar paths differ
    tiny = rng.integers(1, 1 << 23, 1024, dtype=np.uint32).view(np.float32)  # subnormals
    special = np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38] + [1.0] * 10, np.float32)
    x = np.concatenate([wide, ties, tiny, -tiny, special]).astype(np.float32)
    x = x.reshape(-1)[: x.size // 16 * 16]
    out = np.empty(x.size, np.uint16)
    _round_bf16(x, out)
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(out, expected)
    nan = np.full(16, np.nan, np.float32)
    _round_bf16(nan, out[:16])
    assert torch.from_numpy(out[:16].view(np.int16)).view(torch.bfloat16).isnan().all()


def _run(case, heads: int) -> torch.Tensor:
    """The kernel with work items of `heads` KV heads each and query tiles of 5."""
    pc = case
    out = torch.empty(pc.q.shape, dtype=torch.bfloat16)
    arrays = tuple(
        t.to(torch.int32).contiguous().numpy()
        for t in (pc.block_tables, pc.query_start, pc.query_positions, pc.context_lens)
    )
    skip = np.zeros(pc.block_tables.shape[0], np.uint8)
    scale = np.float32(cpu_attention._LOG2E / math.sqrt(pc.q.shape[-1]))
    kernel = cpu_attention.bf16_dot_kernel(pc.q, pc.k_cache)
    assert kernel is not None
    k, v = (_bits(c) for c in (pc.k_cache, pc.v_cache))
    row = pc.q.shape[1] * pc.q.shape[2]  # elements from one query to the next in _bits(q)
    kernel(_bits(pc.q).reshape(-1), row, k, v, *arrays, scale, 5, heads, skip, _bits(out))
    return out


SEQS = [(70, [69]), (45, list(range(33, 45))), (9, list(range(9))), (130, [129]), (200, [5])]


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32, 48])
@pytest.mark.parametrize("heads", [(9, 3), (8, 8), (8, 1)])
def test_work_split_does_not_change_a_bit(d, block_size, heads):
    """Items of one KV head or of all give the same bits; both match the reference (pools
    poisoned with NaN wherever no sequence owns a slot)."""
    hq, hkv = heads
    case = make_paged_case(
        SEQS, hq=hq, hkv=hkv, d=d, block_size=block_size, dtype=torch.bfloat16, seed=d
    )
    one, every = _run(case, 1), _run(case, hkv)
    assert torch.equal(one, every)
    assert not every.isnan().any()
    expected = paged_attention_reference(*case.args())
    torch.testing.assert_close(every, expected, atol=1e-2, rtol=1.6e-2)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("seqs", [SEQS, [(70, [69])]], ids=["many", "one-token"])
@pytest.mark.parametrize("column", [0, 2])
def test_queries_read_in_place_from_the_fused_rows(d, seqs, column):
    """q as the model's fused projection leaves it (each token's heads within its wider
    q/k/v row, from column `column` on) is read in place, not copied, and gives the bits of a
    contiguous copy."""
    case = make_paged_case(seqs, d=d, dtype=torch.bfloat16, seed=11)
    tokens, hq, _ = case.q.shape
    fused = torch.randn(tokens, hq + 6, d).to(torch.bfloat16)
    fused[:, column : column + hq] = case.q
    q = fused[:, column : column + hq]
    assert cpu_attention._token_rows(q).data_ptr() == q.data_ptr()
    step = cpu_attention.CpuStep(
        case.block_tables, case.query_start, case.query_positions, case.context_lens
    )
    in_place = step.attention(q, case.k_cache, case.v_cache, case.scale)
    copied = step.attention(q.contiguous(), case.k_cache, case.v_cache, case.scale)
    assert torch.equal(in_place, copied)
    assert not in_place.isnan().any()


def test_a_row_has_the_same_bits_alone_and_in_a_batch():
    """What `--deterministic` relies on: a decode row's output does not depend on its
    neighbours (the batch's rows are the same sequence's last position, alone or among
    others)."""
    seqs = [(300, [299]), (77, [76]), (513, [512]), (16, list(range(16)))]
    batch = make_paged_case(seqs, dtype=torch.bfloat16, seed=3)
    together = _run(batch, 3)
    rows = batch.query_start.tolist()
    for b, (ctx, _) in enumerate(seqs):
        alone = make_paged_case([seqs[b]], dtype=torch.bfloat16, seed=3)
        # the same K, V and queries as in the batch, in a pool of its own
        table = batch.block_tables[b, : -(-ctx // 16)].long()
        alone.k_cache[: table.numel()] = batch.k_cache[table]
        alone.v_cache[: table.numel()] = batch.v_cache[table]
        alone.q.copy_(batch.q[rows[b] : rows[b + 1]])
        alone.block_tables[0, : table.numel()] = torch.arange(table.numel(), dtype=torch.int32)
        assert torch.equal(_run(alone, 1), together[rows[b] : rows[b + 1]])


def test_auto_sends_every_sequence_to_the_bf16_kernel():
    """Where the kernel runs it beats gather + SDPA at every query count measured, so "auto"
    hands it prefill sequences too; float32 keeps the split."""
    seqs = [(40, list(range(40))), (60, [59])]
    for dtype, sdpa_rows in ((torch.bfloat16, 0), (torch.float32, 1)):
        case = make_paged_case(seqs, dtype=dtype, seed=1)
        step = cpu_attention.CpuStep(
            case.block_tables, case.query_start, case.query_positions, case.context_lens
        )
        out = step.attention(case.q, case.k_cache, case.v_cache, case.scale)
        assert int(step.skip.sum()) == sdpa_rows
        expected = paged_attention_reference(*case.args())
        tol = {"atol": 1e-2, "rtol": 1.6e-2} if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(out, expected, **tol)
