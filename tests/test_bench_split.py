"""bench_split on a tiny bfloat16 model: every piece of a step the one-loop decoder takes is
timed, and a step it does not take is reported as such (no timing thresholds)."""

from __future__ import annotations

import asyncio
import math

import pytest

from pensieve.actors.executor import Executor
from pensieve.bench import bench_split
from pensieve.messages import StepPlan
from tests.test_cpu_decoder import _model, _pool, _rows


@pytest.fixture(scope="module")
def executor() -> Executor:
    model = _model(64)
    if bench_split.cpu_decoder._weights_of(model) is None:
        pytest.skip("the matmuls do not run on cpu_bf16_matmul here (no AVX512-BF16)")
    return Executor(model, _pool(model))


def _plan(sequences: list[tuple[int, int]], vocab: int) -> StepPlan:
    loop = asyncio.new_event_loop()  # only for the plan's reply future, never resolved
    try:
        return StepPlan(0, _rows(sequences, vocab), loop.create_future())
    finally:
        loop.close()


def test_every_piece_of_a_decode_step_is_timed(executor: Executor) -> None:
    plan = _plan([(1, 40), (1, 70)], executor.model.config.vocab_size)
    report = bench_split.split_case(executor, plan, rounds=2, calls=1)
    assert report is not None and not report["int8"]
    assert (report["rows"], report["layers"]) == (2, executor.model.config.num_hidden_layers)
    assert set(report["ms"]) == set(bench_split.COLUMNS)
    assert all(math.isfinite(v) and v > 0 for v in report["ms"].values())
    assert all(lo <= hi for lo, hi in report["spread_ms"].values())
    assert report["kv_bytes_per_layer"] == (41 + 71) * 2 * 64 * 2 * 2  # K and V, bfloat16
    assert report["attention_gb_per_s"] > 0
    table = bench_split.table({"cases": {"two decodes": report, "a prefill": None}})
    assert "| two decodes |" in table and "not the one-loop decoder" in table


def test_a_step_past_the_loop_is_not_split(executor: Executor) -> None:
    rows = bench_split.cpu_decoder.LOOP_ROWS + 1  # more rows than it takes
    plan = _plan([(rows, 0)], executor.model.config.vocab_size)
    assert bench_split.split_case(executor, plan, rounds=1, calls=1) is None
