"""Where a small CPU step's time goes, piece by piece, on the engine's real paged step.

    python -m pensieve.bench.bench_split [--cases 'decode-b*-c512'] [--quantize int8] [--json F]

For each of bench_step's cases that the one-loop decoder takes (`kernels.cpu_decoder`: bfloat16
steps of up to `pensieve.cpu_decoder.LOOP_ROWS` rows, int8 of one or two), the same step is
timed:
- the loop over every layer whole, then with its matmuls, its attention, or both swapped for
  kernels that do nothing (the rest: RMSNorm, RoPE, SiLU, residual adds, allocations);
- the attention kernel alone on the step's rows over every layer (keys and values from
  memory, as in the step) and over the first layer again and again (from cache): the first is
  what the step pays, the second what the kernel's arithmetic costs;
- the executor's whole `run_step`, and the logits of its sampled rows.
Variants alternate within each round, so a noisy minute slows them all; medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from numba import njit

from pensieve import cpu_decoder
from pensieve.actors.executor import Executor
from pensieve.bench.bench_step import Case, case_plans, case_pool, print_report, select_cases
from pensieve.cli_args import add_engine_arguments, engine_config_from_args, parse_args
from pensieve.config import EngineConfig
from pensieve.kernels import cpu_decoder as loop
from pensieve.kernels.cpu_threads import numba_threads_as_torch
from pensieve.messages import StepPlan
from pensieve.paged import PagedAttentionBackend, StepMetadata

DEFAULT_CASES = "decode-b1-c512,decode-b8-c512,decode-b24-c512"


@njit(nogil=True)
def _no_matmul(weights, i, x, out, threads):  # noqa: ARG001 (the loop's matmul signature)
    pass


@njit(nogil=True)
def _no_attention(q, width, kc, vc, tables, starts, pos, ctx, c, qtile, heads, skip, out):  # noqa: ARG001
    pass


def loop_arguments(executor: Executor, plan: StepPlan) -> tuple[tuple, bool] | None:
    """The arguments one `run_step` of `plan` passes to `kernels.cpu_decoder.decoder_layers`
    (and whether its weights are int8); None where the step does not take the loop."""
    seen: list[tuple[tuple, bool]] = []
    real = cpu_decoder.decoder_layers

    def record(*args: Any, int8: bool = False) -> None:
        seen.append((args, int8))
        real(*args, int8=int8)

    cpu_decoder.decoder_layers = record
    try:
        executor.run_step(plan)
    finally:
        cpu_decoder.decoder_layers = real
    return seen[0] if len(seen) == 1 else None  # a restoring step calls it a layer at a time


def _median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def split_case(
    executor: Executor, plan: StepPlan, rounds: int, calls: int
) -> dict[str, Any] | None:
    """Milliseconds of each piece of `plan`'s step (module docstring), medians over rounds."""
    captured = loop_arguments(executor, plan)
    if captured is None:
        return None
    args, int8 = captured
    x0, _, end, *rest = args
    shape, keys, values, attention = args[6], args[9], args[10], args[12]
    heads, kv_heads, d, _ = shape
    rope, attend = loop._ROPE[d], loop._BF16_KERNELS[d]
    matmul = loop._int8_matmul if int8 else loop._bf16_matmul
    width = (heads + 2 * kv_heads) * d
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(x0.shape[0], width, generator=gen) / 2).to(torch.bfloat16)
    q_bits = q.view(torch.uint16).numpy().reshape(-1)
    out = np.empty((x0.shape[0], heads, d), np.uint16)

    def layers(rope_: Callable, attend_: Callable, matmul_: Callable) -> Callable[[], None]:
        def run() -> None:
            loop._decoder_layers(rope_, attend_, matmul_, x0.copy(), 0, end, *rest)

        return run

    def attention_over(layer_ids: list[int]) -> Callable[[], None]:
        def run() -> None:
            for layer in layer_ids:
                attend(q_bits, width, keys[layer], values[layer], *attention, out)

        return run

    meta = StepMetadata.build(plan.rows, keys.shape[2], executor.model.device)
    ids = torch.tensor([t for r in plan.rows for t in r.tokens])
    backend = PagedAttentionBackend(executor.pool, meta, None)
    hidden = executor.model(ids, meta.positions.long(), backend)
    sampled = hidden[meta.sample_rows]
    pieces: dict[str, Callable[[], object]] = {
        "step": lambda: executor.run_step(plan),
        "logits": lambda: executor.model.logits(sampled),
        "layers": layers(rope, attend, matmul),
        "layers_no_matmul": layers(rope, attend, _no_matmul),
        "layers_no_attention": layers(rope, _no_attention, matmul),
        "layers_neither": layers(rope, _no_attention, _no_matmul),
        "attention_from_memory": attention_over(list(range(end))),
        "attention_from_cache": attention_over([0] * end),
    }
    samples: dict[str, list[float]] = {name: [] for name in pieces}
    with numba_threads_as_torch():
        for fn in pieces.values():
            fn()  # compiles the variants, warms the caches
        for _ in range(rounds):
            for name, fn in pieces.items():
                started = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[name].append((time.perf_counter() - started) / calls)
    ms = {name: _median_ms(s) for name, s in samples.items()}
    kv_bytes = sum(int(n) for n in attention[3]) * kv_heads * d * 2 * keys.itemsize  # K and V
    return {
        "int8": int8,
        "rows": int(x0.shape[0]),
        "layers": int(end),
        "ms": ms,
        "spread_ms": {name: [1e3 * min(s), 1e3 * max(s)] for name, s in samples.items()},
        "matmul_ms": ms["layers"] - ms["layers_no_matmul"],
        "attention_ms": ms["layers"] - ms["layers_no_attention"],
        "kv_bytes_per_layer": kv_bytes,
        "attention_gb_per_s": kv_bytes / (ms["attention_from_memory"] / end) / 1e6,
    }


