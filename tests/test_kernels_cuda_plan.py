"""The CUDA kernels' host-side planning and the inspect report parser, on any host.

`kernels.cuda_plan` and `kernels.inspect.parse_report` import no numba.cuda, so they run in the
pytest process; the kernels themselves are checked in tests/test_kernels_cuda_sim.py.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from pensieve.kernels.cuda_plan import (
    LaunchConfig,
    check_head_dim,
    decode_rows,
    plan_attention,
    prefill_geometry,
)
from pensieve.kernels.inspect import parse_report
from pensieve.kernels.testing import random_seqs

CFG = LaunchConfig()


def _plan(seqs, *, hkv=3, group=3, sms=132, config=CFG, fmt="bfloat16", head_dim=64):
    starts, positions = [0], []
    for _, pos in seqs:
        positions += pos
        starts.append(len(positions))
    plan = plan_attention(
        starts, positions, [c for c, _ in seqs], fmt=fmt, head_dim=head_dim, hkv=hkv,
        group=group, config=config, sms=sms,
    )  # fmt: skip
    return plan, starts, positions


def _covered_rows(plan) -> list[int]:
    """Query rows written: unsplit decode items, merged rows, and unsplit prefill tile rows."""
    rows = [int(t) for t, _, _, _, slot in plan.decode_items if slot < 0]
    rows += [int(t) for t, _, _ in plan.merges]
    rows += [
        r for _, lo, n, _, _, slot, _ in plan.prefill_tiles if slot < 0 for r in range(lo, lo + n)
    ]
    return rows


def _random_chunks(rng: random.Random) -> list[tuple[int, list[int]]]:
    """Prompt chunks of 2-40 tokens after 0-3000 cached ones, with a few decode rows."""
    seqs = []
    for _ in range(rng.randint(1, 6)):
        past, new = rng.randint(0, 3000), rng.randint(1, 40)
        seqs.append((past + new, list(range(past, past + new))))
    return seqs


@pytest.mark.parametrize("seed", range(40))
def test_every_query_row_is_served_exactly_once(seed):
    rng = random.Random(seed)
    if seed % 2:
        seqs = random_seqs(rng, rng.randint(1, 12), max_ctx=rng.choice([40, 3000]))
        seqs = [(max(ctx, 1), pos) for ctx, pos in seqs]
    else:
        seqs = _random_chunks(rng)
    config = LaunchConfig(split_min_keys=rng.choice([16, 256]))
    plan, starts, positions = _plan(seqs, sms=rng.choice([1, 8, 132]), config=config)
    _check_plan(plan, seqs, starts, positions)


def _check_plan(plan, seqs, starts, positions) -> None:
    """Every row written once, directly or by one merge of partials that tile its keys."""
    assert sorted(_covered_rows(plan)) == list(range(len(positions)))
    geo = prefill_geometry("bfloat16", 64, 3, CFG.prefill_threads)
    limits = [min(p + 1, seqs[b][0]) for b in range(len(seqs)) for p in seqs[b][1]]
    written: dict[int, tuple[int, int, int]] = {}  # slot -> (row, first key, end key)
    for b, lo, n, k0, end, first, stride in plan.prefill_tiles:
        assert 1 <= n <= geo.queries and starts[b] <= lo and lo + n <= starts[b + 1]
        tile_end = max(limits[lo : lo + n])
        if first < 0:
            assert (k0, end) == (0, tile_end)
        for i in range(n if first >= 0 else 0):
            slot = first + i * stride
            assert slot not in written and 0 <= slot < plan.slots
            written[slot] = (lo + i, k0, end)
    for t, _, _, k1, slot in plan.decode_items:
        if slot >= 0:
            assert slot not in written and 0 <= slot < plan.slots
            written[slot] = (t, 0, k1)  # its first key is checked by the decode test below
    for row, first, count in plan.merges:
        parts = [written.pop(s) for s in range(first, first + count)]
        assert all(r == row for r, _, _ in parts)
        if any(k0 > 0 for _, k0, _ in parts):  # prefill partitions tile [0, end) in order
            spans = sorted((k0, k1) for _, k0, k1 in parts)
            assert spans[0][0] == 0 and spans[-1][1] >= limits[row]
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert not written, "every partial is merged"


def test_small_long_decode_batch_is_split_and_partitions_tile_the_context():
    plan, _, _ = _plan([(8000, [7999]), (300, [299])], hkv=8, group=4, sms=132)
    assert len(plan.merges) >= 1
    slots = []
    for t, first, n in plan.merges:
        parts = sorted(
            (int(k0), int(k1), int(slot))
            for tt, _, k0, k1, slot in plan.decode_items
            if tt == t and slot >= 0
        )
        assert len(parts) == n and parts[0][0] == 0 and parts[-1][1] == 8000 and n > 1
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
        assert all(k1 - k0 >= CFG.split_min_keys // 2 for k0, k1, _ in parts)
        assert sorted(s for _, _, s in parts) == list(range(first, first + n))
        slots += [s for _, _, s in parts]
    assert plan.slots == len(slots) == len(set(slots))
    lengths = plan.decode_items[:, 3] - plan.decode_items[:, 2]
    assert list(lengths) == sorted(lengths, reverse=True), "longest work first"


def test_a_short_chunk_over_a_long_history_is_split_and_merged_per_row():
    """32 new tokens after 4096 cached: 4 tiles x 3 KV heads would fill 12 of 132 SMs."""
    seqs = [(4128, list(range(4096, 4128))), (1, [0])]
    plan, _, _ = _plan(seqs, sms=132)
    decode_slots = int(plan.merges[plan.merges[:, 0] == 32][:, 2].sum())  # the decode row's
    tiles = plan.prefill_tiles
    assert len(tiles) > 4 * 8 and (tiles[:, 5] >= 0).all()
    written: dict[tuple[int, int], tuple[int, int]] = {}  # (row, slot) -> key range
    for _, lo, n, k0, k1, first, stride in tiles:
        assert k0 % 16 == 0 and k0 < k1 <= 4128
        for i in range(n):
            assert (lo + i, first + i * stride) not in written
            written[(lo + i, first + i * stride)] = (k0, k1)
    for row in range(32):
        (entry,) = [m for m in plan.merges if m[0] == row]
        _, first, count = entry
        ranges = sorted(written[(row, s)] for s in range(first, first + count))
        assert ranges[0][0] == 0 and ranges[-1][1] >= 4097 + row  # the row's causal limit
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert plan.slots == len(written) + decode_slots
    lengths = tiles[:, 4] - tiles[:, 3]
    assert list(lengths) == sorted(lengths, reverse=True), "longest work first"


def test_a_prefill_that_fills_the_gpu_is_not_split():
    plan, _, _ = _plan([(2048, list(range(1024, 2048)))] * 8, sms=132)
    assert (plan.prefill_tiles[:, 5] == -1).all() and len(plan.merges) == 0


def test_large_decode_batch_is_not_split():
    plan, _, _ = _plan([(4000, [3999])] * 64, hkv=8, group=4, sms=132)
    assert len(plan.merges) == 0 and plan.slots == 0 and len(plan.decode_items) == 64


def test_short_contexts_are_never_split():
    plan, _, _ = _plan([(100, [99])], sms=132)
    assert len(plan.merges) == 0


def test_rows_with_queries_but_no_context_are_rejected():
    with pytest.raises(ValueError, match="no context"):
        _plan([(0, [0])])


def test_geometry():
    assert decode_rows("bfloat16", 3) == 3 and decode_rows("bfloat16", 8) == 4
    assert decode_rows("float32", 8) == 8 and decode_rows("float16", 1) == 1
    geo = prefill_geometry("bfloat16", 64, 3, 128)
    assert (geo.lanes, geo.rows, geo.heads, geo.queries, geo.slices) == (4, 32, 3, 10, 1)
    geo = prefill_geometry("bfloat16", 128, 34, 128)
    assert (geo.lanes, geo.rows, geo.heads, geo.slices) == (8, 16, 16, 3)
    for fmt, d in [("bfloat16", 64), ("float16", 128), ("float32", 128), ("bfloat16", 256)]:
        check_head_dim(fmt, d)
    for fmt, d in [("bfloat16", 96), ("bfloat16", 4), ("float32", 256), ("float16", 80)]:
        with pytest.raises(ValueError, match="head dim"):
            check_head_dim(fmt, d)


def test_packed_work_lists_hold_all_three_lists():
    plan, _, _ = _plan([(40, [39]), (20, list(range(20)))], sms=1)
    packed = plan.packed()
    assert packed.dtype == np.int32
    assert packed.size == plan.decode_items.size + plan.merges.size + plan.prefill_tiles.size


def test_parse_report_reads_ptxas_verbose_output():
    report = """ptxas info    : 8 bytes gmem
ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 24 bytes cumulative stack size, 16932 bytes smem
"""
    ptx = "div.s32 %r1, %r2, %r3;\n  rem.u64 %rd1, %rd2, %rd3;\n  ld.local.u32 %r4, [%rd5];\n"
    row = parse_report(report, ptx)
    assert row == {
        "registers": 96,
        "stack_bytes": 24,
        "spill_store_bytes": 8,
        "spill_load_bytes": 12,
        "smem_bytes": 16932,
        "local_ops_in_ptx": 1,
        "int_divisions_in_ptx": 2,
    }
    shared = ".shared .align 4 .b8 _cudapy_smem_1[1024];\n.shared .align 4 .b8 s2[96];\n"
    assert parse_report("Used 3 registers, 0 bytes stack frame", shared)["smem_bytes"] == 1120
