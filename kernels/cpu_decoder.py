"""A run of decoder layers as one Numba call: the CPU step for up to a few hundred bfloat16 rows.

Why: at one decode row a layer's compute is ~10 small kernels of a few microseconds each, and
the torch/Python path around them (module calls, tensor <-> numpy views, dispatch of a dozen
arguments, allocations) cost ~165 us a layer, a third of the step (2-core AMD Zen 4 EPYC,
SmolLM2-135M: ~5 of 15 ms). Here the same kernels run back to back inside one compiled loop.

Bits: every step is the kernel the torch path calls, called as a function (not inlined, so it
compiles with its own flags and array layouts): `cpu_fused`'s RMSNorm, RoPE and
SiLU-and-multiply, `cpu_bf16_matmul`'s matmul (or `cpu_int8_torch_order`'s for int8 weights),
the slot write and `vdpbf16ps` attention of `cpu_attention`. The residual adds are float32 sums
rounded to bfloat16, as torch's add. So a row gets the bits the torch path gives it
(test_cpu_decoder).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .cpu_attention import _BF16_KERNELS, _write_slots
from .cpu_bf16_matmul import _matmul
from .cpu_fused import (
    _ROPE,
    PARALLEL_ROWS,
    _rms_norm,
    _rms_norm_parallel,
    _silu_mul,
    _silu_mul_parallel,
)
from .cpu_int8_torch_order import _one_row_at_a_time, _row_pairs
from .simd512 import v16add, v16load_bf16, v16store_bf16

_KERNEL = {"error_model": "numpy", "nogil": True}
# a layer's matmuls in the order they run: weights[4 * layer + i]
QKV, O_PROJ, GATE_UP, DOWN = range(4)


@njit(inline="always", **_KERNEL)
def _add_(x, y):
    """x += y over bfloat16 bits (flat, a multiple of 16 long): float32 sums rounded to nearest
    even, as torch's bfloat16 add rounds them."""
    for i in range(0, x.shape[0], 16):
        v16store_bf16(x, i, v16add(v16load_bf16(x, i), v16load_bf16(y, i)))


@njit(**_KERNEL)
def _norm(x, w, eps, out, threads):
    """RMSNorm as `cpu_fused.rms_norm` runs it: one thread below PARALLEL_ROWS rows, else a
    contiguous share of the rows a thread (a row's bits are the same either way)."""
    if x.shape[0] < PARALLEL_ROWS:
        _rms_norm(x, w, eps, out)
    else:
        _rms_norm_parallel(x, w, eps, out, threads)


@njit(**_KERNEL)
def _bf16_matmul(weights, i, x, out, threads):
    """out = x @ W.T for matmul i: (blocked weights, their K chunks) of `cpu_bf16_matmul`."""
    blocks, chunks = weights
    _matmul(x, blocks[i], out, x.shape[1], out.shape[1], chunks[i], threads)


@njit(**_KERNEL)
def _int8_matmul(weights, i, x, out, threads):
    """out = x @ (qweight * scale).T for matmul i: (int8 rows, scales) of
    `cpu_int8_torch_order` (one or two rows)."""
    qweights, scales = weights
    if x.shape[0] == 1:
        _one_row_at_a_time(x, qweights[i], scales[i], out)
    else:
        _row_pairs(x, qweights[i], scales[i], out, threads)


@njit(**_KERNEL)
def _decoder_layers(
    rope, attend, matmul, x, first, end, cos, sin, eps, shape, norms, weights,
    keys, values, slots, attention, threads, normed,
):  # fmt: skip
    """Layers [first, end) on the residual rows x [T, hidden] (bfloat16 bits, updated in place).
    RoPE, attention and the matmuls are the kernels passed in (compiled into this loop: only
    the model's own are compiled).

    shape: (query heads, KV heads, head dim, intermediate size). norms[2 * layer + i]: the
    layer's RMSNorm weights [1, hidden] (i = 0 before attention, 1 before the MLP), the last
    one the model's final norm, which writes `normed` after the last layer; weights:
    what `matmul` takes. keys/values: the pool's [layers, blocks, block size, KV heads, head
    dim] bits; slots: each row's slot; attention: `CpuStep.bf16_kernel_args` (block tables,
    query starts, positions, context lengths, scale * log2 e, query tile, KV heads an item,
    skip)."""
    rows, hidden = x.shape
    n_heads, n_kv, d, inter = shape
    width = (n_heads + 2 * n_kv) * d
    tables, starts, pos, ctx, c, qtile, heads, skip = attention
    flat = x.reshape(-1)
    for layer in range(first, end):
        h = np.empty((rows, hidden), np.uint16)
        _norm(x, norms[2 * layer], eps, h, threads)
        qkv = np.empty((rows, width), np.uint16)
        matmul(weights, 4 * layer + QKV, h, qkv, threads)
        rope(qkv, n_heads + n_kv, d, cos, sin)
        split = qkv.reshape(rows, n_heads + 2 * n_kv, d)
        _write_slots(split[:, n_heads : n_heads + n_kv], slots, keys[layer].reshape(-1, n_kv, d))
        _write_slots(split[:, n_heads + n_kv :], slots, values[layer].reshape(-1, n_kv, d))
        out = np.empty((rows, n_heads, d), np.uint16)
        q, kc, vc = qkv.reshape(-1), keys[layer], values[layer]
        attend(q, width, kc, vc, tables, starts, pos, ctx, c, qtile, heads, skip, out)
        o = np.empty((rows, hidden), np.uint16)
        matmul(weights, 4 * layer + O_PROJ, out.reshape(rows, n_heads * d), o, threads)
        _add_(flat, o.reshape(-1))
        _norm(x, norms[2 * layer + 1], eps, h, threads)
        gate_up = np.empty((rows, 2 * inter), np.uint16)
        matmul(weights, 4 * layer + GATE_UP, h, gate_up, threads)
        act = np.empty((rows, inter), np.uint16)
        if rows < PARALLEL_ROWS:  # as `cpu_fused.silu_mul` runs it
            _silu_mul(gate_up, act)
        else:
            _silu_mul_parallel(gate_up, act, threads)
        matmul(weights, 4 * layer + DOWN, act, o, threads)
        _add_(flat, o.reshape(-1))
    if end == keys.shape[0]:
        _norm(x, norms[2 * end], eps, normed, threads)


def decoder_layers(x, first, end, cos, sin, eps, shape, norms, weights, *step, int8=False):
    """`_decoder_layers` with the kernels of the head dim shape[2] (64 or 128), on
    `cpu_bf16_matmul`'s weights (blocks, chunks) or, with `int8`, `cpu_int8_torch_order`'s
    (int8 rows, scales)."""
    d = shape[2]
    matmul = _int8_matmul if int8 else _bf16_matmul
    _decoder_layers(_ROPE[d], _BF16_KERNELS[d], matmul, x, first, end, cos, sin, eps, shape,
                    norms, weights, *step)  # fmt: skip
