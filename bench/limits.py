"""This machine's limits for one model, measured in the same run as `bench_step`: GEMM throughput
at the model's own matmul shapes and memory read bandwidth. Machines differ (native bf16 or
emulated, core count, memory channels), so a step is judged against the limits of the machine it
ran on, never against figures from another.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from pensieve.config import ModelConfig
from pensieve.huge_pages import huge_page_tensor
from pensieve.linear import few_rows_form, onednn_matmul, onednn_packs, reorder_for_onednn
from pensieve.model import cpu_has_native_bf16

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
LAYER_MATMULS = ("qkv", "o_proj", "gate_up", "down")  # once per layer; lm_head once per step


def cpu_flags() -> dict[str, bool]:
    """The /proc/cpuinfo flags that decide bf16 speed (all False where it is missing), and
    `native_bf16`: the rule `--dtype auto` follows (`pensieve.model.cpu_has_native_bf16`)."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:
        words = set()
    flags = {name: name in words for name in CPU_FLAGS}
    flags["native_bf16"] = cpu_has_native_bf16()
    return flags


def cpu_identity() -> dict[str, str]:
    """Which processor this is: /proc/cpuinfo's vendor, family, model and name, and the core
    LLVM compiles the Numba kernels for (e.g. znver4 or znver5). A guest's model name may say
    only "AMD EPYC"; family 25 is Zen 3/4 and 26 Zen 5, and the generation decides which
    kernel shapes win (bench/README.md), so the figures say which machine gave them."""
    fields = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "model name": "name"}
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                name = fields.get(key.strip())
                if name and name not in found:
                    found[name] = value.strip()
                if not line.strip() and found:  # the first processor's block is enough
                    break
    except OSError:
        pass
    try:
        import llvmlite.binding as llvm

        found["llvm_cpu"] = llvm.get_host_cpu_name()
    except (ImportError, RuntimeError):
        pass
    return found


def matmul_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each of the forward's matmuls."""
    h, hd = config.hidden_size, config.head_dim
    q = config.num_attention_heads * hd
    return {
        "qkv": (h, q + 2 * config.num_key_value_heads * hd),
        "o_proj": (q, h),
        "gate_up": (h, 2 * config.intermediate_size),
        "down": (config.intermediate_size, h),
        "lm_head": (h, config.vocab_size),
    }


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` calls after one warm-up: a limit is what the machine can reach."""
    fn()
    best = math.inf
    for _ in range(max(repeats, 1)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def linear_forms(x: torch.Tensor, w: torch.Tensor) -> list[Callable[[], torch.Tensor]]:
    """x @ w.T as torch computes it: `F.linear`, and on CPU also as the model's linear layer
    runs it there: from a weight prepacked for oneDNN, and through the engine's own kernel
    where it takes the weight (`few_rows_form`, at any row count); the fastest sets the
    limit."""
    forms = [lambda: F.linear(x, w)]
    if x.device.type == "cpu" and torch.backends.mkldnn.is_available() and onednn_packs(w.dtype):
        packed = reorder_for_onednn(w)
        forms.append(lambda: onednn_matmul(x, packed))
        few = few_rows_form(w, packed)
        if few is not None:
            forms.append(lambda: few.matmul(x))
    return forms


def gemm_throughput(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, m: int = 512, repeats: int = 5
) -> dict[str, float]:
    """FLOP/s of the fastest `linear_forms` at each matmul shape with `m` rows, plus
    "model": the forward's mix (each layer matmul once per layer, lm_head once)."""
    gen = torch.Generator().manual_seed(0)
    flops: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for name, (k, n) in matmul_shapes(config).items():
        x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
        w = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype)
        flops[name] = 2.0 * m * k * n
        seconds[name] = min(best_seconds(fn, device, repeats) for fn in linear_forms(x, w))
    out = {name: flops[name] / seconds[name] for name in flops}
    weight = {name: config.num_hidden_layers if name in LAYER_MATMULS else 1 for name in flops}
    total_flops = sum(weight[n] * flops[n] for n in flops)
    out["model"] = total_flops / sum(weight[n] * seconds[n] for n in flops)
    return out


def memory_bandwidth(device: torch.device, mib: int = 256, repeats: int = 5) -> dict[str, float]:
    """Bytes/s of summing a float32 tensor far larger than the caches (the read limit), and of
    copying it (bytes read plus bytes written). On CPU both are made as the step's weights and
    pool are (`huge_pages`: 2 MB pages where granted), so the limit is the best it reaches."""
    if device.type == "cpu":
        shape = (mib * 2**20 // 4,)
        src, dst = huge_page_tensor(shape, torch.float32), huge_page_tensor(shape, torch.float32)
        src.uniform_()
    else:
        src = torch.rand(mib * 2**20 // 4, device=device)  # rand writes every page first
        dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    read = nbytes / best_seconds(src.sum, device, repeats)
    copy = 2 * nbytes / best_seconds(lambda: dst.copy_(src), device, repeats)
    return {"read_bytes_per_s": read, "copy_bytes_per_s": copy}


def measure(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Both limits, in the JSON's shape."""
    gemm = gemm_throughput(config, dtype, device)
    return {
        "gemm_m": 512,
        "gemm_flops_per_s": gemm,
        "shapes": {name: list(shape) for name, shape in matmul_shapes(config).items()},
        **memory_bandwidth(device),
    }


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The higher figure of each limit over several measurements: a burst of other work on the
    cores during one of them must not lower the limit."""
    out = dict(runs[0])
    out["gemm_flops_per_s"] = {
        name: max(r["gemm_flops_per_s"][name] for r in runs) for name in out["gemm_flops_per_s"]
    }
    for key in ("read_bytes_per_s", "copy_bytes_per_s"):
        out[key] = max(r[key] for r in runs)
    return out
