"""The Numba CUDA kernels, checked without a GPU.

1. Under the CUDA simulator against the torch reference, every dtype (bfloat16 as int16 bits).
   NUMBA_ENABLE_CUDASIM is read when numba is first imported, so the cases run in a worker
   subprocess (this file run as a script) and never touch the pytest process's numba.
2. Compiled to PTX for sm_80 and sm_90 (`numba.cuda.compile_ptx`), which catches typing errors
   the simulator lets through; skipped when the CUDA toolchain (numba-cuda[cu13]) is missing.
Both workers start together and run in parallel; each test reads its case from their reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

DTYPES = ["float32", "bfloat16", "float16"]
GQA = {"hq": 6, "hkv": 2, "d": 8}
MIXED = [(37, [36]), (9, [2, 8, 5]), (0, []), (30, [0, 1, 2, 26, 27, 28, 29])]
# name -> (dtype, make_paged_case kwargs, launch overrides)
ATTENTION_CASES = {
    **{
        f"mixed[{dt}]": (dt, {"seqs": MIXED, **GQA}, {"query_tile": 2, "lanes": 2}) for dt in DTYPES
    },
    "default_heads_bs32": (
        "float32",
        {"seqs": [(40, [39]), (33, [10, 32])], "hq": 9, "hkv": 3, "d": 16, "block_size": 32},
        {"query_tile": 2, "lanes": 2},
    ),
    "group_split": (
        "float32",
        {"seqs": [(18, [17])], "hq": 34, "hkv": 1, "d": 4},
        {"query_tile": 1, "lanes": 1},
    ),
    "default_launch_shape": (
        "bfloat16",
        {"seqs": [(20, [19]), (12, [3, 11, 7])], "hq": 3, "hkv": 3, "d": 8},
        {},
    ),
}
WRITE_CASES = [f"write_kv[{dt},{slot}]" for dt in DTYPES for slot in ("int32", "int64")]
PTX_TARGETS = [
    name
    for dt in DTYPES
    for name in (f"paged_attention[{dt}]", f"write_kv[{dt},int32]", f"write_kv[{dt},int64]")
]
TOL = {"float32": 2e-5, "bfloat16": 1.6e-2, "float16": 2e-3}


def _sim_worker() -> dict:
    """Run every simulator case; report max error against the reference per case."""
    import torch

    from pensieve.kernels.cuda_attention import SIMULATOR, paged_attention_cuda, write_kv_cuda
    from pensieve.kernels.reference import paged_attention_reference, write_kv_reference
    from pensieve.kernels.testing import make_paged_case

    assert SIMULATOR, "NUMBA_ENABLE_CUDASIM was not set before numba was imported"
    report = {}
    for name, (dt, kwargs, launch) in ATTENTION_CASES.items():
        t0 = time.perf_counter()
        case = make_paged_case(dtype=getattr(torch, dt), seed=len(report), **kwargs)
        out = paged_attention_cuda(*case.args(), **launch).float()
        err = (out - paged_attention_reference(*case.args()).float()).abs().max().item()
        report[name] = {"err": err, "ok": err <= TOL[dt], "s": time.perf_counter() - t0}
    gen = torch.Generator().manual_seed(0)
    for name in WRITE_CASES:
        dt, slot = name[len("write_kv[") : -1].split(",")
        caches = [torch.randn(3, 16, 2, 4, generator=gen).to(getattr(torch, dt)) for _ in "kv"]
        kv = torch.randn(5, 2, 12, generator=gen).to(getattr(torch, dt))
        k, v = kv[..., :4], kv[..., 4:8]  # strided views, as a fused projection gives
        slots = torch.tensor([47, -1, 0, 16, 5], dtype=getattr(torch, slot))
        want = [c.clone() for c in caches]
        write_kv_cuda(k, v, *caches, slots, threads=3)
        write_kv_reference(k, v, *want, slots)
        same = all(torch.equal(a, b) for a, b in zip(caches, want, strict=True))
        report[name] = {"ok": same, "err": 0}
    case = make_paged_case([(5, [4])], d=160, seed=0)
    try:
        paged_attention_cuda(*case.args())
        report["head_dim_limit"] = {"ok": False, "err": "no ValueError for head dim 160"}
    except ValueError as exc:
        report["head_dim_limit"] = {"ok": "head dim" in str(exc), "err": str(exc)}
    return report


def _ptx_worker() -> dict:
    """Compile every kernel and dtype signature to PTX for sm_80 and sm_90."""
    try:
        from numba import cuda

        cuda.compile_ptx(lambda a: None, "void(float32[:])", cc=(8, 0))
    except Exception as exc:  # no NVVM / CUDA toolchain wheel installed
        return {"_unavailable": f"{type(exc).__name__}: {exc}"}
    from pensieve.kernels.cuda_attention import ptx_targets

    report = {}
    for name, fn, sig in ptx_targets():
        t0 = time.perf_counter()
        ok, detail = True, ""
        for cc in ((8, 0), (9, 0)):
            ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
            if f".target sm_{cc[0]}{cc[1]}" not in ptx or ".f64" in ptx:
                ok, detail = False, f"sm_{cc[0]}{cc[1]}: wrong target or float64 math in PTX"
        report[name] = {"ok": ok, "err": detail, "s": time.perf_counter() - t0}
    return report


class Worker:
    """This file run as a script in a subprocess; `report()` waits for its JSON answer."""

    def __init__(self, mode: str):
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
        if mode == "sim":
            env["NUMBA_ENABLE_CUDASIM"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._report: dict | None = None

    def report(self) -> dict:
        if self._report is None:
            out, err = self.proc.communicate(timeout=600)
            if self.proc.returncode != 0:
                pytest.fail(f"worker failed ({self.proc.returncode}):\n{err[-4000:]}")
            self._report = json.loads(out.strip().splitlines()[-1])
        return self._report


@pytest.fixture(scope="module")
def workers() -> dict[str, Worker]:
    started = {mode: Worker(mode) for mode in ("sim", "ptx")}  # both run at once
    yield started
    for worker in started.values():
        if worker.proc.poll() is None:
            worker.proc.kill()


@pytest.mark.parametrize("name", [*ATTENTION_CASES, *WRITE_CASES, "head_dim_limit"])
def test_cuda_kernel_under_simulator(workers, name):
    result = workers["sim"].report()[name]
    assert result["ok"], f"{name}: {result['err']}"


@pytest.mark.parametrize("name", PTX_TARGETS)
def test_cuda_kernel_compiles_to_ptx(workers, name):
    report = workers["ptx"].report()
    if "_unavailable" in report:
        pytest.skip(
            "CUDA toolchain for compile_ptx missing (pip install 'numba-cuda[cu13]'): "
            + report["_unavailable"]
        )
    assert report[name]["ok"], report[name]["err"]


if __name__ == "__main__":
    print(json.dumps(_sim_worker() if sys.argv[1] == "sim" else _ptx_worker()))
