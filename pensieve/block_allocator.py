"""Fixed-size KV blocks: the per-tier tensor pool and its allocator."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class OutOfBlocks(Exception):
    """Raised by `BlockAllocator.allocate` when the tier cannot serve the request."""


class BlockAllocator:
    """Hands out block ids of one tier; freeing a block that is not allocated is an error."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.allocated = bytearray(num_blocks)  # 1 where the block is handed out
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() yields low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int = 1) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free of {self.num_blocks}")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self.allocated[b] = 1
        return blocks

    def free(self, block: int) -> None:
        if not self.allocated[block]:
            raise ValueError(f"block {block} freed twice")
        self.allocated[block] = 0
        self._free.append(block)


@dataclass
class KVPool:
    """K and V of every layer of one tier: [layers, blocks, block_size, kv_heads, head_dim]."""

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def empty(
        cls,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        pin_memory: bool = False,
    ) -> KVPool:
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        pin = pin_memory and device.type == "cpu" and torch.cuda.is_available()
        make = lambda: torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)  # noqa: E731
        return cls(make(), make())

    @property
    def num_blocks(self) -> int:
        return self.keys.shape[1]

    @property
    def bytes_per_block(self) -> int:
        per_layer_block = self.keys[0, 0].numel() * self.keys.element_size()
        return 2 * per_layer_block * self.keys.shape[0]
