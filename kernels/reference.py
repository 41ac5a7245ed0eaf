"""Plain torch versions of the two kernels: the oracle the tests compare every kernel against.

Deliberately simple (gather each sequence's context, one masked softmax per sequence, float32)
so that it is correct by inspection; speed is no concern here.
"""

from __future__ import annotations

import torch

from ._args import check_paged_attention, check_write_kv


def write_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Row by row: k[t], v[t] go to slot slot_mapping[t]; negative slots are skipped."""
    check_write_kv(k, v, k_cache, v_cache, slot_mapping)
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // block_size, slot % block_size] = k[t]
            v_cache[slot // block_size, slot % block_size] = v[t]


def gather_context(
    cache: torch.Tensor, block_table: torch.Tensor, context_len: int
) -> torch.Tensor:
    """Logical positions 0..context_len-1 of one sequence as a contiguous [S, Hkv, D] tensor."""
    block_size = cache.shape[1]
    n_blocks = -(-context_len // block_size)
    blocks = block_table[:n_blocks].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:context_len]


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    query_positions: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Query t of sequence b sees KV positions j <= query_positions[t], j < context_lens[b]."""
    check_paged_attention(
        q, k_cache, v_cache, block_tables, query_start, query_positions, context_lens, scale
    )
    t, hq, d = q.shape
    group = hq // k_cache.shape[2]
    out = torch.zeros(t, hq, d, dtype=torch.float32, device=q.device)
    starts = query_start.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        keys = gather_context(k_cache, block_tables[b], ctx).float()
        values = gather_context(v_cache, block_tables[b], ctx).float()
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        qh = q[lo:hi].float().transpose(0, 1)  # [Hq, n, D]
        scores = (qh @ keys.transpose(1, 2)) * scale  # [Hq, n, S]
        pos = query_positions[lo:hi].long()
        visible = torch.arange(ctx, device=q.device)[None, :] <= pos[:, None]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        out[lo:hi] = (torch.softmax(scores, dim=-1) @ values).transpose(0, 1)
    return out.to(q.dtype)
