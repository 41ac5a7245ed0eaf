"""How far is one forward step from this machine's limits? Times the engine's real paged step
(the executor's `run_step`: `StepMetadata.build`, the model over `PagedAttentionBackend`, logits
of the sampled rows, one batched greedy argmax) and measures, in the same run, GEMM throughput at
the model's matmul shapes and memory read bandwidth (`bench/limits.py`; before and after the
cases, the higher figure counting).

    python -m pensieve.bench.bench_step [--cases 'decode-*'] [--repeats N] [--json out.json]
    pensieve bench step [same flags]
    python -m pensieve.bench.bench_step --compare before.json after.json

Cases: decode batches of 1, 8, 24 and 64 rows at contexts 512 and 2048 (each row one new token
after `context` cached tokens), a mixed step (24 such decodes at 512 plus one 256-token chunk that
completes a prompt after 512 cached tokens) and a 512-token prefill from scratch. The cached KV
is random values written into the pool before timing (an untouched zeroed pool would read the
shared zero page), in blocks shuffled over the pool as a long-running engine leaves them.

Each case's bound is max(bytes / read bandwidth, matmul FLOPs / GEMM FLOP/s at that shape +
attention FLOPs / the model's GEMM FLOP/s). Bytes are every weight the step reads (a tied
embedding counts once, as lm_head) plus the K and V of every row's context in every layer;
activations are left out. The ratio is measured median / bound: 1.0 is the machine's limit.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fnmatch
import inspect
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pensieve.actors.executor import Executor
from pensieve.bench import limits
from pensieve.block_allocator import KVPool
from pensieve.cli_args import add_engine_arguments, engine_config_from_args, parse_args
from pensieve.config import EngineConfig
from pensieve.messages import SequenceRows, StepPlan
from pensieve.model import LlamaForCausalLM
from pensieve.sampling import SamplingParams

HAS_DETERMINISTIC = "deterministic" in {f.name for f in dataclasses.fields(EngineConfig)}
GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class Case:
    """One step: `decodes` rows of one token after `context` cached tokens, plus optionally one
    prefill chunk of `prefill` tokens after `prefill_after` cached tokens."""

    name: str
    decodes: int
    context: int = 0
    prefill: int = 0
    prefill_after: int = 0

    def sequences(self) -> list[tuple[int, int]]:
        """(new tokens, cached tokens before them) per row."""
        rows = [(1, self.context)] * self.decodes
        return rows + ([(self.prefill, self.prefill_after)] if self.prefill else [])

    def blocks(self, block_size: int) -> int:
        return sum(-(-(n + past) // block_size) for n, past in self.sequences())


CASES = [Case(f"decode-b{b}-c{c}", b, c) for c in (512, 2048) for b in (1, 8, 24, 64)] + [
    Case("mixed-b24-c512+256", 24, 512, prefill=256, prefill_after=512),
    Case("prefill-512", 0, prefill=512),
]


def select_cases(patterns: str | None) -> list[Case]:
    """Cases whose name matches any comma-separated glob (all when None)."""
    if not patterns:
        return list(CASES)
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [c for c in CASES if any(fnmatch.fnmatch(c.name, g) for g in globs)]
    if not chosen:
        raise ValueError(f"no case matches {patterns!r}; cases: {', '.join(c.name for c in CASES)}")
    return chosen


def fill_random(pool: KVPool, seed: int = 0) -> None:
    """Write random values over the whole pool, tiling one random piece (randn of gigabytes is
    slow), so every cached token the steps read is a real, distinct page of memory."""
    gen = torch.Generator().manual_seed(seed)
    piece = torch.randn(1 << 20, generator=gen).to(device=pool.keys.device, dtype=pool.keys.dtype)
    for cache in (pool.keys, pool.values):
        flat = cache.view(-1)
        for start in range(0, flat.numel(), piece.numel()):
            n = min(piece.numel(), flat.numel() - start)
            flat[start : start + n].copy_(piece[:n])


def build_rows(
    case: Case, block_size: int, free: list[int], vocab: int, gen: torch.Generator
) -> list[SequenceRows]:
    """The case's rows as the scheduler sends them, on blocks taken from `free` in its order."""
    rows = []
    for i, (n, past) in enumerate(case.sequences()):
        ctx = past + n
        table = [free.pop() for _ in range(-(-ctx // block_size))]
        tokens = torch.randint(vocab, (n,), generator=gen).tolist()
        rows.append(SequenceRows(i, tokens, list(range(past, ctx)), table, ctx, True, GREEDY))
    return rows


def case_pool(model: LlamaForCausalLM, block_size: int, cases: list[Case]) -> KVPool:
    """A pool with blocks for the largest case, every block random (`fill_random`)."""
    cfg = model.config
    blocks = max(c.blocks(block_size) for c in cases)
    pool = KVPool.empty(cfg.num_hidden_layers, blocks, block_size, cfg.num_key_value_heads,
                        cfg.head_dim, model.dtype, model.device)  # fmt: skip
    fill_random(pool)
    return pool


def case_plans(
    cases: list[Case], pool: KVPool, vocab: int, loop: asyncio.AbstractEventLoop
) -> Iterator[tuple[Case, list[SequenceRows], StepPlan]]:
    """Each case's rows and step plan, on blocks shuffled over the pool (seeded: every run
    and every bench that takes these plans gets the same ones)."""
    gen = torch.Generator().manual_seed(0)
    for i, case in enumerate(cases):
        free = torch.randperm(pool.num_blocks, generator=gen).tolist()
        rows = build_rows(case, pool.keys.shape[2], free, vocab, gen)
        yield case, rows, StepPlan(i, rows, loop.create_future())


def weight_bytes(model: LlamaForCausalLM) -> int:
    """Bytes of the weights one step reads: each matmul's weight in the form it runs (int8
    rows and scales where quantized), the norms; an embedding table has only T rows gathered,
    so it is left out (a tied one is counted once, as lm_head)."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        if isinstance(module, nn.Linear) and getattr(module, "qweight", None) is not None:
            parts = [module.qweight, module.qscale]
        else:
            parts = list(module.parameters(recurse=False))
        total += sum(t.numel() * t.element_size() for t in parts if t is not None)
    return total


def bound(
    rows: list[SequenceRows], model: LlamaForCausalLM, machine: dict[str, Any]
) -> dict[str, float]:
    """Bytes, FLOPs and the time limit they set on this machine for one step of `rows`."""
    cfg = model.config
    layers, tokens = cfg.num_hidden_layers, sum(len(r.tokens) for r in rows)
    kv_per_token = layers * 2 * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
    nbytes = weight_bytes(model) + kv_per_token * sum(r.context_len for r in rows)
    gemm = machine["gemm_flops_per_s"]
    shapes = limits.matmul_shapes(cfg)
    mm_seconds, mm_flops = 0.0, 0.0
    for name, (k, n) in shapes.items():
        count = sum(r.sample for r in rows) if name == "lm_head" else tokens * layers
        mm_flops += 2.0 * count * k * n
        mm_seconds += 2.0 * count * k * n / gemm[name]
    keys = sum(p + 1 for r in rows for p in r.positions)  # causal: query at p reads p + 1 keys
    attn_flops = 4.0 * cfg.num_attention_heads * cfg.head_dim * layers * keys
    memory_ms = 1e3 * nbytes / machine["read_bytes_per_s"]
    compute_ms = 1e3 * (mm_seconds + attn_flops / gemm["model"])
    return {
        "bytes": float(nbytes),
        "flops": mm_flops + attn_flops,
        "memory_bound_ms": memory_ms,
        "compute_bound_ms": compute_ms,
        "bound_ms": max(memory_ms, compute_ms),
        "bound_kind": "memory" if memory_ms >= compute_ms else "compute",
    }


def kernel_cache() -> bool | None:
    """Whether the CPU attention kernel comes from Numba's on-disk cache (None: this version
    does not say)."""
    from pensieve.kernels import cpu_attention

    options = getattr(cpu_attention, "_KERNEL", None)
    return None if options is None else bool(options["cache"])


def deterministic_setup(
    model: LlamaForCausalLM, config: EngineConfig
) -> tuple[dict[str, bool], int | None]:
    """Do with `config.deterministic` what the engine does, where this version has it: pick
    each matmul's batch-invariant form. Returns the executor's keywords and how many matmuls
    run in tiles (None: no such choice in this version)."""
    if not HAS_DETERMINISTIC:
        return {}, None
    enabled = bool(getattr(config, "deterministic", False))
    tiled = None
    try:
        from pensieve.batch_invariant import make_batch_invariant
    except ImportError:
        pass
    else:
        tiled = sum(how == "tiles" for how in make_batch_invariant(model, enabled).values())
    takes_it = "deterministic" in inspect.signature(Executor).parameters
    return ({"deterministic": enabled} if takes_it else {}), tiled


def time_case(
    executor: Executor, plan: StepPlan, device: torch.device, repeats: int | None, seconds: float
) -> list[float]:
    """Step times in seconds: two warm-up steps (JIT, allocator), then `repeats` steps, or as
    many as fill `seconds` (at least 5)."""
    executor.run_step(plan)
    started = time.perf_counter()
    executor.run_step(plan)
    once = time.perf_counter() - started
    count = repeats if repeats is not None else min(1000, max(5, math.ceil(seconds / once)))
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        executor.run_step(plan)  # synchronizes a CUDA device itself
        samples.append(time.perf_counter() - started)
    return samples


def spread(samples: list[float]) -> dict[str, float]:
    """Median and 10th/90th percentiles in ms (all the one value when there is one sample)."""
    ms = [1e3 * s for s in samples]
    if len(ms) < 2:
        return {"median_ms": ms[0], "p10_ms": ms[0], "p90_ms": ms[0]}
    deciles = statistics.quantiles(ms, n=10, method="inclusive")
    return {"median_ms": statistics.median(ms), "p10_ms": deciles[0], "p90_ms": deciles[-1]}


def run_bench(config: EngineConfig, cases: list[Case], repeats: int | None, seconds: float) -> dict:
    """Load the model as the engine does, measure the limits before and after timing every
    case (the higher figure counts), bound every case: the JSON."""
    from pensieve.runtime import load_pretrained

    model = load_pretrained(config).model
    cfg, device = model.config, model.device
    flags = limits.cpu_flags()
    load_before = os.getloadavg()[0]  # other processes on the cores skew every number
    print(f"{cfg.name} {model.dtype} on {device}, {torch.get_num_threads()} threads, "
          f"load average {load_before:.2f}: measuring limits", file=sys.stderr)  # fmt: skip
    machine = limits.measure(cfg, model.dtype, device)
    pool = case_pool(model, config.block_size, cases)
    executor_args, tiled = deterministic_setup(model, config)
    executor = Executor(model, pool, **executor_args)
    loop = asyncio.new_event_loop()  # only for the plan's reply future, never resolved here
    timed: list[tuple[Case, list[SequenceRows], list[float]]] = []
    try:
        for case, rows, plan in case_plans(cases, pool, cfg.vocab_size, loop):
            timed.append((case, rows, time_case(executor, plan, device, repeats, seconds)))
            print(f"{case.name}: {spread(timed[-1][2])['median_ms']:.2f} ms", file=sys.stderr)
    finally:  # the executor's thread is the process's compute thread: it stays
        loop.close()
    runs = [machine, limits.measure(cfg, model.dtype, device)]  # before and after the cases
    machine = limits.best(runs)
    results = []
    for case, rows, samples in timed:
        stats, limit = spread(samples), bound(rows, model, machine)
        tokens = sum(len(r.tokens) for r in rows)
        results.append(
            {
                "case": case.name,
                "rows": len(rows),
                "tokens": tokens,
                "context_tokens": sum(r.context_len for r in rows),
                "repeats": len(samples),
                **stats,
                "tokens_per_s": 1e3 * tokens / stats["median_ms"],
                **limit,
                "ratio": stats["median_ms"] / limit["bound_ms"],
            }
        )
    return {
        "model": cfg.name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "dtype_flag": config.dtype,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": limits.cpu_identity(),
        "cpu_flags": flags,
        "load_average": [load_before, os.getloadavg()[0]],  # 1-minute, before and after
        "deterministic": getattr(config, "deterministic", None),
        "quantize": getattr(config, "quantize", None),
        # the CPU attention kernel loaded from Numba's on-disk cache runs slower (bench/README.md)
        "kernel_cache": kernel_cache(),
        "tiled_matmuls": tiled,  # batch-invariant matmuls run in fixed tiles
        "block_size": config.block_size,
        "weight_bytes": weight_bytes(model),
        "limits": machine,  # the higher of each figure over `limit_runs`
        "limit_runs": runs,
        "cases": results,
    }


HEADER = (
    "case                  rows tokens   median    p10    p90 (ms)    MB read  GFLOP"
    "   bound ms        ratio"
)


def table_row(r: dict[str, Any]) -> str:
    return (
        f"{r['case']:<21} {r['rows']:>4} {r['tokens']:>6} {r['median_ms']:>8.2f} "
        f"{r['p10_ms']:>6.2f} {r['p90_ms']:>6.2f}      {r['bytes'] / 1e6:>9.1f} "
        f"{r['flops'] / 1e9:>6.2f} {r['bound_ms']:>8.2f} {r['bound_kind']:<7} {r['ratio']:>5.2f}"
    )


def table(report: dict[str, Any]) -> str:
    """The run as plain text: what ran, the limits, one line per case."""
    lim = report["limits"]
    gemm = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in lim["gemm_flops_per_s"].items())
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in report["cpu_flags"].items())
    cpu = report.get("cpu", {})  # runs saved before it was recorded have none
    which = (
        f"{cpu.get('vendor', '?')} family {cpu.get('family', '?')} model {cpu.get('model', '?')} "
        f"({cpu.get('name', '?')}), LLVM {cpu.get('llvm_cpu', '?')}"
    )
    lines = [
        f"{report['model']} {report['dtype']} on {report['device']}, torch {report['torch']}, "
        f"{report['threads']} threads, deterministic {report['deterministic']} "
        f"({report['tiled_matmuls']} matmuls tiled), quantize {report['quantize']}, "
        f"load average {report['load_average'][0]:.2f} -> {report['load_average'][1]:.2f}",
        f"cpu: {which}; {flags}; attention kernel from Numba's cache: {report.get('kernel_cache')}",
        f"GEMM GFLOP/s at M={lim['gemm_m']}: {gemm}",
        f"memory: read {lim['read_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"copy {lim['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write)",
        HEADER,
    ]
    return "\n".join(lines + [table_row(r) for r in report["cases"]])


def compare(path_a: str, path_b: str) -> str:
    """Per case of two saved runs: both medians and B / A (below 1: B is faster)."""
    a, b = (json.loads(open(p).read()) for p in (path_a, path_b))
    by_name = {r["case"]: r for r in b["cases"]}
    lines = [
        f"A: {path_a} ({a['dtype']}, deterministic {a.get('deterministic')})",
        f"B: {path_b} ({b['dtype']}, deterministic {b.get('deterministic')})",
        "case                  A median ms  B median ms    B/A  A ratio  B ratio",
    ]
    for ra in a["cases"]:
        rb = by_name.get(ra["case"])
        if rb is None:
            continue
        lines.append(
            f"{ra['case']:<21} {ra['median_ms']:>11.2f} {rb['median_ms']:>12.2f} "
            f"{rb['median_ms'] / ra['median_ms']:>6.2f} {ra['ratio']:>8.2f} {rb['ratio']:>8.2f}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Step flags plus the engine's (--model, --dtype, --device, --block-size, ...)."""
    names = ", ".join(c.name for c in CASES)
    g = parser.add_argument_group("step")
    g.add_argument("--cases", default=None, help=f"comma-separated globs over: {names}")
    g.add_argument("--repeats", type=int, default=None, help="timed steps per case")
    g.add_argument("--seconds", type=float, default=2.0, help="time per case without --repeats")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    g.add_argument("--json", default=None, metavar="PATH", help="write every number here")
    g.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="print the per-case ratio of two saved runs and exit")  # fmt: skip
    add_engine_arguments(parser)
    if not HAS_DETERMINISTIC:  # so scripts that pass it fail with a reason, not "unrecognized"
        g.add_argument("--deterministic", action="store_true", help="(EngineConfig lacks it)")


def main(argv: list[str] | None = None, prog: str = "python -m pensieve.bench.bench_step") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parse_args(parser, argv)
    if args.compare:
        print(compare(*args.compare))
        return 0
    if not HAS_DETERMINISTIC and args.deterministic:
        parser.error("--deterministic: this version's EngineConfig has no such field")
    try:
        cases = select_cases(args.cases)
    except ValueError as exc:
        parser.error(str(exc))
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_bench(engine_config_from_args(args), cases, args.repeats, args.seconds)
    print_report(table(report), report, args.json)
    return 0


def print_report(text: str, report: dict[str, Any], path: str | None) -> None:
    """The table on stdout, and every number as JSON at `path` where one is given."""
    print(text)
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
