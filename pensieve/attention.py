"""The one narrow interface between the model and the KV cache.

The model computes q, k, v (RoPE applied) for the step's tokens and hands them to an
`AttentionBackend`; the backend stores k and v wherever it keeps KV and returns attention
output. The stateless oracle keeps KV contiguous (`ContiguousKV`); the engine keeps it paged
(`pensieve.paged.PagedAttentionBackend`, on the kernels of `pensieve.kernels`).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from pensieve import kernels


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] for this step's T tokens. Returns [T, Hq, D]."""
        ...


class ContiguousKV:
    """Single-sequence contiguous KV cache: the reference path every cached path is checked against.

    Tokens are appended in position order; each new query token at position p attends to every
    cached position <= p. With `block_size` the rows are read as consecutive blocks of that size
    by the paged kernel in its batch-invariant order (the order of `--deterministic`: the oracle
    of the bitwise tests); without, by torch's SDPA (an independent implementation).
    """

    def __init__(self, num_layers: int, block_size: int | None = None):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.block_size = block_size

    def __len__(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[0]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        past_k, past_v = self.keys[layer], self.values[layer]
        keys = k if past_k is None else torch.cat([past_k, k])
        values = v if past_v is None else torch.cat([past_v, v])
        self.keys[layer], self.values[layer] = keys, values
        if self.block_size is None:
            return sdpa_causal(q, keys, values, query_offset=keys.shape[0] - q.shape[0])
        return paged_over_contiguous(q, keys, values, self.block_size)


def paged_over_contiguous(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_size: int
) -> torch.Tensor:
    """The last q.shape[0] positions of one sequence attending through the paged kernel, its
    rows [S, Hkv, D] seen as blocks 0, 1, 2, ... (the last zero-padded)."""
    s = keys.shape[0]
    pad = -s % block_size
    blocks = -(-s // block_size)

    def paged(rows: torch.Tensor) -> torch.Tensor:
        if pad:
            rows = torch.cat([rows, rows.new_zeros((pad, *rows.shape[1:]))])
        # contiguous like a pool (a first prefill's keys are a strided view of the projection)
        return rows.contiguous().view(blocks, block_size, *rows.shape[1:])

    device = q.device
    t = q.shape[0]
    return kernels.paged_attention(
        q,
        paged(keys),
        paged(values),
        torch.arange(blocks, dtype=torch.int32, device=device)[None],
        torch.tensor([0, t], dtype=torch.int32, device=device),
        torch.arange(s - t, s, dtype=torch.int32, device=device),
        torch.tensor([s], dtype=torch.int32, device=device),
        1.0 / math.sqrt(q.shape[-1]),
        validate=False,
        deterministic=True,
    )


def sdpa_causal(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, query_offset: int
) -> torch.Tensor:
    """Causal grouped-query attention of q [T, Hq, D] over keys/values [S, Hkv, D].

    Query i sits at position query_offset + i and sees keys 0..query_offset + i.
    """
    t, hq, d = q.shape
    s = keys.shape[0]
    qh = q.transpose(0, 1).float()  # [Hq, T, D]
    kh = keys.transpose(0, 1).float()
    vh = values.transpose(0, 1).float()
    mask = None
    if t > 1:  # a single query at the end sees every key: no mask needed
        pos_q = torch.arange(t, device=q.device) + query_offset
        mask = torch.arange(s, device=q.device)[None, :] <= pos_q[:, None]
    out = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=mask, scale=1.0 / math.sqrt(d), enable_gqa=hq != kh.shape[0]
    )
    return out.transpose(0, 1).to(q.dtype)
