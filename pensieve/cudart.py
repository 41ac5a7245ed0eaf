"""cuda-python's job in Pensieve: the host tier's pinned memory and the swapper's copies.

Two things torch does not do the way the tiered cache needs:
- torch's pinned allocator rounds every allocation up to a power of two (a 40 GiB host tier
  would pin 64 GiB per K/V tensor); `pinned_zeros` pins exactly the bytes asked for
  (`cudaHostAlloc`) and frees them when the last view of the tensor goes.
- torch copies a strided view between host and device through a temporary, so a block's rows
  of all layers cost one call per layer; `Memcpy2D` moves them in one `cudaMemcpy2DAsync`
  (rows = layers, pitch = one layer of the pool) on the swapper's own stream.

Everything here is optional: without cuda-python (`cuda.bindings`) or when its runtime cannot
talk to the driver, callers fall back to torch (`available()` says which).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import weakref
from typing import Any

import numpy as np
import torch

log = logging.getLogger("pensieve.cudart")


@functools.cache
def runtime() -> Any | None:
    """cuda-python's runtime module, or None when it is not installed or cannot run here."""
    try:
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or count == 0:
            raise RuntimeError(f"cudaGetDeviceCount: {err}")
        return cudart
    except Exception as exc:  # not installed, or a runtime newer than the driver
        log.info("cuda-python runtime unavailable (%s): torch does the host<->device copies", exc)
        return None


def available() -> bool:
    return torch.cuda.is_available() and runtime() is not None


def check(result: tuple) -> Any:
    """Raise on a failed runtime call; return its value (if any)."""
    cudart = runtime()
    err, *rest = result
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        raise RuntimeError(
            f"CUDA runtime error {name.decode() if isinstance(name, bytes) else name}"
        )
    return rest[0] if len(rest) == 1 else tuple(rest)


def set_device(index: int) -> None:
    """Make `index` the calling thread's device for the runtime calls that follow."""
    check(runtime().cudaSetDevice(index))


@functools.cache
def max_pitch(index: int) -> int:
    """The largest row pitch a 2-D copy accepts on this device (often 2 GiB - 1)."""
    cudart = runtime()
    return int(
        check(cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrMaxPitch, index))
    )


class Memcpy2D:
    """2-D async copies on one stream: `height` rows of `width` bytes, rows `pitch` apart.

    Falls back to one 1-D copy per row where a pitch exceeds the device's limit."""

    def __init__(self, device: torch.device, stream: torch.cuda.Stream):
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.stream = int(stream.cuda_stream)
        self.limit = max_pitch(self.index)
        self.kind = runtime().cudaMemcpyKind.cudaMemcpyDefault  # unified addressing

    def begin(self) -> None:
        """Called once per order on the copying thread: runtime calls act on this device."""
        set_device(self.index)

    def __call__(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int):
        cudart = runtime()
        if height == 1:
            check(cudart.cudaMemcpyAsync(dst, src, width, self.kind, self.stream))
        elif max(dpitch, spitch) <= self.limit:
            check(
                cudart.cudaMemcpy2DAsync(
                    dst, dpitch, src, spitch, width, height, self.kind, self.stream
                )
            )
        else:
            for row in range(height):
                d, s = dst + row * dpitch, src + row * spitch
                check(cudart.cudaMemcpyAsync(d, s, width, self.kind, self.stream))


def pinned_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in page-locked memory of exactly its size (`cudaHostAlloc`).

    The memory is freed (`cudaFreeHost`) once no view of the tensor is left."""
    cudart = runtime()
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    ptr = int(check(cudart.cudaHostAlloc(max(nbytes, 1), cudart.cudaHostAllocDefault)))
    return wrap_host_memory(ptr, nbytes, shape, dtype, lambda: cudart.cudaFreeHost(ptr))


def wrap_host_memory(
    ptr: int, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype, free: Any
) -> torch.Tensor:
    """A zeroed tensor over `nbytes` of host memory at `ptr`; `free()` runs when the last
    view of it is gone (torch keeps the numpy array alive, the array keeps the buffer)."""
    buffer = (ctypes.c_ubyte * max(nbytes, 1)).from_address(ptr)
    array = np.ctypeslib.as_array(buffer)[:nbytes]
    weakref.finalize(buffer, free)
    tensor = torch.from_numpy(array).view(dtype).view(shape)
    tensor.zero_()
    return tensor
