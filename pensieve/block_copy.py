"""Copying KV blocks between two pools, for the swapper: runs of blocks over a range of layers.

A copy is planned as runs (consecutive source blocks to consecutive destination blocks) so that
adjacent blocks move in one call. Each copier moves those runs for a range of layers straight
between the two pools' own memory, with no temporary in between (a temporary on the host side
would be pageable: the copy would go synchronous and at a fraction of the bandwidth):

- `TorchCopier` on a CPU host: one strided torch copy per run, all layers at once.
- `TorchCopier(per_layer=True)` on a GPU host without cuda-python: one contiguous
  `copy_(non_blocking=True)` per run and layer, issued on the caller's current stream.
- `Memcpy2DCopier` on a GPU host: one `cudaMemcpy2DAsync` per run and K/V (rows = layers),
  through a `memcpy_2d(dst, dpitch, src, spitch, width, height)` function (`pensieve.cudart`;
  tests pass one that copies host memory, so its address arithmetic runs on CPU too).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Protocol

import torch

from pensieve.block_allocator import KVPool

Run = tuple[int, int, int]  # (first source block, first destination block, blocks)
Memcpy2D = Callable[[int, int, int, int, int, int], None]


def coalesce(pairs: list[tuple[int, int]]) -> list[Run]:
    """(source, destination) block pairs as runs, in order; adjacent pairs that continue both
    sides by one block join the run before them."""
    runs: list[list[int]] = []
    for src, dst in pairs:
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            runs[-1][2] += 1
        else:
            runs.append([src, dst, 1])
    return [(s, d, n) for s, d, n in runs]


def check_runs(src: KVPool, dst: KVPool, runs: list[Run]) -> None:
    """Refuse a copy between pools of another layout, or outside either pool (a raw copy would
    write past the pool instead of raising)."""
    if src.keys.shape[0] != dst.keys.shape[0] or src.keys.shape[2:] != dst.keys.shape[2:]:
        raise ValueError(f"pools differ in layout: {src.keys.shape} vs {dst.keys.shape}")
    if src.keys.dtype != dst.keys.dtype:
        raise ValueError(f"pools differ in dtype: {src.keys.dtype} vs {dst.keys.dtype}")
    for pool in (src, dst):
        for t in (pool.keys, pool.values):
            if not t.is_contiguous():
                raise ValueError("a KV pool must be contiguous")
    for s, d, n in runs:
        if s < 0 or d < 0 or s + n > src.num_blocks or d + n > dst.num_blocks:
            raise IndexError(f"blocks {s}+{n} -> {d}+{n} outside the pools")


class BlockCopier(Protocol):
    def begin(self) -> None:
        """Called on the copying thread before each order's copies."""

    def copy(self, src: KVPool, dst: KVPool, runs: list[Run], layers: range) -> None:
        """Issue the copies of `runs` for `layers` (asynchronous on a GPU host)."""


class TorchCopier:
    """torch copies. `per_layer`: only contiguous slices (one layer of a run at a time), which
    torch copies between pinned host and device memory without a temporary."""

    def __init__(self, per_layer: bool = False):
        self.per_layer = per_layer

    def begin(self) -> None:
        pass

    def copy(self, src: KVPool, dst: KVPool, runs: list[Run], layers: range) -> None:
        if self.per_layer:
            spans = [slice(layer, layer + 1) for layer in layers]
        else:
            spans = [slice(layers.start, layers.stop)]
        for s_t, d_t in ((src.keys, dst.keys), (src.values, dst.values)):
            for span in spans:
                for s, d, n in runs:
                    d_t[span, d : d + n].copy_(s_t[span, s : s + n], non_blocking=True)


class Memcpy2DCopier:
    """One 2-D copy per run and K/V: `len(layers)` rows of n blocks, one pool layer apart."""

    def __init__(self, memcpy_2d: Memcpy2D, begin: Callable[[], None] | None = None):
        self.memcpy_2d = memcpy_2d
        self._begin = begin

    def begin(self) -> None:
        if self._begin is not None:
            self._begin()  # the runtime's current device, per thread

    def copy(self, src: KVPool, dst: KVPool, runs: list[Run], layers: range) -> None:
        for s_t, d_t in ((src.keys, dst.keys), (src.values, dst.values)):
            size = s_t.element_size()
            block = s_t[0, 0].numel() * size  # bytes of one block of one layer
            spitch, dpitch = s_t.stride(0) * size, d_t.stride(0) * size
            s_base = s_t.data_ptr() + layers.start * spitch
            d_base = d_t.data_ptr() + layers.start * dpitch
            for s, d, n in runs:
                self.memcpy_2d(
                    d_base + d * block, dpitch, s_base + s * block, spitch, n * block, len(layers)
                )


def host_memcpy_2d(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
    """`cudaMemcpy2D` between host addresses: what `Memcpy2DCopier` asks of the GPU, on CPU."""
    for row in range(height):
        ctypes.memmove(dst + row * dpitch, src + row * spitch, width)


def pick_copier(device: torch.device, stream: torch.cuda.Stream | None) -> BlockCopier:
    """The copier for a swapper whose device pool is on `device` (its copies on `stream`)."""
    if device.type != "cuda":
        return TorchCopier()
    from pensieve import cudart

    if stream is not None and cudart.available():
        memcpy_2d = cudart.Memcpy2D(device, stream)
        return Memcpy2DCopier(memcpy_2d, memcpy_2d.begin)
    return TorchCopier(per_layer=True)
