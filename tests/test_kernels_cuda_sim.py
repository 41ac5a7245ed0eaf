"""The Numba CUDA kernels, checked without a GPU.

1. Under the CUDA simulator against the torch reference: the default model's head layout
   (9 query / 3 KV heads, head dim 64) and head dim 128, float16, bfloat16 (as bits) and
   float32, decode rows split across partitions and merged (split-KV), several softmax chunks,
   mixed decode + prefill + recompute batches, GQA groups split across blocks, write_kv on
   strided views, and the engine's per-step path (`PagedAttentionBackend` with a `CudaStep`).
   NUMBA_ENABLE_CUDASIM is read when numba is first imported, so the cases run in a worker
   subprocess (this file run as a script) and never touch the pytest process's numba.
2. `python -m pensieve.kernels.inspect --json`: every kernel compiled to PTX for sm_80 and
   sm_90 (float32 for sm_80 only) and assembled by ptxas; the decode kernel must have no stack
   frame, no spills and at most 128 registers. Skipped when the CUDA toolchain
   (numba-cuda[cu13]) is missing.
The workers start together and run in parallel; each test reads its case from their reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

SMALL = {"decode_threads": 32, "prefill_threads": 32, "chunk": 16, "key_tile": 8,
         "split_min_keys": 8, "sms": 4}  # fmt: skip
NO_SPLIT = {**SMALL, "sms": 1}  # one SM: rows x heads already fill it, nothing splits
TWO_WARPS = {**SMALL, "decode_threads": 64, "prefill_threads": 64}
MIXED = [(37, [36]), (9, [2, 8, 5]), (0, []), (30, [0, 1, 2, 26, 27, 28, 29]), (20, [19])]
DEFAULT_HEADS = {"hq": 9, "hkv": 3, "d": 64}
# more SMs than tiles x heads: prefill tiles split their keys, rows 0-2 of the recompute chunk
# get empty partials past their causal limit, and the decode row splits too
PREFILL_SPLIT = {**SMALL, "sms": 16}
SPLIT_SEQS = [(60, list(range(52, 60))), (30, [0, 1, 2, 26, 27, 28, 29]), (37, [36])]
# name -> (dtype, make_paged_case kwargs, LaunchConfig kwargs)
ATTENTION_CASES = {
    "default_heads_decode_split[bfloat16]": (
        "bfloat16", {"seqs": [(37, [36]), (5, [4])], **DEFAULT_HEADS}, SMALL),
    "default_heads_mixed[float16]": (
        "float16", {"seqs": MIXED, **DEFAULT_HEADS, "block_size": 32}, SMALL),
    # the 7-query chunk of MIXED is float16's above (a third of this file's simulator time)
    "default_heads_mixed[bfloat16]": (
        "bfloat16", {"seqs": MIXED[:3] + MIXED[4:], **DEFAULT_HEADS}, SMALL),
    "default_heads_chunks_no_split[bfloat16]": (
        "bfloat16", {"seqs": [(50, [49]), (33, [32])], **DEFAULT_HEADS}, NO_SPLIT),
    "default_heads_two_warps[bfloat16]": (
        "bfloat16", {"seqs": MIXED[:2], **DEFAULT_HEADS}, TWO_WARPS),
    "head_dim_128[bfloat16]": (
        "bfloat16", {"seqs": [(40, [39]), (12, [3, 11, 7])], "hq": 8, "hkv": 2, "d": 128}, SMALL),
    "head_dim_128_group_8[float16]": (
        "float16",
        {"seqs": [(26, [25]), (10, [0, 9, 4, 5])], "hq": 8, "hkv": 1, "d": 128, "block_size": 32},
        SMALL,
    ),
    "mixed_head_dim_128[float32]": (  # the long split decode is head_dim_128[bfloat16]'s
        "float32", {"seqs": [(12, [11]), *MIXED[1:3]], "hq": 6, "hkv": 2, "d": 128}, SMALL),
    "prefill_split[bfloat16]": (
        "bfloat16", {"seqs": SPLIT_SEQS, **DEFAULT_HEADS}, PREFILL_SPLIT),
    "prefill_split[float32]": (
        "float32", {"seqs": SPLIT_SEQS, "hq": 4, "hkv": 2, "d": 16}, PREFILL_SPLIT),
    "group_split[float32]": (
        "float32", {"seqs": [(18, [17]), (7, [1, 6])], "hq": 34, "hkv": 1, "d": 4}, SMALL),
}  # fmt: skip
WRITE_CASES = [
    f"write_kv[{dt},{slot},{path}]"
    for dt in ("float32", "bfloat16", "float16")
    for slot in ("int32", "int64")
    for path in ("vector", "word")
]
OTHER_SIM = ["backend_step[bfloat16]", "head_dim_limit", "direct_launch_packing"]
TOL = {"float32": 2e-5, "bfloat16": 1.6e-2, "float16": 2e-3}
INSPECT_DTYPES = ("float32", "float16", "bfloat16")
KERNELS = ("decode", "merge", "prefill", "write_kv")
SHAPE_DIMS = (64, 128)
ARCHS = ("sm_80", "sm_90")


def _attention_case(name: str, dt: str, kwargs: dict, launch: dict, seed: int) -> dict:
    import torch

    from pensieve.kernels.cuda_attention import paged_attention_cuda
    from pensieve.kernels.cuda_plan import LaunchConfig
    from pensieve.kernels.reference import paged_attention_reference
    from pensieve.kernels.testing import make_paged_case

    case = make_paged_case(dtype=getattr(torch, dt), seed=seed, **kwargs)
    out = paged_attention_cuda(*case.args(), config=LaunchConfig(**launch))
    err = (out.float() - paged_attention_reference(*case.args()).float()).abs().max().item()
    return {"err": err, "ok": err <= TOL[dt] and out.dtype == case.q.dtype}


def _write_case(dt: str, slot: str, path: str) -> dict:
    import torch

    from pensieve.kernels.cuda_attention import write_kv_cuda
    from pensieve.kernels.reference import write_kv_reference

    dtype = getattr(torch, dt)
    hkv, d = (2, 8) if path == "vector" else (1, 2)  # rows of 16+ bytes, or of 4 or 8
    gen = torch.Generator().manual_seed(0)
    caches = [torch.randn(3, 16, hkv, d, generator=gen).to(dtype) for _ in "kv"]
    kv = torch.randn(5, hkv, 3 * d, generator=gen).to(dtype)
    k, v = kv[..., :d], kv[..., d : 2 * d]  # strided views, as a fused projection gives
    slots = torch.tensor([47, -1, 0, 16, 5], dtype=getattr(torch, slot))
    want = [c.clone() for c in caches]
    write_kv_cuda(k, v, *caches, slots)
    write_kv_reference(k, v, *want, slots)
    return {"ok": all(torch.equal(a, b) for a, b in zip(caches, want, strict=True)), "err": 0}


def _backend_case() -> dict:
    """Two layers through the engine's path: StepMetadata, PagedAttentionBackend, CudaStep."""
    import torch

    from pensieve.block_allocator import KVPool
    from pensieve.kernels.cuda_plan import LaunchConfig
    from pensieve.kernels.reference import paged_attention_reference, write_kv_reference
    from pensieve.messages import SamplingParams, SequenceRows
    from pensieve.paged import PagedAttentionBackend, StepMetadata

    gen = torch.Generator().manual_seed(3)
    pool = KVPool.empty(2, 8, 16, 3, 64, torch.bfloat16, torch.device("cpu"))
    pool.keys.copy_(torch.randn(pool.keys.shape, generator=gen))
    pool.values.copy_(torch.randn(pool.values.shape, generator=gen))
    rows = [  # a decode row over two blocks, and a prompt of 5 new tokens after 3 cached ones
        SequenceRows(1, [0], [20], [5, 2], 21, True, SamplingParams()),
        SequenceRows(2, [0] * 5, list(range(3, 8)), [7], 8, True, SamplingParams()),
    ]
    meta = StepMetadata.build(rows, 16, torch.device("cpu"))
    want = KVPool(pool.keys.clone(), pool.values.clone())
    backend = PagedAttentionBackend(
        pool, meta, cuda_kernels=True, debug=True, cuda_config=LaunchConfig(**SMALL)
    )
    err, steps = 0.0, set()
    for layer in range(2):
        q, k, v = (torch.randn(6, h, 64, generator=gen).to(torch.bfloat16) for h in (9, 3, 3))
        out = backend.attend(layer, q, k, v)
        steps.add(id(backend._cuda_step))
        kc, vc = want.keys[layer], want.values[layer]
        write_kv_reference(k, v, kc, vc, meta.slot_mapping)
        ref = paged_attention_reference(
            q, kc, vc, meta.block_tables, meta.query_start, meta.positions, meta.context_lens,
            1 / 8,
        )  # fmt: skip
        err = max(err, (out.float() - ref.float()).abs().max().item())
    same_pool = torch.equal(pool.keys, want.keys) and torch.equal(pool.values, want.values)
    return {"ok": err <= TOL["bfloat16"] and same_pool and len(steps) == 1, "err": err}


