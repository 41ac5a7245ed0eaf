"""The CPU int8 weight-only matmul (`kernels/cpu_int8.py`) against torch's and the float math."""

from __future__ import annotations

import pytest
import torch

from pensieve.kernels.cpu_int8 import (
    TORCH_INT8_VECTORISED,
    Int8Weight,
    int8_matmul,
)
from pensieve.linear import Linear
from pensieve.quantize import quantize_int8, quantize_rows_int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 24])
def test_int8_matmul_matches_the_dequantized_weights(rows: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=gen)
    q, scale = quantize_rows_int8(w)
    x = torch.randn(rows, 80, generator=gen).to(dtype)
    expected = x.float() @ (q.float() * scale[:, None]).T
    out = int8_matmul(x, q, scale)
    assert out.dtype == dtype and out.shape == (rows, 96)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    # torch's own int8 matmul (float32 activations) agrees too
    if dtype == torch.float32:
        torch.testing.assert_close(out, torch._weight_int8pack_mm(x, q, scale), rtol=tol, atol=tol)


def test_int8_matmul_rows_do_not_depend_on_the_row_count() -> None:
    """Batch invariance: each row's bits are the same alone, in a batch, at any offset."""
    gen = torch.Generator().manual_seed(0)
    q, scale = quantize_rows_int8(torch.randn(64, 128, generator=gen))
    x = torch.randn(37, 128, generator=gen)
    whole = int8_matmul(x, q, scale)
    for lo, hi in [(0, 1), (5, 6), (3, 10), (11, 37)]:
        assert torch.equal(int8_matmul(x[lo:hi], q, scale), whole[lo:hi])


@pytest.mark.parametrize("features", [61, 64, 200])
def test_one_row_kernel_gives_each_row_its_bits_in_a_batch(features: int) -> None:
    """One row runs `_int8_matvec` (eight features a pass), a batch `_int8_matmul` (four
    features, two rows): every row alone has its bits from the batch, partial groups too."""
    gen = torch.Generator().manual_seed(features)
    q, scale = quantize_rows_int8(torch.randn(features, 576, generator=gen))
    x = torch.randn(9, 576, generator=gen)
    whole = int8_matmul(x, q, scale)
    for i in range(9):
        assert torch.equal(int8_matmul(x[i : i + 1], q, scale), whole[i : i + 1])


def test_linear_converts_its_int8_weight_once_and_again_when_replaced() -> None:
    """`prepared_int8` (whichever kernel a call then takes on this CPU) converts once, and
    again when `qweight` or `qscale` is replaced."""
    layer = Linear(16, 8, bias=False)
    quantize_int8(torch.nn.Sequential(layer))
    x = torch.randn(1, 16)
    first = layer(x)
    prepared = layer.prepared_int8()
    assert torch.equal(layer(x), first)
    assert layer.prepared_int8() is prepared  # reused by the next call
    layer.qweight, layer.qscale = quantize_rows_int8(2 * torch.randn(8, 16))
    expected = x @ (layer.qweight.float() * layer.qscale[:, None]).T
    torch.testing.assert_close(layer(x), expected)
    assert layer.prepared_int8() is not prepared


needs_torch_avx512_int8 = pytest.mark.skipif(
    not TORCH_INT8_VECTORISED, reason="torch's int8 matmul has its AVX-512 kernel only there"
)


@needs_torch_avx512_int8
@pytest.mark.parametrize(
    ("features", "k_dim"), [(960, 576), (576, 1536), (7, 16), (100, 64), (13, 32)]
)
def test_one_bfloat16_row_gets_torchs_int8_bits(features: int, k_dim: int) -> None:
    """`matmul_as_torch` is torch's `_weight_int8pack_mm` bit for bit (short last feature
    groups and an odd last row too), so a few decode rows have the bits they have in a batch."""
    gen = torch.Generator().manual_seed(features + k_dim)
    q, scale = quantize_rows_int8(torch.randn(features, k_dim, generator=gen) / 20)
    scale = scale.to(torch.bfloat16)
    x = (3 * torch.randn(5, k_dim, generator=gen)).to(torch.bfloat16)
    batch = torch._weight_int8pack_mm(x, q, scale)
    prepared = Int8Weight(q, scale)
    assert prepared.rows_as_torch
    for lo, hi in [(0, 1), (4, 5), (0, 2), (1, 4), (0, 5)]:
        got = prepared.matmul_as_torch(x[lo:hi])
        assert torch.equal(got.view(torch.int16), batch[lo:hi].view(torch.int16))


