"""The register-blocked CPU attention tile and its f32x8 helpers (kernels/simd.py,
kernels/cpu_tiles.py): exact widening, the reduction order, and one result whatever the work
split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numba import njit

from pensieve.kernels import cpu_attention
from pensieve.kernels.cpu_tiles import simd_shape, tile_kind
from pensieve.kernels.reference import paged_attention_reference
from pensieve.kernels.simd import vfma, vload, vload_bf16, vload_f16, vsplat, vstore, vsum8x8
from pensieve.kernels.testing import make_paged_case

# the reference rounds to the pool's dtype, as the kernel's caller does
TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2},
    torch.float16: {"atol": 1e-3, "rtol": 1e-3},
}


@njit
def _sum_rows(x, out):
    """out[k] = the lane sum of row k of x [8, 8], through vsum8x8."""
    vstore(
        out, 0,
        vsum8x8(vload(x, 0), vload(x, 8), vload(x, 16), vload(x, 24),
                vload(x, 32), vload(x, 40), vload(x, 48), vload(x, 56)),
    )  # fmt: skip


@njit
def _widen_bf16(bits, out):
    for i in range(0, bits.size, 8):
        vstore(out, i, vload_bf16(bits, i))


@njit
def _widen_f16(bits, out):
    for i in range(0, bits.size, 8):
        vstore(out, i, vload_f16(bits, i))


@njit
def _axpy(a, x, y, out):
    vstore(out, 0, vfma(vsplat(a), vload(x, 0), vload(y, 0)))


def test_vsum8x8_adds_each_vector_in_its_documented_order():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 8)).astype(np.float32) * np.float32(1e4)
    out = np.empty(8, np.float32)
    _sum_rows(x.reshape(-1), out)
    lanes = [x[:, i] for i in range(8)]
    tree = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + (
        (lanes[4] + lanes[5]) + (lanes[6] + lanes[7])
    )
    assert np.array_equal(out, tree)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_loads_widen_exactly(dtype):
    values = torch.randn(64).to(dtype)
    out = np.empty(64, np.float32)
    widen = _widen_bf16 if dtype == torch.bfloat16 else _widen_f16
    widen(cpu_attention._pool_numpy(values), out)
    assert torch.equal(torch.from_numpy(out), values.float())


def test_vfma_rounds_once():
    x = np.full(8, 1 + 2.0**-12, np.float32)
    y = np.full(8, -(1 + 2.0**-11), np.float32)
    out = np.empty(8, np.float32)
    _axpy(np.float32(1 + 2.0**-12), x, y, out)
    # (1 + 2^-12)^2 - (1 + 2^-11) = 2^-24: lost if the product were rounded first
    assert np.all(out == np.float32(2.0**-24))


def test_simd_shape():
    assert simd_shape(64, 16) and simd_shape(128, 32)
    assert not simd_shape(32, 16) and not simd_shape(64, 4) and not simd_shape(96, 16)


def _run(case, heads: int) -> torch.Tensor:
    """The kernel with work items of `heads` KV heads each."""
    pc = case
    out = torch.empty(pc.q.shape, dtype=torch.float32)
    arrays = tuple(
        t.to(torch.int32).contiguous().numpy()
        for t in (pc.block_tables, pc.query_start, pc.query_positions, pc.context_lens)
    )
    skip = np.zeros(pc.block_tables.shape[0], np.uint8)
    k, v = (cpu_attention._pool_numpy(c) for c in (pc.k_cache, pc.v_cache))
    scale = np.float32(cpu_attention._LOG2E / math.sqrt(pc.q.shape[-1]))
    q = pc.q.float().contiguous().numpy()
    kind = tile_kind(pc.q.shape[2], pc.k_cache.shape[1])
    heads = heads if kind else 1  # the scalar tile takes one KV head per item
    kernel = cpu_attention._KERNELS[kind]
    kernel(q, k, v, *arrays, scale, 5, heads, skip, out.numpy())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 32])  # 32: the scalar tile, one head an item
def test_work_split_does_not_change_a_bit(dtype, d):
    """Items of one KV head or of all (chosen by batch size and thread count) give the same
    bits, and both match the reference."""
    seqs = [(70, [69]), (45, list(range(33, 45))), (9, list(range(9))), (128, [127])]
    case = make_paged_case(seqs, d=d, block_size=16, dtype=dtype, seed=5)
    one, every = _run(case, 1), _run(case, 3)
    assert torch.equal(one, every)
    expected = paged_attention_reference(*case.args())
    torch.testing.assert_close(every.to(dtype), expected, **TOL[dtype])
