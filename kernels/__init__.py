"""Kernels of the paged KV cache: `write_kv` and `paged_attention`, dispatched by device.

CUDA tensors run the Numba CUDA kernels (`cuda_attention`: host side and per-step state;
`cuda_plan`: work lists and split-KV choice; `cuda_decode`, `cuda_prefill`, `cuda_write`: the
kernels; `cuda_prims`: device primitives with simulator twins; `inspect`: ptxas report), CPU
tensors the Numba CPU kernel (`cpu_attention`, which hands sequences with many query rows to
gather + torch SDPA in `cpu_sdpa`, faster there); `reference` holds the torch oracle,
`testing` builds test inputs; `cpu_bf16_matmul` runs the model's bfloat16 matmuls of up to
256 rows (512 in `cpu_decoder`'s loop) in oneDNN's summation order (its bits, faster);
`cpu_int8` is the model's int8 weight-only matmul where torch's is not vectorised,
`cpu_threads` runs the CPU kernels on torch's thread count; `cpu_fused` holds the model's
RMSNorm, RoPE and SiLU-and-multiply as one Numba call each on CPU; `simd`, `simd512` and
`simd512_math` are the vector intrinsics the CPU kernels are written in.
The CUDA module is imported on first use only, so CPU-only processes never import numba.cuda
(and a test process may still switch on the CUDA simulator before it does).
"""

from __future__ import annotations

import torch

from .cpu_attention import paged_attention_cpu, write_kv_cpu

__all__ = ["paged_attention", "write_kv"]


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    validate: bool = True,
) -> None:
    """Write row t of k/v ([T, Hkv, D]) into slot slot_mapping[t] of the caches, in place.

    Slot s is block s // block_size, offset s % block_size; a negative slot means skip.
    `validate=False` skips the argument checks (for callers that checked the step already).
    """
    if k_cache.is_cuda:
        from .cuda_attention import write_kv_cuda

        write_kv_cuda(k, v, k_cache, v_cache, slot_mapping, validate=validate)
    else:
        write_kv_cpu(k, v, k_cache, v_cache, slot_mapping, validate=validate)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    query_positions: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    validate: bool = True,
    deterministic: bool = False,
) -> torch.Tensor:
    """Multi-input paged attention; returns [T, Hq, D] in q's dtype.

    Query row t of sequence b (rows query_start[b]:query_start[b+1]) attends to every KV
    position j with j <= query_positions[t] and j < context_lens[b]; position p lives at
    block_tables[b, p // block_size], offset p % block_size. Covers decode, prefill, prefill
    over a cached history and several query ranges over one context, in one call. Raises
    ValueError on inconsistent arguments unless `validate=False`.

    `deterministic`: every row is reduced in one order that depends only on its own position and
    keys (key tiles aligned to absolute block boundaries), never on the other rows of the call;
    on CPU that is the Numba kernel for every row (no SDPA hand-off for long query ranges).
    """
    args = (q, k_cache, v_cache, block_tables, query_start, query_positions, context_lens, scale)
    if q.is_cuda:
        from .cuda_attention import paged_attention_cuda

        if deterministic:
            raise NotImplementedError("batch-invariant attention is built for CPU only so far")
        return paged_attention_cuda(*args, validate=validate)
    impl = "numba" if deterministic else "auto"
    return paged_attention_cpu(*args, validate=validate, impl=impl)
