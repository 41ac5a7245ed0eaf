"""Weights and pools in 2 MB pages hold exactly what ordinary allocations held."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pensieve import huge_pages
from pensieve.block_allocator import KVPool
from pensieve.huge_pages import ALIGN, HUGE_PAGE, carve, huge_page_zeros
from pensieve.kernels.cpu_bf16_matmul import FewRowsWeight, blocked
from pensieve.linear import Linear, pack_for_cpu
from pensieve.quantize import quantize_int8, quantize_rows_int8


def test_huge_page_zeros_is_zeroed_and_writable():
    for n in (0, 1, HUGE_PAGE - 1, HUGE_PAGE + 3, 3 * HUGE_PAGE):
        buf = huge_page_zeros(n)
        assert buf.dtype == np.uint8 and buf.shape == (n,) and not buf.any()
        if n:
            buf[-1] = 7
            assert buf[-1] == 7


def test_carve_gives_aligned_disjoint_pieces_in_order():
    sizes = [5, 0, HUGE_PAGE, 129, 64]
    pieces = carve(sizes)
    assert [p.size for p in pieces] == sizes
    addresses = [p.ctypes.data for p in pieces]
    assert all(a % ALIGN == 0 for a in addresses)
    assert addresses == sorted(addresses)
    for i, piece in enumerate(pieces):
        piece[:] = i + 1
    for i, piece in enumerate(pieces):  # no piece wrote over another
        assert (piece == i + 1).all()


def test_huge_pages_off_gives_aligned_zeros(monkeypatch):
    monkeypatch.setattr(huge_pages, "ENABLED", False)
    buf = huge_page_zeros(3 * HUGE_PAGE)
    assert buf.shape == (3 * HUGE_PAGE,) and not buf.any()
    pieces = carve([5, 129, 64])
    assert all(p.ctypes.data % ALIGN == 0 for p in pieces)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_host_pool_is_zeroed_contiguous_and_independent(dtype):
    pool = KVPool.empty(2, 200, 16, 3, 64, dtype, torch.device("cpu"))  # over 2 MB each
    assert pool.keys.shape == (2, 200, 16, 3, 64) and pool.keys.dtype == dtype
    assert pool.keys.is_contiguous() and pool.values.is_contiguous()
    assert not pool.keys.any() and not pool.values.any()
    pool.keys[1, 199] = 1.5
    assert pool.keys[1, 199].eq(1.5).all() and not pool.values.any()
    empty = KVPool.empty(2, 0, 16, 3, 64, dtype, torch.device("cpu"))
    assert empty.keys.shape == (2, 0, 16, 3, 64)
    tier = KVPool.empty(2, 200, 16, 3, 64, dtype, torch.device("cpu"), pin_memory=True)
    assert tier.keys.shape == pool.keys.shape and not tier.keys.any()


def test_quantized_weights_in_the_arena_are_the_quantized_weights():
    gen = torch.Generator().manual_seed(1)
    # over 2 MB of int8 in all: the 2 MB-page buffer where the kernel grants one
    model = torch.nn.Sequential(
        Linear(1024, 2048, dtype=torch.bfloat16), Linear(2048, 64, dtype=torch.bfloat16)
    )
    for layer in model:
        layer.weight.data.copy_(torch.randn(layer.weight.shape, generator=gen))
    want = [quantize_rows_int8(layer.weight)[0] for layer in model]
    quantize_int8(model)
    for layer, q in zip(model, want, strict=True):
        assert torch.equal(layer.qweight, q)


def test_packed_few_rows_blocks_share_one_buffer_in_order():
    torch.manual_seed(2)
    model = torch.nn.Sequential(  # 2 MB of blocks each: a 2 MB-page buffer where granted
        *(Linear(1024, 1024, bias=False, dtype=torch.bfloat16) for _ in range(3))
    )
    pack_for_cpu(model)
    forms = [layer.few_rows for layer in model]
    if any(f is None for f in forms):
        pytest.skip("no few-rows kernel for bfloat16 on this CPU")
    starts = [f.blocks.ctypes.data for f in forms]
    assert (
        starts == sorted(starts) and starts[-1] - starts[0] < 3 * forms[0].blocks.nbytes + 3 * ALIGN
    )
    x = torch.randn(3, 1024).to(torch.bfloat16)
    for layer, form in zip(model, forms, strict=True):
        assert np.array_equal(form.blocks, blocked(layer.weight))
        assert torch.equal(form.matmul(x), FewRowsWeight(layer.weight, form.chunk).matmul(x))
