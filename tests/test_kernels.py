"""The CPU kernels of the paged KV cache against the torch reference, and argument checks.

The CUDA kernels have their own file (tests/test_kernels_cuda_sim.py): they need the CUDA
simulator, which must be switched on before numba.cuda is imported, so they run in a subprocess.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import pensieve.kernels as kernels
from pensieve.kernels import cpu_sdpa, paged_attention, write_kv
from pensieve.kernels.cpu_attention import paged_attention_cpu
from pensieve.kernels.reference import paged_attention_reference, write_kv_reference
from pensieve.kernels.testing import make_paged_case, random_seqs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# kernel and reference both accumulate in float32; they differ by the final rounding at most
TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2},
    torch.float16: {"atol": 1e-3, "rtol": 1e-3},
}


def assert_matches_reference(case, **kwargs) -> None:
    out = paged_attention_cpu(*case.args(), **kwargs)
    ref = paged_attention_reference(*case.args())
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    assert not out.isnan().any(), "the kernel read a slot outside some context"
    torch.testing.assert_close(out.float(), ref.float(), **TOL[case.q.dtype])


def test_public_api_is_exactly_two_functions():
    assert kernels.__all__ == ["paged_attention", "write_kv"]


@pytest.mark.parametrize("impl", ["auto", "numba", "sdpa"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(9, 3), (8, 8), (8, 1), (12, 4)])
def test_random_mixed_batches(impl, dtype, block_size, heads):
    """Decode, prefill, history prefill, two ranges, shuffled and empty queries in one batch.

    "auto" sends sequences with many queries to gather + SDPA and the rest to the Numba
    kernel; "numba" and "sdpa" check each path on every sequence.
    """
    hq, hkv = heads
    seed = 1000 * DTYPES.index(dtype) + 10 * block_size + hq * hkv
    rng = random.Random(seed)
    for i in range(3):
        seqs = random_seqs(rng, rng.randint(1, 6), max_ctx=3 * block_size + 5)
        case = make_paged_case(
            seqs,
            hq=hq,
            hkv=hkv,
            d=[32, 64, 128][i],  # 64 and 128 are the kernel's literal head dims
            block_size=block_size,
            dtype=dtype,
            seed=seed + i,
        )
        assert_matches_reference(case, impl=impl)


@pytest.mark.parametrize("block_size", [5, 8, 48])
def test_other_block_sizes(block_size):
    """Block sizes that are not 16 or 32, or not a multiple of the kernel's 4-key step."""
    seqs = random_seqs(random.Random(block_size), 5, max_ctx=4 * block_size)
    case = make_paged_case(seqs, block_size=block_size, seed=block_size)
    assert_matches_reference(case, impl="numba")
    assert_matches_reference(case, impl="sdpa")


@pytest.mark.parametrize("query_tile", [1, 3, 16, 64])
def test_query_tiles_split_anywhere(query_tile):
    """Tile boundaries inside one sequence's queries change nothing."""
    seqs = [(70, list(range(70))), (33, [32]), (50, list(range(10)) + list(range(40, 50)))]
    case = make_paged_case(seqs, block_size=16, seed=1)
    assert_matches_reference(case, impl="numba", query_tile=query_tile)


@pytest.mark.parametrize("impl", ["numba", "sdpa"])
def test_two_query_ranges_over_one_context(impl):
    """Dropped prefix 0..d-1 recomputed plus a new prompt c..c+n-1, sharing one context."""
    d, c, n = 20, 45, 7
    case = make_paged_case([(c + n, list(range(d)) + list(range(c, c + n)))], seed=2)
    assert_matches_reference(case, impl=impl)
    # the dropped range sees only itself: the same as a sequence holding just those d tokens
    alone = dataclasses.replace(
        case,
        q=case.q[:d],
        query_start=torch.tensor([0, d], dtype=torch.int32),
        query_positions=case.query_positions[:d],
        context_lens=torch.tensor([d], dtype=torch.int32),
    )
    whole = paged_attention_cpu(*case.args(), impl=impl)
    torch.testing.assert_close(whole[:d], paged_attention_cpu(*alone.args(), impl=impl))


