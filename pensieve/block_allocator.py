"""Fixed-size KV blocks: the per-tier tensor pool and its allocator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pensieve.huge_pages import huge_page_tensor


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


def pinned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeroed page-locked host memory: exactly its size through cuda-python where it runs
    (torch's pinned allocator rounds up to a power of two), else torch's."""
    from pensieve import cudart

    if cudart.available():
        return cudart.pinned_zeros(shape, dtype)
    return torch.zeros(shape, dtype=dtype, pin_memory=True)


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
        """`pin_memory` (the host tier) page-locks the pool so that the swapper's copies run
        asynchronously at full bandwidth; ignored where there is no GPU. A CPU pool the steps
        read (no `pin_memory`: a CPU host's device tier) lies in 2 MB pages, `huge_pages`: the
        attention reads its blocks from anywhere. Not the host tier, which only the swapper's
        block copies touch: first-touching 2 MB pages cost ~2 s a GiB on a KVM guest, 4 KB pages
        0.25 s, at start-up."""
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        if pin_memory and device.type == "cpu" and torch.cuda.is_available():
            return cls(pinned(shape, dtype), pinned(shape, dtype))
        if device.type == "cpu" and not pin_memory:
            return cls(huge_page_tensor(shape, dtype), huge_page_tensor(shape, dtype))
        make = lambda: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        return cls(make(), make())

    @property
    def num_blocks(self) -> int:
        return self.keys.shape[1]

    @property
    def bytes_per_block(self) -> int:
        per_layer_block = self.keys[0, 0].numel() * self.keys.element_size()
        return 2 * per_layer_block * self.keys.shape[0]