def _packing_case() -> dict:
    """The direct launcher's parameters (`kernels.cuda_launch`): Numba's 1-D array ABI, and the
    refusals Numba's dispatcher would raise (a GPU launch itself is gpu_check's)."""
    import ctypes

    import numpy as np
    import torch

    from pensieve.kernels.cuda_launch import _pack_array, _pack_scalar

    t = torch.arange(10, dtype=torch.int32)[3:]  # a view: the data pointer includes its offset
    packed = _pack_array(torch.int32, None, t)
    ok = packed == (0, 0, 7, 4, t.untyped_storage().data_ptr() + 12, 7, 4)
    ok &= _pack_scalar(ctypes.c_float, np.float32(0.5))[0].value == 0.5
    ok &= _pack_scalar(ctypes.c_int32, np.int32(-3))[0].value == -3
    refused = 0
    for pack, arg in [
        (lambda a: _pack_array(torch.float32, None, a), t),  # wrong dtype
        (lambda a: _pack_array(torch.int32, 0, a), t),  # wrong device
        (lambda a: _pack_array(torch.int32, None, a), np.int32(1)),  # a scalar for an array
        (lambda a: _pack_scalar(ctypes.c_int32, a), t),  # a tensor for a scalar
    ]:
        try:
            pack(arg)
        except TypeError:
            refused += 1
    return {"ok": bool(ok) and refused == 4, "err": f"packed {packed}, refused {refused}/4"}