@pytest.mark.parametrize("tile", [7, 16, 256])
def test_sdpa_query_tiles_each_read_only_the_keys_they_see(tile, monkeypatch):
    """`cpu_sdpa` runs a long query range in tiles over a prefix of the keys: a fresh prompt,
    a chunk after cached keys, a dropped prefix recomputed beside a new prompt, unsorted
    positions and one past the context all match the reference at any tile size."""
    monkeypatch.setattr(cpu_sdpa, "QUERY_TILE", tile)
    seqs = [
        (300, list(range(300))),
        (120, list(range(80, 120))),
        (90, list(range(20)) + list(range(60, 90))),
        (50, [49, 0, 17, 16, 31, 5, 40, 41, 2, 3, 30, 29, 28, 27, 26, 25, 200]),
    ]
    assert_matches_reference(make_paged_case(seqs, block_size=16, seed=5), impl="sdpa")


@pytest.mark.parametrize("impl", ["numba", "sdpa"])
def test_unsorted_positions_and_queries_past_the_context(impl):
    seqs = [(40, [39, 0, 17, 16, 31, 5]), (9, [100, 3])]  # position 100 sees all 9 keys
    assert_matches_reference(make_paged_case(seqs, block_size=32, seed=3), impl=impl)


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl must be"):
        paged_attention_cpu(*_good().args(), impl="gpu")


def test_default_model_decode_batch_and_validate_flag():
    rng = random.Random(4)
    seqs = [(n, [n - 1]) for n in (rng.randint(1, 200) for _ in range(12))]
    case = make_paged_case(seqs, hq=9, hkv=3, d=64, block_size=32, dtype=torch.bfloat16, seed=4)
    assert_matches_reference(case)
    checked = paged_attention(*case.args())
    unchecked = paged_attention(*case.args(), validate=False)
    assert torch.equal(checked, unchecked)


def test_all_sequences_without_queries():
    case = make_paged_case([(5, []), (0, [])], seed=5)
    out = paged_attention(*case.args())
    assert out.shape == (0, 9, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_write_kv_matches_reference(dtype, slot_dtype):
    gen = torch.Generator().manual_seed(6)
    k_cache = torch.randn(5, 16, 3, 8, generator=gen).to(dtype)
    v_cache = torch.randn(5, 16, 3, 8, generator=gen).to(dtype)
    qkv = torch.randn(7, 3, 24, generator=gen).to(dtype)
    k, v = qkv[..., :8], qkv[..., 8:16]  # non-contiguous views, as a fused projection gives
    slots = torch.tensor([3, -1, 79, 16, 0, -5, 40], dtype=slot_dtype)
    kc, vc = k_cache.clone(), v_cache.clone()
    write_kv(k, v, k_cache, v_cache, slots)
    write_kv_reference(k, v, kc, vc, slots)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)
    assert torch.equal(k_cache[4, 15], k[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7])
def test_write_kv_from_fused_rows_matches_reference(dtype, tokens):
    """k and v as the model's fused projection leaves them: each token's heads contiguous
    within its q/k/v row, rows apart by the row's width."""
    gen = torch.Generator().manual_seed(8)
    k_cache = torch.randn(5, 16, 3, 8, generator=gen).to(dtype)
    v_cache = torch.randn(5, 16, 3, 8, generator=gen).to(dtype)
    rows = torch.randn(tokens, (6 + 3 + 3) * 8, generator=gen).to(dtype).view(tokens, 12, 8)
    k, v = rows[:, 6:9], rows[:, 9:12]
    slots = torch.tensor([3, -1, 79, 16, 0, -5, 40][:tokens])
    kc, vc = k_cache.clone(), v_cache.clone()
    write_kv(k, v, k_cache, v_cache, slots)
    write_kv_reference(k, v, kc, vc, slots)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)
    assert torch.equal(v_cache[0, 3], v[0])


