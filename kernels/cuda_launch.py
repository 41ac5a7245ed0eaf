"""Launching a compiled Numba CUDA kernel with little host work.

Numba's dispatcher spends ~100-200 us of Python per launch (measured on an H200 host: type
checks and a device-array wrapper per argument, `as_cuda_array` ~19 us per tensor); an engine
step launches 2-3 kernels a layer, so a 30-layer decode step spent most of its wall time there.
Our kernels have one signature each, flat 1-D arrays and scalars only, so the launch can pack
torch tensors straight into the kernel's parameters: Numba's ABI passes a 1-D array as
(meminfo, parent, size, itemsize, data, shape, stride), the list its own launcher builds.

Where the installed numba-cuda lacks the pieces this relies on, or `PENSIEVE_NUMBA_LAUNCH=1`,
launches go through the dispatcher instead (same kernels; gpu_check compares the two paths
bit for bit). Under the simulator the dispatcher runs the kernel on numpy views.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from numba import cuda

from .cuda_prims import SIMULATOR, reset_simulated_warps


def kernel_array(t: torch.Tensor):
    """A contiguous 1-D tensor as a kernel argument: numpy view (simulator) or the tensor."""
    if SIMULATOR:
        if t.is_cuda:
            raise ValueError("the CUDA simulator is on: pass CPU tensors")
        return t.numpy()
    if not t.is_cuda:
        raise ValueError("the CUDA kernels need CUDA tensors (or NUMBA_ENABLE_CUDASIM=1)")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError("kernel arguments are contiguous 1-D tensors")
    return t


def use_dispatcher() -> bool:
    return os.environ.get("PENSIEVE_NUMBA_LAUNCH", "0") not in ("", "0")


_TORCH_DTYPES = {"int32": torch.int32, "float32": torch.float32}
_SCALARS = {"int32": ctypes.c_int32, "float32": ctypes.c_float}


@functools.cache
def _direct(dispatcher: Callable, device: int):
    """(cuda.core's launch, its LaunchConfig, the kernel, one packer per argument) for the
    dispatcher's one compiled signature on this device, or None where this numba-cuda keeps
    them elsewhere. A packer checks its argument as Numba's dispatcher would (tensor dtype and
    device, scalar kind) and returns the kernel parameters it becomes."""
    try:
        from cuda.core import LaunchConfig
        from cuda.core import launch as core_launch
        from numba.cuda import types

        (overload,) = dispatcher.overloads.values()
        kernel = overload._codelibrary.get_cufunc().kernel
        packers = []
        for ty in overload.argument_types:
            if isinstance(ty, types.Array):
                if ty.ndim != 1 or not ty.is_c_contig:
                    return None
                packers.append(functools.partial(_pack_array, _TORCH_DTYPES[str(ty.dtype)], device))
            else:
                packers.append(functools.partial(_pack_scalar, _SCALARS[str(ty)]))
    except (AttributeError, ImportError, KeyError, ValueError):
        return None
    return core_launch, LaunchConfig, kernel, tuple(packers)


def _pack_array(dtype: torch.dtype, device: int, a: torch.Tensor) -> tuple:
    """Numba's 1-D array ABI: meminfo, parent, size, itemsize, data, shape, stride (bytes)."""
    if not isinstance(a, torch.Tensor) or a.dtype != dtype or a.device.index != device:
        where = getattr(a, "device", None)
        raise TypeError(f"expected a {dtype} tensor on cuda:{device}, got {type(a)} {where}")
    n, size = a.numel(), a.element_size()
    return 0, 0, n, size, a.data_ptr(), n, size


def _pack_scalar(kind: type, a) -> tuple:
    if isinstance(a, torch.Tensor):
        raise TypeError("expected a scalar, got a tensor")
    return (kind(a.item() if isinstance(a, np.generic) else a),)


def launch(
    dispatcher: Callable, grid: tuple, block: int, stream, device: int, args: Sequence
) -> None:
    """Launch on `stream` (a Numba stream of torch's, on GPU `device`, whose context must be
    current: `cuda_attention.device_context`), or run in the simulator."""
    if SIMULATOR:
        try:
            dispatcher[grid, block](*args)
        finally:
            reset_simulated_warps()
        return
    direct = None if use_dispatcher() else _direct(dispatcher, device)
    if direct is None:
        converted = [cuda.as_cuda_array(a) if isinstance(a, torch.Tensor) else a for a in args]
        dispatcher[grid, block, stream](*converted)
        return
    core_launch, launch_config, kernel, packers = direct
    if len(args) != len(packers):
        raise TypeError(f"the kernel takes {len(packers)} arguments, got {len(args)}")
    params = [p for pack, a in zip(packers, args, strict=True) for p in pack(a)]
    core_launch(stream, launch_config(grid=grid, block=block), kernel, *params)