def _sim_worker() -> dict:
    """Run every simulator case; report max error against the reference and seconds per case."""
    sys.setswitchinterval(1e-3)  # simulated threads hand over the GIL faster
    from pensieve.kernels.cuda_prims import SIMULATOR

    assert SIMULATOR, "NUMBA_ENABLE_CUDASIM was not set before numba was imported"
    report = {}
    for i, (name, (dt, kwargs, launch)) in enumerate(ATTENTION_CASES.items()):
        t0 = time.perf_counter()
        report[name] = {**_attention_case(name, dt, kwargs, launch, i), "s": 0.0}
        report[name]["s"] = time.perf_counter() - t0
    for name in WRITE_CASES:
        report[name] = _write_case(*name[len("write_kv[") : -1].split(","))
    t0 = time.perf_counter()
    report["backend_step[bfloat16]"] = {**_backend_case(), "s": time.perf_counter() - t0}
    report["direct_launch_packing"] = _packing_case()
    import torch

    from pensieve.kernels.cuda_attention import paged_attention_cuda
    from pensieve.kernels.testing import make_paged_case

    case = make_paged_case([(5, [4])], d=160, dtype=torch.bfloat16, seed=0)
    try:
        paged_attention_cuda(*case.args())
        report["head_dim_limit"] = {"ok": False, "err": "no ValueError for head dim 160"}
    except ValueError as exc:
        report["head_dim_limit"] = {"ok": "head dim" in str(exc), "err": str(exc)}
    return report


