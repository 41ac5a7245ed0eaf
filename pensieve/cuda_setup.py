"""Start-up check on a CUDA device: can Numba compile and launch a kernel here?

numba-cuda compiles kernels with NVVM and links them with nvJitLink/the driver; torch's wheels
bring neither, so without the CUDA extra (`pip install -e ".[cu12]"` or `".[cu13]"`) the first
attention call of the first request would fail deep inside a step. `ensure_cuda_kernels` turns
that into one clear error before the model is even loaded.
"""

from __future__ import annotations

import functools
import os

import torch

from pensieve.errors import ModelLoadError

EXTRAS = {12: "cu12", 13: "cu13"}


def cuda_extra() -> str:
    """The extra that matches torch's CUDA major version (cu13 when unknown or newer)."""
    version = torch.version.cuda or ""
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 13
    return EXTRAS.get(major, "cu13")


def install_hint() -> str:
    extra = cuda_extra()
    return (
        f'install the CUDA extra: pip install -e ".[{extra}]" (from a checkout; '
        f"'pensieve[{extra}]' otherwise). Pick cu12 for a CUDA 12.x driver and cu13 for 13.x "
        f"(nvidia-smi shows it); this torch is built for CUDA {torch.version.cuda}"
    )


def ensure_cuda_kernels(device: torch.device) -> None:
    """Raise ModelLoadError naming the extra to install unless a Numba CUDA kernel compiles
    and runs on `device` (checked once per device and process)."""
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    try:
        _probe(index)
    except Exception as exc:
        name = torch.cuda.get_device_name(index) if torch.cuda.is_available() else "?"
        raise ModelLoadError(
            f"cannot compile or launch a CUDA kernel on cuda:{index} ({name}): "
            f"{type(exc).__name__}: {exc}; {install_hint()}"
        ) from exc


@functools.cache
def _probe(index: int) -> None:
    """Compile the probe kernel for the device, run it there and check what it wrote."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        raise RuntimeError("NUMBA_ENABLE_CUDASIM is set: Numba runs its simulator, not the GPU")
    from numba import cuda

    from pensieve import _cuda_probe

    device = torch.device("cuda", index)
    x = torch.arange(_cuda_probe.THREADS, dtype=torch.float32, device=device)
    out = torch.zeros_like(x)
    stream = torch.cuda.current_stream(device)
    with cuda.gpus[index]:
        kernel = _compile_probe()
        launch = kernel[1, _cuda_probe.THREADS, cuda.external_stream(stream.cuda_stream)]
        launch(cuda.as_cuda_array(out), cuda.as_cuda_array(x))
    stream.synchronize()
    if not torch.equal(out, x.flip(0) * 2 + 1):
        raise RuntimeError("the probe kernel ran but wrote wrong values")


def _compile_probe():  # noqa: ANN202
    """The probe kernel, compiled now for the current device (NVVM, libdevice, linking)."""
    from numba import cuda

    from pensieve import _cuda_probe

    return cuda.jit(_cuda_probe.SIGNATURE)(_cuda_probe.reverse_scale)
