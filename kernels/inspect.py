"""What the GPU would run, read without a GPU: registers, stack, spills and shared memory.

Every kernel is compiled to PTX with `numba.cuda.compile_ptx` (needs the numba-cuda[cu13]
toolchain wheels) and assembled with `ptxas -v` for each architecture; the verbose report gives
registers per thread, stack frame bytes, spill stores and loads, and shared memory per block.
ptxas is looked for in $PENSIEVE_PTXAS, on PATH, under $CUDA_HOME and in the nvidia wheels; a
ptxas older than the PTX it is given (NVVM writes its own newest PTX version) is skipped, and
then the ptxas inside nvJitLink (the cu13 wheels' libnvJitLink, `-Xptxas=-v`) does the same
job. Shared memory comes from ptxas where it reports it, else from the PTX's static `.shared`
declarations. Run: python -m pensieve.kernels.inspect [--json] [--arch 80,90]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable

# (head dim, KV heads, group size): the default model (SmolLM2: 9 query / 3 KV heads, head dim
# 64) and a Llama-3-8B-like layout (32 / 8, head dim 128)
SHAPES = ((64, 3, 3), (128, 8, 4))
DTYPES = ("float16", "bfloat16")
ARCHS = (80, 90)
BLOCK_SIZE = 32  # the engine's default
MAX_REGISTERS = 128  # the decode kernel's budget (4 blocks of 128 threads per SM)
_INT_DIV = re.compile(r"^\s*(div|rem)\.(s|u)(32|64)\b", re.M)
_LOCAL = re.compile(r"^\s*(ld|st)\.local\b", re.M)
_SHARED = re.compile(r"^\s*\.(?:visible\s+)?\.?shared\s+\.align\s+\d+\s+\.b8\s+\w+\[(\d+)\]", re.M)


def ptxas_candidates() -> list[str]:
    """ptxas binaries, most specific first."""
    found = [os.environ.get("PENSIEVE_PTXAS", ""), shutil.which("ptxas") or ""]
    for root in filter(None, [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]):
        found.append(os.path.join(root, "bin", "ptxas"))
    for entry in sys.path:  # the nvidia-cuda-nvcc wheels: nvidia/cu13/bin/ptxas and the like
        pattern = os.path.join(entry, "nvidia", "**", "bin", "ptxas")
        found += sorted(glob.glob(pattern, recursive=True))
    found.append("/usr/local/cuda/bin/ptxas")
    out = []
    for path in found:
        if path and os.path.isfile(path) and os.access(path, os.X_OK) and path not in out:
            out.append(path)
    return out


def _nvjitlink_report(ptx: str, arch: int) -> str:
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(2, [f"-arch=sm_{arch}", "-Xptxas=-v"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
        return log.decode(errors="replace")
    finally:
        nvjitlink.destroy(handle)


def assemble(ptx: str, arch: int) -> tuple[str, str]:
    """(ptxas -v report, tool that made it); raises RuntimeError when no assembler works."""
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for ptxas in ptxas_candidates():
            cmd = [ptxas, "-v", f"-arch=sm_{arch}", src, "-o", os.path.join(tmp, "k.cubin")]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if run.returncode == 0:
                return run.stdout + run.stderr, ptxas
            errors.append(f"{ptxas}: {run.stderr.strip().splitlines()[-1:]}")
    try:
        return _nvjitlink_report(ptx, arch), "nvJitLink -Xptxas=-v"
    except Exception as exc:  # no cuda-bindings / libnvJitLink
        errors.append(f"nvJitLink: {type(exc).__name__}: {exc}")
    raise RuntimeError("no ptxas could assemble the PTX: " + "; ".join(errors))


def parse_report(report: str, ptx: str) -> dict:
    """The numbers of one kernel's `ptxas -v` report (one entry function per PTX)."""

    def num(pattern: str) -> int | None:
        m = re.search(pattern, report)
        return int(m.group(1)) if m else None

    smem = num(r"(\d+) bytes smem")
    return {
        "registers": num(r"Used (\d+) registers"),
        "stack_bytes": num(r"(\d+) bytes stack frame"),
        "spill_store_bytes": num(r"(\d+) bytes spill stores"),
        "spill_load_bytes": num(r"(\d+) bytes spill loads"),
        "smem_bytes": smem if smem is not None else sum(map(int, _SHARED.findall(ptx))),
        "local_ops_in_ptx": len(_LOCAL.findall(ptx)),
        "int_divisions_in_ptx": len(_INT_DIV.findall(ptx)),
    }


def targets(shapes: Iterable[tuple[int, int, int]] = SHAPES, dtypes: Iterable[str] = DTYPES):
    """(kernel, dtype, head dim, hkv, group, source, signature, options) of every kernel."""
    from .cuda_attention import DEFAULT_CONFIG, SIGNATURES, SOURCES, jit_options, kernel_specs

    for d, hkv, group in shapes:
        for fmt in dtypes:
            specs = kernel_specs(fmt, d, BLOCK_SIZE, hkv, group, DEFAULT_CONFIG)
            for name, (kind, *key) in specs.items():
                fn, options = SOURCES[kind](*key), jit_options(kind, tuple(key))
                yield name, fmt, d, hkv, group, fn, SIGNATURES[kind], options


def toolchain_missing() -> str | None:
    """Why compile_ptx cannot run here (no NVVM: numba-cuda[cu13] not installed), or None."""
    try:
        from numba import cuda

        cuda.compile_ptx(lambda a: None, "void(float32[:])", cc=(8, 0))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def inspect_kernels(
    archs: Iterable[int] = ARCHS,
    items: Iterable[tuple] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """One row per (kernel, dtype, head dim, arch); errors are reported in the row."""
    from numba import cuda

    rows = []
    for name, fmt, d, hkv, group, fn, sig, options in items if items is not None else targets():
        for arch in archs:
            shape = {"kernel": name, "dtype": fmt, "head_dim": d, "hkv": hkv, "group": group}
            row = {**shape, "arch": f"sm_{arch}", "compile_error": None, "assembler_error": None}
            try:
                ptx, _ = cuda.compile_ptx(fn, sig, cc=(arch // 10, arch % 10), **options)
            except Exception as exc:
                row["compile_error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                continue
            row["float64_in_ptx"] = ptx.count(".f64")
            try:
                report, row["tool"] = assemble(ptx, arch)
                row.update(parse_report(report, ptx))
            except RuntimeError as exc:
                row["assembler_error"] = str(exc)
            rows.append(row)
            if progress:
                progress(format_row(row))
    return rows


COLUMNS = (
    "kernel",
    "dtype",
    "head_dim",
    "arch",
    "registers",
    "stack_bytes",
    "spill_store_bytes",
    "spill_load_bytes",
    "smem_bytes",
    "local_ops_in_ptx",
    "int_divisions_in_ptx",
)


def format_row(row: dict) -> str:
    return "| " + " | ".join(str(row.get(c)) for c in COLUMNS) + " |"


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    return "\n".join([head, *map(format_row, rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--compact", action="store_true", help="JSON on one line")
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="e.g. 80,90")
    parser.add_argument("--dtype", default=",".join(DTYPES), help="float16,bfloat16,float32")
    args = parser.parse_args(argv)
    missing = toolchain_missing()
    if missing:
        print(json.dumps({"unavailable": missing}) if args.json else f"unavailable: {missing}")
        return 0
    archs = [int(a) for a in args.arch.split(",")]
    rows = inspect_kernels(archs, targets(dtypes=args.dtype.split(",")))
    if args.json:
        print(json.dumps(rows, indent=None if args.compact else 1))
    else:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
