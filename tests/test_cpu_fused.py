"""The fused CPU small ops against the torch ops they replace, and their row invariance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pensieve.kernels import cpu_fused
from pensieve.model import apply_rope


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def angles(rows: int, head_dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.randint(0, 8192, (rows,), generator=gen).float()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).double() / head_dim)).float()
    a = positions[:, None] * inv_freq[None, :]
    return a.cos(), a.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_rms_norm_matches_torch(dtype: torch.dtype, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x = (3 * torch.randn(rows, 576, generator=gen)).to(dtype)
    weight = (torch.rand(576, generator=gen) + 0.5).to(dtype)
    ours, theirs = cpu_fused.rms_norm(x, weight, 1e-5), torch_rms_norm(x, weight, 1e-5)
    assert ours.dtype == dtype and ours.shape == x.shape
    if dtype == torch.bfloat16:  # at most one bfloat16 step apart (the sum's order differs)
        torch.testing.assert_close(ours, theirs, atol=0, rtol=2**-7)
    else:
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 16])
def test_rope_matches_torch_in_place(dtype: torch.dtype, head_dim: int) -> None:
    """q and k heads rotated in place; the v heads behind them untouched."""
    gen = torch.Generator().manual_seed(head_dim)
    rows, rotated, heads = 9, 5, 6
    flat = torch.randn(rows, heads * head_dim, generator=gen).to(dtype)
    cos, sin = angles(rows, head_dim, gen)
    expected = apply_rope(flat.view(rows, heads, head_dim)[:, :rotated], cos, sin)
    ours = flat.clone()
    cpu_fused.rope_(ours, rotated, head_dim, cos, sin)
    ours = ours.view(rows, heads, head_dim)
    tolerance = {"atol": 1e-2, "rtol": 2**-7} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(ours[:, :rotated], expected, **tolerance)
    assert torch.equal(ours[:, rotated:], flat.view(rows, heads, head_dim)[:, rotated:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_is_the_same_whatever_its_batch(dtype: torch.dtype) -> None:
    """Bitwise: a row alone, and the same row among 40 others, give the same bits."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(41, 576, generator=gen).to(dtype)
    weight = torch.rand(576, generator=gen).to(dtype)
    batch = cpu_fused.rms_norm(x, weight, 1e-5)
    for r in (0, 17, 40):
        assert torch.equal(cpu_fused.rms_norm(x[r : r + 1].clone(), weight, 1e-5)[0], batch[r])
    flat = torch.randn(41, 15 * 64, generator=gen).to(dtype)
    cos, sin = angles(41, 64, gen)
    whole = flat.clone()
    cpu_fused.rope_(whole, 12, 64, cos, sin)
    for r in (0, 17, 40):
        one = flat[r : r + 1].clone()
        cpu_fused.rope_(one, 12, 64, cos[r : r + 1].contiguous(), sin[r : r + 1].contiguous())
        assert torch.equal(one[0], whole[r])


def torch_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.split(gate_up.shape[1] // 2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("rows", [1, 5, 33, 200])
def test_silu_mul_has_torchs_bits(rows: int) -> None:
    """bfloat16 [gate | up] on one thread (under PARALLEL_ROWS rows) and on several: the bits
    of torch's SiLU then multiply, over gates from -30 to 30 and tiny ones."""
    gen = torch.Generator().manual_seed(rows)
    gate_up = (8 * torch.randn(rows, 2 * 1536, generator=gen)).bfloat16()
    gate_up[:, :16] = torch.linspace(-30, 30, 16).bfloat16()
    gate_up[:, 16:20] = torch.tensor([0.0, -0.0, 1e-30, -1e-30]).bfloat16()
    ours = cpu_fused.silu_mul(gate_up)
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, 1536)
    assert torch.equal(ours, torch_silu_mul(gate_up))


def test_silu_mul_row_is_the_same_whatever_its_batch() -> None:
    gen = torch.Generator().manual_seed(5)
    gate_up = torch.randn(41, 2 * 96, generator=gen).bfloat16()
    batch = cpu_fused.silu_mul(gate_up)
    for r in (0, 17, 40):
        assert torch.equal(cpu_fused.silu_mul(gate_up[r : r + 1].clone())[0], batch[r])


def test_silu_mul_takes_only_bfloat16_halves_of_whole_vectors() -> None:
    assert cpu_fused.runs_silu_mul(torch.zeros(3, 64).bfloat16())
    assert not cpu_fused.runs_silu_mul(torch.zeros(3, 64))  # float32 keeps torch's ops
    assert not cpu_fused.runs_silu_mul(torch.zeros(3, 48).bfloat16())  # halves of 24
    assert not cpu_fused.runs_silu_mul(torch.zeros(64, 3).bfloat16().t())


def test_only_contiguous_cpu_matrices_of_its_dtypes_run_fused() -> None:
    x = torch.zeros(4, 8)
    assert cpu_fused.runs_fused(x) and cpu_fused.runs_fused(x.bfloat16())
    assert not cpu_fused.runs_fused(x.half())
    assert not cpu_fused.runs_fused(x.t())
    assert not cpu_fused.runs_fused(x.view(2, 2, 8))