def run(config: EngineConfig, cases: list[Case], rounds: int, calls: int) -> dict[str, Any]:
    """Load the model as the engine does and split every case the loop takes."""
    from pensieve.runtime import load_pretrained

    model = load_pretrained(config).model
    cfg = model.config
    executor = Executor(model, case_pool(model, config.block_size, cases))
    event_loop = asyncio.new_event_loop()  # only for the plan's reply future
    results = {}
    try:
        for case, _, plan in case_plans(cases, executor.pool, cfg.vocab_size, event_loop):
            results[case.name] = split_case(executor, plan, rounds, calls)
            taken = "split" if results[case.name] else "not the one-loop decoder"
            print(f"{case.name}: {taken}", file=sys.stderr)
    finally:
        event_loop.close()
    return {"model": cfg.name, "dtype": str(model.dtype).removeprefix("torch."),
            "quantize": config.quantize, "threads": torch.get_num_threads(),
            "rounds": rounds, "calls": calls, "cases": results}  # fmt: skip


COLUMNS = ("step", "logits", "layers", "layers_no_matmul", "layers_no_attention", "layers_neither",
           "attention_from_memory", "attention_from_cache")  # fmt: skip


def table(report: dict[str, Any]) -> str:
    """One line a case: each piece's median ms, attention per layer and its read rate."""
    head = ["case", *COLUMNS, "attn/layer mem us", "cache us", "KV GB/s"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name, r in report["cases"].items():
        if r is None:
            lines.append(f"{name} | (not the one-loop decoder)")
            continue
        per = [r["ms"]["attention_from_memory"], r["ms"]["attention_from_cache"]]
        cells = [f"{r['ms'][c]:.2f}" for c in COLUMNS]
        cells += [f"{1e3 * v / r['layers']:.1f}" for v in per] + [f"{r['attention_gb_per_s']:.1f}"]
        lines.append(" | ".join([name, *cells]))
    return "\n".join(f"| {line} |" for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pensieve.bench.bench_split",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--cases", default=DEFAULT_CASES, help="bench_step's case globs")
    parser.add_argument("--rounds", type=int, default=7, help="rounds over every piece")
    parser.add_argument("--calls", type=int, default=10, help="calls of a piece a round")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every number here")
    add_engine_arguments(parser)
    args = parse_args(parser, argv)
    try:
        cases = select_cases(args.cases)
    except ValueError as exc:
        parser.error(str(exc))
    if args.rounds < 1 or args.calls < 1:
        parser.error("--rounds and --calls must be >= 1")
    report = run(engine_config_from_args(args), cases, args.rounds, args.calls)
    print_report(table(report), report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
