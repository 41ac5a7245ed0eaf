"""Builders of paged-attention inputs for tests and benchmarks (like `torch.testing`).

A case is described by its sequences as (context length, query positions); the builder lays the
context out in a shuffled pool and poisons every slot no sequence owns with NaN, so a kernel
that reads past a context (or a padded block-table entry) shows up as NaN in the output.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PagedCase:
    """The eight arguments of `paged_attention`, in order."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    query_start: torch.Tensor
    query_positions: torch.Tensor
    context_lens: torch.Tensor
    scale: float

    def args(self) -> tuple:
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.query_start,
            self.query_positions,
            self.context_lens,
            self.scale,
        )


def make_paged_case(
    seqs: Sequence[tuple[int, Sequence[int]]],
    *,
    hq: int = 9,
    hkv: int = 3,
    d: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    spare_blocks: int = 2,
    pad: int = -1,
) -> PagedCase:
    """Sequence b has context seqs[b][0] and queries at positions seqs[b][1] (rows in order)."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-ctx // block_size) for ctx, _ in seqs]
    num_blocks = sum(needed) + spare_blocks
    max_blocks = max(needed, default=0) + 1
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.full((len(seqs), max_blocks), pad, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, hkv, d), math.nan)
    v_cache = torch.full((num_blocks, block_size, hkv, d), math.nan)
    used = 0
    for b, (ctx, _) in enumerate(seqs):
        blocks = perm[used : used + needed[b]]
        used += needed[b]
        tables[b, : needed[b]] = blocks
        for cache in (k_cache, v_cache):
            rows = torch.randn(needed[b] * block_size, hkv, d, generator=gen)
            rows[ctx:] = math.nan
            cache[blocks.long()] = rows.view(needed[b], block_size, hkv, d)
    positions = [p for _, pos in seqs for p in pos]
    starts = [0]
    for _, pos in seqs:
        starts.append(starts[-1] + len(pos))
    return PagedCase(
        q=torch.randn(len(positions), hq, d, generator=gen).to(dtype),
        k_cache=k_cache.to(dtype),
        v_cache=v_cache.to(dtype),
        block_tables=tables,
        query_start=torch.tensor(starts, dtype=torch.int32),
        query_positions=torch.tensor(positions, dtype=torch.int32),
        context_lens=torch.tensor([ctx for ctx, _ in seqs], dtype=torch.int32),
        scale=1.0 / math.sqrt(d),
    )


def random_seqs(rng: random.Random, n_seqs: int, max_ctx: int) -> list[tuple[int, list[int]]]:
    """A mixed batch: decode, prefill, prefill over history, two ranges, shuffled, no queries."""
    seqs = []
    for _ in range(n_seqs):
        ctx = rng.randint(1, max_ctx)
        kind = rng.choice(["decode", "prefill", "suffix", "two_ranges", "shuffled", "none"])
        if kind == "decode":
            pos = [ctx - 1]
        elif kind == "prefill":
            pos = list(range(ctx))
        elif kind == "suffix":
            pos = list(range(rng.randint(0, ctx - 1), ctx))
        elif kind == "two_ranges":  # a recomputed dropped prefix plus a new prompt
            dropped = rng.randint(1, ctx)
            new = rng.randint(dropped, ctx)
            pos = list(range(dropped)) + list(range(new, ctx))
        elif kind == "shuffled":
            pos = rng.sample(range(ctx), rng.randint(1, ctx))
        else:
            pos = []
        seqs.append((ctx, pos))
    return seqs
