"""The paged attention backend: the model's attention on the device tier's KV pool."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pensieve import kernels
from pensieve.block_allocator import KVPool
from pensieve.messages import SequenceRows


@dataclass
class StepMetadata:
    """Where each of the step's tokens writes its KV and what each sequence's queries read."""

    slot_mapping: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_start: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32
    sample_rows: torch.Tensor  # [S] int64: the last row of each sequence that samples

    @classmethod
    def build(cls, rows: list[SequenceRows], block_size: int, device: torch.device) -> StepMetadata:
        """Tensors for a step's rows; slots come from the block tables with array operations."""
        width = max((len(r.block_table) for r in rows), default=1) or 1
        table = torch.full((len(rows), width), -1, dtype=torch.int32)
        for i, r in enumerate(rows):
            table[i, : len(r.block_table)] = torch.tensor(r.block_table, dtype=torch.int32)
        query_lens = torch.tensor([len(r.tokens) for r in rows], dtype=torch.int64)
        starts = torch.zeros(len(rows) + 1, dtype=torch.int64)
        torch.cumsum(query_lens, 0, out=starts[1:])
        positions = torch.tensor([p for r in rows for p in r.positions], dtype=torch.int64)
        owner = torch.repeat_interleave(torch.arange(len(rows)), query_lens)
        chunk = positions // block_size
        if bool((chunk >= width).any()):
            raise ValueError("a position lies past its sequence's block table")
        blocks = table[owner, chunk].long()
        if bool((blocks < 0).any()):
            i = int(torch.nonzero(blocks < 0)[0])
            rid = rows[int(owner[i])].request_id
            raise ValueError(f"request {rid}: position {int(positions[i])} is not on device")
        slots = blocks * block_size + positions % block_size
        sample_rows = torch.tensor(
            [int(starts[i + 1]) - 1 for i, r in enumerate(rows) if r.sample], dtype=torch.int64
        )
        return cls(
            slot_mapping=slots.to(device),
            positions=positions.to(torch.int32).to(device),
            block_tables=table.to(device),
            query_start=starts.to(torch.int32).to(device),
            context_lens=torch.tensor([r.context_len for r in rows], dtype=torch.int32).to(device),
            sample_rows=sample_rows.to(device),
        )


class PagedAttentionBackend:
    """Writes each layer's new K/V into its slots, then attends through the block tables.

    `wait_for_layer(i)` blocks until layer i's restored KV has arrived (pipelined swap-in):
    layer i's attention waits only for layer i's copy.
    """

    def __init__(
        self,
        pool: KVPool,
        meta: StepMetadata,
        wait_for_layer: Callable[[int], None] | None = None,
    ):
        self.pool = pool
        self.meta = meta
        self.wait_for_layer = wait_for_layer

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.wait_for_layer is not None:
            self.wait_for_layer(layer)
        k_cache, v_cache = self.pool.keys[layer], self.pool.values[layer]
        m = self.meta
        check = layer == 0  # the metadata is the same for every layer: validate it once a step
        kernels.write_kv(k, v, k_cache, v_cache, m.slot_mapping, validate=check)
        return kernels.paged_attention(
            q,
            k_cache,
            v_cache,
            m.block_tables,
            m.query_start,
            m.positions,
            m.context_lens,
            1.0 / math.sqrt(q.shape[-1]),
            validate=check,
        )
