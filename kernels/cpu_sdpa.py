"""The CPU path for sequences with many query rows: gather the context, then torch SDPA.

Measured here (2 cores, 9/3 heads, D=64, see cpu_attention.TORCH_MIN_QUERIES): the Numba kernel
wins for decode and short query ranges (<= 8 rows per sequence: 1.3-3.8x faster), but torch's
SDPA runs its GEMMs 2-3x faster than a Numba loop nest can, which outweighs copying the context
out of the pool once a sequence has 16 or more queries (prefill: 1.3-2.3x faster). So
`paged_attention_cpu` hands such sequences here; the copy is one `index_select` of whole blocks
per sequence, into a buffer that is reused from call to call. Where `cpu_bf16`'s tile runs
(bfloat16 pool, AVX512-BF16) it is faster than this path at every length: "auto" sends none here.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

_buffers = threading.local()  # per thread: one reusable gather buffer per (dtype, row shape)


def _gather(cache: torch.Tensor, blocks: torch.Tensor, key: str) -> torch.Tensor:
    """cache[blocks] into a reused buffer (no fresh pages for every layer of every step)."""
    pool = _buffers.__dict__.setdefault("pool", {})
    slot = (key, cache.dtype, tuple(cache.shape[1:]))
    buf = pool.get(slot)
    if buf is None or buf.shape[0] < blocks.shape[0]:
        grown = max(blocks.shape[0], 2 * (0 if buf is None else buf.shape[0]))
        buf = pool[slot] = torch.empty((grown, *cache.shape[1:]), dtype=cache.dtype)
    out = buf[: blocks.shape[0]]
    torch.index_select(cache, 0, blocks, out=out)
    return out


class SequenceAttention:
    """One sequence's query rows at `positions` over its first context_len keys: what does not
    change from layer to layer (its blocks, its mask) is built once per step, here."""

    def __init__(
        self, table: torch.Tensor, context_len: int, positions: torch.Tensor, block_size: int,
        group: int,
    ):  # fmt: skip
        self.context_len = context_len
        self.blocks = table[: -(-context_len // block_size)].long()
        visible = torch.arange(context_len)[None, :] <= positions.long()[:, None]
        # rows of the folded query are (group member, query): the mask repeats per member
        self.mask = None if bool(visible.all()) else visible.repeat(group, 1)
        self.bias: torch.Tensor | None = None  # the mask as SDPA adds it (0 / -inf), at first use

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q [n, Hq, D] -> [n, Hq, D]."""
        n, hq, d = q.shape
        hkv = k_cache.shape[2]
        group = hq // hkv
        ctx = self.context_len
        keys = _gather(k_cache, self.blocks, "k").view(-1, hkv, d)[:ctx].transpose(0, 1)
        values = _gather(v_cache, self.blocks, "v").view(-1, hkv, d)[:ctx].transpose(0, 1)
        # the GQA group folded into the query rows: [1, Hkv, group * n, D] (SDPA's fastest form)
        qg = q.view(n, hkv, group, d).permute(1, 2, 0, 3).reshape(1, hkv, group * n, d)
        if self.mask is not None and (self.bias is None or self.bias.dtype != q.dtype):
            # what SDPA would derive from the boolean mask in every layer, derived once
            self.bias = torch.zeros(self.mask.shape, dtype=q.dtype)
            self.bias.masked_fill_(~self.mask, float("-inf"))
        out = F.scaled_dot_product_attention(
            qg, keys[None], values[None], attn_mask=self.bias, scale=scale
        )
        return out.view(hkv, group, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)
