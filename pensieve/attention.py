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


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] for this step's T tokens. Returns [T, Hq, D]."""
        ...


class ContiguousKV:
    """Single-sequence contiguous KV cache: the reference path every cached path is checked against.

    Tokens are appended in position order; each new query token at position p attends to every
    cached position <= p.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def __len__(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[0]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        past_k, past_v = self.keys[layer], self.values[layer]
        keys = k if past_k is None else torch.cat([past_k, k])
        values = v if past_v is None else torch.cat([past_v, v])
        self.keys[layer], self.values[layer] = keys, values
        return sdpa_causal(q, keys, values, query_offset=keys.shape[0] - q.shape[0])


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
