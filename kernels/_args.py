"""Argument checks shared by every implementation of the paged-KV kernels.

One helper module so the CPU kernel, the CUDA kernel and the torch reference reject exactly the
same inputs with exactly the same messages. The checks run on every layer of every step, so the
value checks are a handful of torch ops on the small int tensors, fetched with one `.tolist()`
(one device sync on a GPU); callers that already checked a step pass `validate=False`.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SLOT_DTYPES = (torch.int32, torch.int64)


def _fail(message: str) -> None:
    raise ValueError(message)


def _check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The pool of one layer: two same-shaped, contiguous [num_blocks, block_size, Hkv, D]."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            _fail(f"{name} must be [num_blocks, block_size, Hkv, D], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            _fail(f"{name} dtype {t.dtype} unsupported; use float32, bfloat16 or float16")
        if not t.is_contiguous():
            _fail(f"{name} must be contiguous (the kernels address slots by stride)")
    if k_cache.shape != v_cache.shape:
        _fail(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if k_cache.dtype != v_cache.dtype:
        _fail(f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) differ in dtype")
    if k_cache.device != v_cache.device:
        _fail(f"k_cache ({k_cache.device}) and v_cache ({v_cache.device}) are on different devices")
    if min(k_cache.shape[1:]) < 1:
        _fail(f"cache block_size, Hkv and D must be >= 1, got shape {tuple(k_cache.shape)}")


def _check_same_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device:
            _fail(f"{name} is on {t.device} but the KV cache is on {device}")


def _check_int_vector(name: str, t: torch.Tensor, dtypes: tuple, length: int) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        _fail(f"{name} must be {want}, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        _fail(f"{name} must have shape [{length}], got {tuple(t.shape)}")


def check_write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Raise ValueError unless write_kv's arguments fit the cache (slots < num_slots)."""
    _check_cache_pair(k_cache, v_cache)
    num_blocks, block_size, hkv, d = k_cache.shape
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3 or tuple(t.shape[1:]) != (hkv, d):
            _fail(f"{name} must be [T, {hkv}, {d}] to match the cache, got {tuple(t.shape)}")
        if t.dtype != k_cache.dtype:
            _fail(f"{name} dtype {t.dtype} differs from the cache dtype {k_cache.dtype}")
    if k.shape != v.shape:
        _fail(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    _check_int_vector("slot_mapping", slot_mapping, SLOT_DTYPES, k.shape[0])
    _check_same_device(k_cache.device, k=k, v=v, slot_mapping=slot_mapping)
    if slot_mapping.numel() and int(slot_mapping.max()) >= num_blocks * block_size:
        _fail(
            f"slot_mapping holds slot {int(slot_mapping.max())} but the cache has only "
            f"{num_blocks * block_size} slots ({num_blocks} blocks x {block_size})"
        )


def check_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    query_positions: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> None:
    """Raise ValueError unless paged_attention's arguments are consistent (see its docstring)."""
    _check_cache_pair(k_cache, v_cache)
    num_blocks, block_size, hkv, d = k_cache.shape
    if not isinstance(q, torch.Tensor):
        _fail(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 3 or q.shape[2] != d:
        _fail(f"q must be [T, Hq, {d}] (head dim of the cache), got {tuple(q.shape)}")
    if q.dtype != k_cache.dtype:
        _fail(f"q dtype {q.dtype} differs from the cache dtype {k_cache.dtype}")
    hq = q.shape[1]
    if hq == 0 or hq % hkv:
        _fail(f"query heads ({hq}) must be a positive multiple of the KV heads ({hkv})")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        _fail(f"scale must be a finite float, got {scale!r}")
    if not isinstance(block_tables, torch.Tensor) or block_tables.dim() != 2:
        _fail("block_tables must be a 2-D int32 tensor [B, max_blocks]")
    if block_tables.dtype != torch.int32:
        _fail(f"block_tables must be torch.int32, got {block_tables.dtype}")
    batch, max_blocks = block_tables.shape
    t = q.shape[0]
    _check_int_vector("query_start", query_start, (torch.int32,), batch + 1)
    _check_int_vector("query_positions", query_positions, (torch.int32,), t)
    _check_int_vector("context_lens", context_lens, (torch.int32,), batch)
    _check_same_device(
        k_cache.device,
        q=q,
        block_tables=block_tables,
        query_start=query_start,
        query_positions=query_positions,
        context_lens=context_lens,
    )
    _check_values(
        block_tables, query_start, query_positions, context_lens, num_blocks, block_size, t
    )


def _check_values(
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    query_positions: torch.Tensor,
    context_lens: torch.Tensor,
    num_blocks: int,
    block_size: int,
    t: int,
) -> None:
    """Value checks: every flag is computed on the tensors' device, then fetched at once."""
    max_blocks = block_tables.shape[1]
    n_queries = query_start[1:] - query_start[:-1]
    needed = (context_lens + block_size - 1) // block_size
    cols = torch.arange(max_blocks, device=block_tables.device, dtype=torch.int32)
    out_of_range = (block_tables < 0) | (block_tables >= num_blocks)
    bad_block = (cols[None, :] < needed[:, None]) & out_of_range
    zero = torch.zeros((), dtype=torch.bool, device=query_start.device)
    flags = torch.stack(
        [
            query_start[0] != 0,
            query_start[-1] != t,
            (n_queries < 0).any() if n_queries.numel() else zero,
            (context_lens < 0).any() if context_lens.numel() else zero,
            (context_lens > max_blocks * block_size).any() if context_lens.numel() else zero,
            (query_positions < 0).any() if query_positions.numel() else zero,
            ((n_queries > 0) & (context_lens == 0)).any() if context_lens.numel() else zero,
            bad_block.any() if bad_block.numel() else zero,
        ]
    ).tolist()
    if not any(flags):
        return
    qs = query_start.tolist()
    ctx = context_lens.tolist()
    if flags[0] or flags[1] or flags[2]:
        _fail(f"query_start must start at 0, never decrease and end at T={t}; got {qs}")
    if flags[3] or flags[4]:
        _fail(
            f"context_lens must be in [0, max_blocks * block_size = {max_blocks * block_size}]; "
            f"got {ctx}"
        )
    if flags[5]:
        bad = int(torch.nonzero(query_positions < 0)[0, 0])
        _fail(f"query_positions must be >= 0; row {bad} has {int(query_positions[bad])}")
    if flags[6]:
        b = next(i for i in range(len(ctx)) if ctx[i] == 0 and qs[i + 1] > qs[i])
        _fail(f"sequence {b} has queries but context_lens[{b}] == 0: nothing to attend to")
    b, col = (int(x) for x in torch.nonzero(bad_block)[0])
    _fail(
        f"block_tables[{b}, {col}] = {int(block_tables[b, col])} is not a block id in "
        f"[0, {num_blocks}) but sequence {b} needs {int(needed[b])} blocks for its "
        f"{ctx[b]} tokens"
    )