class Worker:
    """A subprocess whose last stdout line is a JSON report; `report()` waits for it."""

    def __init__(self, cmd: list[str], simulator: bool):
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
        if simulator:
            env["NUMBA_ENABLE_CUDASIM"] = "1"
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._report: dict | list | None = None

    def report(self):
        if self._report is None:
            out, err = self.proc.communicate(timeout=900)
            if self.proc.returncode != 0:
                pytest.fail(f"worker failed ({self.proc.returncode}):\n{err[-4000:]}")
            self._report = json.loads(out.strip().splitlines()[-1])
        return self._report


def _inspect(arch: int, dtypes: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "pensieve.kernels.inspect", "--json", "--compact",
            "--arch", str(arch), "--dtype", ",".join(dtypes)]  # fmt: skip


@pytest.fixture(scope="module")
def workers() -> dict[str, Worker]:
    started = {  # all run at once; float32 (not an inspect target) is compiled for sm_80 only
        "sim": Worker([sys.executable, os.path.abspath(__file__), "sim"], simulator=True),
        "sm_80": Worker(_inspect(80, INSPECT_DTYPES), simulator=False),
        "sm_90": Worker(_inspect(90, ("float16", "bfloat16")), simulator=False),
    }
    yield started
    for worker in started.values():
        if worker.proc.poll() is None:
            worker.proc.kill()


@pytest.mark.parametrize("name", [*ATTENTION_CASES, *WRITE_CASES, *OTHER_SIM])
def test_cuda_kernel_under_simulator(workers, name):
    result = workers["sim"].report()[name]
    assert result["ok"], f"{name}: {result['err']}"


def _inspect_rows(workers, kernel: str, dtype: str, head_dim: int) -> list[dict]:
    rows = []
    for arch in ARCHS:
        report = workers[arch].report()
        if isinstance(report, dict) and "unavailable" in report:
            pytest.skip(f"CUDA toolchain for compile_ptx missing: {report['unavailable']}")
        key = (kernel, dtype, head_dim)
        rows += [r for r in report if (r["kernel"], r["dtype"], r["head_dim"]) == key]
    want = {"sm_80"} if dtype == "float32" else set(ARCHS)
    assert {r["arch"] for r in rows} == want, f"missing architectures: {rows}"
    return rows


@pytest.mark.parametrize("head_dim", SHAPE_DIMS)
@pytest.mark.parametrize("dtype", INSPECT_DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_kernel_compiles_to_ptx(workers, kernel, dtype, head_dim):
    for row in _inspect_rows(workers, kernel, dtype, head_dim):
        assert row["compile_error"] is None, row["compile_error"]
        assert row["float64_in_ptx"] == 0, f"float64 math in {row}"


@pytest.mark.parametrize("head_dim", SHAPE_DIMS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_decode_kernel_keeps_everything_in_registers(workers, dtype, head_dim):
    """ptxas: no stack frame, no spills, at most 128 registers (sm_80 and sm_90)."""
    for row in _inspect_rows(workers, "decode", dtype, head_dim):
        if row["assembler_error"]:
            pytest.skip(f"no ptxas could assemble the PTX: {row['assembler_error']}")
        assert row["stack_bytes"] == 0, row
        assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0, row
        assert row["registers"] <= 128, row
        assert row["int_divisions_in_ptx"] == 0 and row["local_ops_in_ptx"] == 0, row


if __name__ == "__main__":
    print(json.dumps(_sim_worker()))
