"""The fused CPU small-op kernels (kernels/cpu_fused.py) against the torch ops they replace,
and a row's bits whatever its batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pensieve.kernels import cpu_fused
from pensieve.model import apply_rope

DTYPES = [torch.float32, torch.bfloat16]
# one rounding of the result apart at most (float32: a few ulps of reassociated sums)
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 1e-2, "rtol": 8e-3}}


def _torch_rms_norm(x, w, eps):
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _angles(rows: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = (torch.arange(rows).float() * 37 + 5)[:, None] * inv_freq[None]
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_torch(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(13, 576, generator=gen) * 3).to(dtype)
    w = torch.randn(576, generator=gen).to(dtype)
    got = cpu_fused.rms_norm(x, w, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, _torch_rms_norm(x, w, 1e-5), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch_over_the_whole_range(dtype):
    gen = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(7, 256, generator=gen) * 30).to(dtype)  # large |gate| both signs
    gate, up = gate_up.split(128, dim=-1)
    got = cpu_fused.silu_mul(gate_up)
    assert torch.isfinite(got.float()).all()
    torch.testing.assert_close(got, F.silu(gate) * up, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_rotates_q_and_k_in_place_and_leaves_v(dtype):
    rows, heads, kv, d = 6, 9, 3, 64
    gen = torch.Generator().manual_seed(2)
    flat = torch.randn(rows, (heads + 2 * kv) * d, generator=gen).to(dtype)
    cos, sin = _angles(rows, d)
    expected = apply_rope(flat.view(rows, -1, d)[:, : heads + kv], cos, sin)
    v_before = flat.view(rows, -1, d)[:, heads + kv :].clone()
    cpu_fused.rope_(flat, heads + kv, d, cos, sin)
    view = flat.view(rows, -1, d)
    torch.testing.assert_close(view[:, : heads + kv], expected, **TOL[dtype])
    assert torch.equal(view[:, heads + kv :], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [37, cpu_fused.PARALLEL_ROWS + 9])  # one thread, all threads
def test_a_row_has_the_same_bits_alone_and_in_a_batch(dtype, rows):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 576, generator=gen).to(dtype)
    w = torch.randn(576, generator=gen).to(dtype)
    gate_up = torch.randn(rows, 3072, generator=gen).to(dtype)
    qk = torch.randn(rows, 15 * 64, generator=gen).to(dtype)
    cos, sin = _angles(rows, 64)
    batch_qk = qk.clone()
    cpu_fused.rope_(batch_qk, 12, 64, cos, sin)
    batch = (cpu_fused.rms_norm(x, w, 1e-5), cpu_fused.silu_mul(gate_up), batch_qk)
    for row in (0, 17, rows - 1):
        one = slice(row, row + 1)
        alone_qk = qk[one].clone()
        cpu_fused.rope_(alone_qk, 12, 64, cos[one].contiguous(), sin[one].contiguous())
        assert torch.equal(cpu_fused.rms_norm(x[one].clone(), w, 1e-5), batch[0][one])
        assert torch.equal(cpu_fused.silu_mul(gate_up[one].clone()), batch[1][one])
        assert torch.equal(alone_qk, batch[2][one])