@needs_torch_avx512_int8
def test_an_int8_bfloat16_linear_gives_a_row_alone_its_bits_in_a_batch() -> None:
    layer = Linear(576, 200, bias=False).to(torch.bfloat16)
    quantize_int8(torch.nn.Sequential(layer))
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    whole = layer(x)  # a batch runs torch's kernel, a few rows `matmul_as_torch`
    assert layer.prepared_int8().rows_as_torch
    for lo, hi in [(i, i + 1) for i in range(9)] + [(0, 2), (2, 5), (5, 9)]:
        assert torch.equal(layer(x[lo:hi]).view(torch.int16), whole[lo:hi].view(torch.int16))
    # a strided row too (its contiguous copy goes to the kernel)
    strided = torch.stack([x, x], dim=2)[:1, :, 0]
    assert not strided.is_contiguous()
    assert torch.equal(layer(strided).view(torch.int16), whole[:1].view(torch.int16))


def test_int8_matmul_refuses_a_ragged_input_width_and_linear_falls_back() -> None:
    q, scale = quantize_rows_int8(torch.randn(5, 12))
    with pytest.raises(ValueError, match="multiples of 8"):
        int8_matmul(torch.randn(2, 12), q, scale)
    layer = Linear(12, 5, bias=False)
    quantize_int8(torch.nn.Sequential(layer))
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), x @ (layer.qweight.float() * layer.qscale[:, None]).T)


@pytest.mark.parametrize("features", [1, 5, 6, 7, 33])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_int8_matmul_partial_feature_groups_and_odd_rows(features: int, rows: int) -> None:
    """Feature counts not a multiple of four and odd row counts: every output right, none
    written twice or left out (the spare lanes of a last group are not stored)."""
    gen = torch.Generator().manual_seed(features * 10 + rows)
    q, scale = quantize_rows_int8(torch.randn(features, 24, generator=gen))
    x = torch.randn(rows, 24, generator=gen)
    expected = x.double() @ (q.double() * scale.double()[:, None]).T
    torch.testing.assert_close(int8_matmul(x, q, scale).double(), expected, rtol=1e-5, atol=1e-5)


def test_int8_matmul_is_exact_where_the_sums_are() -> None:
    """Integer weights times activations in eighths keep every partial sum exact in float32,
    so whatever the order the kernel sums in, its result must be the exact dot product times
    the scale, rounded once: no step through a narrower type, no lost lane."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (6, 64), generator=gen, dtype=torch.int8)
    x = torch.randint(-64, 64, (3, 64), generator=gen).float() / 8
    scale = torch.rand(6, generator=gen) + 0.5
    exact = (x.double() @ q.double().T).float()
    assert torch.equal(int8_matmul(x, q, scale), exact * scale)


def test_int8_matmul_edge_inputs() -> None:
    """No rows, a strided x, and shapes that do not fit (an error, not garbage)."""
    gen = torch.Generator().manual_seed(1)
    q, scale = quantize_rows_int8(torch.randn(32, 48, generator=gen))
    assert int8_matmul(torch.zeros(0, 48), q, scale).shape == (0, 32)
    wide = torch.randn(6, 96, generator=gen)
    strided = wide[:, ::2]
    assert torch.equal(int8_matmul(strided, q, scale), int8_matmul(strided.contiguous(), q, scale))
    with pytest.raises(ValueError, match="do not fit"):
        int8_matmul(wide, q, scale)


def test_numba_kernels_follow_torch_threads_and_leave_them_as_they_were() -> None:
    """The Numba setting is made only when torch's count or the chunk size changes, yet a
    kernel always runs on torch's current count, and torch's own setting survives it."""
    from numba import config, get_num_threads

    from pensieve.kernels.cpu_threads import numba_threads_as_torch

    q, scale = quantize_rows_int8(torch.randn(8, 16))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            with numba_threads_as_torch():
                assert get_num_threads() == min(threads, config.NUMBA_NUM_THREADS)
            int8_matmul(torch.randn(3, 16), q, scale)
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
