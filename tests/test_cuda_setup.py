"""The start-up check on a CUDA device, on CPU: a kernel that cannot be compiled fails the
start in one clear error naming the extra to install, before any model file is read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pensieve import cuda_setup, runtime
from pensieve.config import EngineConfig
from pensieve.errors import ModelLoadError


def no_nvvm(index: int) -> None:
    """What numba-cuda raises when the CUDA extra is missing (faked: no GPU here)."""
    raise RuntimeError("libNVVM cannot be found. Do `pip install nvidia-nvvm`")


def test_a_compile_failure_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_setup, "_probe", no_nvvm)
    with pytest.raises(ModelLoadError) as info:
        cuda_setup.ensure_cuda_kernels(torch.device("cuda"))
    message = str(info.value)
    assert "cuda:0" in message and "libNVVM cannot be found" in message
    assert f'pip install -e ".[{cuda_setup.cuda_extra()}]"' in message
    assert "cu12" in message and "cu13" in message


def test_load_pretrained_checks_before_loading_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_setup, "_probe", no_nvvm)
    monkeypatch.setattr(runtime, "pick_device", lambda name: torch.device("cuda", 0))

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was read before the CUDA check")

    monkeypatch.setattr(runtime, "resolve_model", must_not_load)
    with pytest.raises(ModelLoadError, match="install the CUDA extra"):
        runtime.load_pretrained(EngineConfig(device="cuda"))


def test_cpu_never_runs_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_setup, "_probe", no_nvvm)
    called = []
    monkeypatch.setattr(runtime, "resolve_model", lambda *a, **k: called.append(1) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # got past the device check to the model
        runtime.load_pretrained(EngineConfig(device="cpu"))
    assert called


def test_the_simulator_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    cuda_setup._probe.cache_clear()
    with pytest.raises(ModelLoadError, match="simulator"):
        cuda_setup.ensure_cuda_kernels(torch.device("cuda", 0))
    cuda_setup._probe.cache_clear()


@pytest.mark.parametrize(("version", "extra"), [("12.8", "cu12"), ("13.0", "cu13"), (None, "cu13")])
def test_the_extra_follows_torchs_cuda(
    monkeypatch: pytest.MonkeyPatch, version: str | None, extra: str
) -> None:
    monkeypatch.setattr(torch.version, "cuda", version)
    assert cuda_setup.cuda_extra() == extra


PTX = """
import json
try:
    from numba import cuda
    from pensieve import _cuda_probe
    ptx, _ = cuda.compile_ptx(_cuda_probe.reverse_scale, _cuda_probe.SIGNATURE, cc=(8, 0))
    print(json.dumps({"ok": ".entry" in ptx}))
except Exception as exc:
    print(json.dumps({"skip": f"{type(exc).__name__}: {exc}"}))
"""


def test_the_probe_kernel_compiles_to_ptx() -> None:
    """The kernel the check runs on a GPU is valid CUDA (needs the cu13 toolchain, as CI has);
    in a subprocess so that this test process never imports numba.cuda."""
    out = subprocess.run(
        [sys.executable, "-c", PTX], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(f"no NVVM here: {result['skip']}")
    assert result["ok"]
