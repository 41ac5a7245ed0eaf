"""The paged attention backend: the model's attention on the device tier's KV pool."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pensieve import kernels
from pensieve.block_allocator import KVPool


@dataclass
class StepMetadata:
    """Where each of the step's tokens writes its KV and what each sequence's queries read."""

    slot_mapping: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_start: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32

    @classmethod
    def build(
        cls,
        slots: list[int],
        positions: list[int],
        block_tables: list[list[int]],
        query_lens: list[int],
        context_lens: list[int],
        device: torch.device,
    ) -> StepMetadata:
        width = max((len(t) for t in block_tables), default=1) or 1
        table = torch.full((len(block_tables), width), -1, dtype=torch.int32)
        for i, row in enumerate(block_tables):
            table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        as_int = lambda xs, dt=torch.int32: torch.tensor(xs, dtype=dt, device=device)  # noqa: E731
        return cls(
            slot_mapping=as_int(slots, torch.int64),
            positions=as_int(positions),
            block_tables=table.to(device),
            query_start=as_int(starts),
            context_lens=as_int(context_lens),
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
