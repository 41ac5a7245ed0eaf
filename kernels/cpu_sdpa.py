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
from typing import NamedTuple

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


QUERY_TILE = 256  # query rows per SDPA call; each reads only the keys its last row sees


class QueryTile(NamedTuple):
    """Rows lo..hi-1 of a sequence's queries, which see at most its first `keys` keys; `mask`
    (rows of the folded query x keys; None: every key visible) and `bias`, the mask as SDPA
    adds it, built at first use."""

    lo: int
    hi: int
    keys: int
    mask: torch.Tensor | None


class SequenceAttention:
    """One sequence's query rows at `positions` over its first context_len keys: what does not
    change from layer to layer (its blocks, its masks) is built once per step, here.

    A long causal range runs as tiles of QUERY_TILE rows, each over only the keys its last row
    sees: one SDPA call over all keys with a mask computes every masked score too (a 1024-token
    prompt 28 -> 15 ms a layer, 2048 94 -> 57-65, 512 6.6 -> 5.1; 2-core AVX2 EPYC, float32)."""

    def __init__(
        self, table: torch.Tensor, context_len: int, positions: torch.Tensor, block_size: int,
        group: int,
    ):  # fmt: skip
        self.context_len = context_len
        self.blocks = table[: -(-context_len // block_size)].long()
        positions = positions.long()
        self.tiles: list[QueryTile] = []
        for lo in range(0, max(1, positions.numel()), QUERY_TILE):
            hi = min(positions.numel(), lo + QUERY_TILE)
            keys = min(context_len, int(positions[lo:hi].max()) + 1) if hi > lo else context_len
            visible = torch.arange(keys)[None, :] <= positions[lo:hi, None]
            # rows of the folded query are (group member, query): the mask repeats per member
            mask = None if bool(visible.all()) else visible.repeat(group, 1)
            self.tiles.append(QueryTile(lo, hi, keys, mask))
        self.biases: list[torch.Tensor | None] = [None] * len(self.tiles)  # at first use

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q [n, Hq, D] -> [n, Hq, D]."""
        n, hq, d = q.shape
        hkv = k_cache.shape[2]
        ctx = self.context_len
        keys = _gather(k_cache, self.blocks, "k").view(-1, hkv, d)[:ctx].transpose(0, 1)
        values = _gather(v_cache, self.blocks, "v").view(-1, hkv, d)[:ctx].transpose(0, 1)
        if len(self.tiles) == 1:
            return self._attend_tile(0, q, keys, values, scale)
        out = torch.empty(q.shape, dtype=q.dtype)
        for i, tile in enumerate(self.tiles):
            out[tile.lo : tile.hi] = self._attend_tile(i, q, keys, values, scale)
        return out

    def _attend_tile(
        self, i: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Tile i's rows of q over its keys of `keys` and `values` [Hkv, ctx, D]."""
        tile = self.tiles[i]
        n, hq, d = tile.hi - tile.lo, q.shape[1], q.shape[2]
        hkv = keys.shape[0]
        group = hq // hkv
        # the GQA group folded into the query rows: [1, Hkv, group * n, D] (SDPA's fastest form)
        rows = q[tile.lo : tile.hi].view(n, hkv, group, d).permute(1, 2, 0, 3)
        qg = rows.reshape(1, hkv, group * n, d)
        bias = self.biases[i]
        if tile.mask is not None and (bias is None or bias.dtype != q.dtype):
            # what SDPA would derive from the boolean mask in every layer, derived once
            bias = self.biases[i] = torch.zeros(tile.mask.shape, dtype=q.dtype)
            bias.masked_fill_(~tile.mask, float("-inf"))
        out = F.scaled_dot_product_attention(
            qg,
            keys[None, :, : tile.keys],
            values[None, :, : tile.keys],
            attn_mask=bias if tile.mask is not None else None,
            scale=scale,
        )
        return out.view(hkv, group, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)