def test_write_then_attend_round_trip():
    """Tokens written through write_kv are what attention reads back (engine order)."""
    gen = torch.Generator().manual_seed(7)
    k_cache = torch.zeros(4, 16, 1, 8)
    v_cache = torch.zeros(4, 16, 1, 8)
    tables = torch.tensor([[2, 0, 3]], dtype=torch.int32)
    k, v, q = (torch.randn(40, 1, 8, generator=gen) for _ in range(3))
    pos = torch.arange(40)
    slots = tables[0, pos // 16].long() * 16 + pos % 16
    write_kv(k, v, k_cache, v_cache, slots)
    args = (
        q,
        k_cache,
        v_cache,
        tables,
        torch.tensor([0, 40], dtype=torch.int32),
        pos.int(),
        torch.tensor([40], dtype=torch.int32),
        0.35,
    )
    want = (
        torch.softmax(
            (q[:, 0] @ k[:, 0].T * 0.35).masked_fill(pos[None, :] > pos[:, None], float("-inf")), -1
        )
        @ v[:, 0]
    )
    torch.testing.assert_close(paged_attention(*args)[:, 0], want)


def _good():
    return make_paged_case([(20, [19]), (35, [0, 34])], hq=4, hkv=2, d=8, block_size=16, seed=8)


def _set(field, value):
    def mutate(case):
        setattr(case, field, value(case) if callable(value) else value)

    return mutate


I32 = torch.int32
BAD_ATTENTION = {
    "q rank": (_set("q", lambda c: c.q[0]), "q must be"),
    "head dim": (_set("q", lambda c: c.q[..., :4]), "q must be"),
    "q dtype": (_set("q", lambda c: c.q.double()), "q dtype"),
    "gqa ratio": (_set("q", lambda c: c.q[:, :3]), "multiple of the KV heads"),
    "cache shapes": (_set("v_cache", lambda c: c.v_cache[:-1]), "differ in shape"),
    "cache dtype": (_set("k_cache", lambda c: c.k_cache.double()), "unsupported"),
    "cache layout": (_set("k_cache", lambda c: c.k_cache.transpose(1, 2)), "contiguous"),
    "table dtype": (_set("block_tables", lambda c: c.block_tables.long()), "int32"),
    "starts length": (_set("query_start", torch.tensor([0, 3], dtype=I32)), r"shape \[3\]"),
    "starts end": (_set("query_start", torch.tensor([0, 1, 2], dtype=I32)), "end at T=3"),
    "starts order": (_set("query_start", torch.tensor([0, 2, 1], dtype=I32)), "never decrease"),
    "starts begin": (_set("query_start", torch.tensor([1, 1, 3], dtype=I32)), "start at 0"),
    "positions dtype": (_set("query_positions", lambda c: c.query_positions.long()), "int32"),
    "negative position": (
        _set("query_positions", torch.tensor([19, -1, 3], dtype=I32)),
        "must be >= 0",
    ),
    "context too long": (_set("context_lens", torch.tensor([20, 65], dtype=I32)), "max_blocks"),
    "negative context": (_set("context_lens", torch.tensor([-1, 35], dtype=I32)), "context_lens"),
    "empty context": (_set("context_lens", torch.tensor([0, 35], dtype=I32)), "nothing to attend"),
    "block id range": (
        _set("block_tables", lambda c: c.block_tables.clone().fill_(9)),
        "not a block id",
    ),
    "padded block used": (
        _set("context_lens", torch.tensor([20, 49], dtype=I32)),
        r"block_tables\[1, 3\] = -1",
    ),
    "scale": (_set("scale", float("nan")), "scale"),
}


@pytest.mark.parametrize("name", list(BAD_ATTENTION))
def test_bad_attention_arguments_raise_value_error(name):
    mutate, message = BAD_ATTENTION[name]
    good = _good()
    paged_attention(*good.args())
    mutate(good)
    with pytest.raises(ValueError, match=message):
        paged_attention(*good.args())
    with pytest.raises(ValueError, match=message):
        paged_attention_reference(*good.args())


def test_table_entries_past_a_context_may_be_anything():
    case = _good()
    want = paged_attention(*case.args())
    case.block_tables[0, 2:] = 12345  # sequence 0 has 20 tokens: blocks 0 and 1 only
    torch.testing.assert_close(paged_attention(*case.args()), want)


def test_bad_write_kv_arguments_raise_value_error():
    k_cache = torch.zeros(2, 16, 2, 4)
    v_cache = torch.zeros(2, 16, 2, 4)
    k = torch.zeros(3, 2, 4)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="only 32 slots"):
        write_kv(k, k, k_cache, v_cache, torch.tensor([0, 32, 1]))
    with pytest.raises(ValueError, match="slot_mapping must be"):
        write_kv(k, k, k_cache, v_cache, slots.float())
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        write_kv(k, k, k_cache, v_cache, slots[:2])
    with pytest.raises(ValueError, match="k must be"):
        write_kv(k[..., :2], k, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="dtype"):
        write_kv(k.half(), k.half(), k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="differ in shape"):
        write_kv(k, k[:2], k_cache, v_cache, slots)
