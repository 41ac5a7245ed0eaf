"""gpu_check's code runs in CI: its --cpu-smoke mode runs every section at toy sizes on CPU, and
without a GPU (and without the flag) it says so and exits with its own status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pensieve.bench import gpu_check
from pensieve.bench.gpu_check_engine import COUNTERS


def test_without_a_gpu_it_says_so_and_checks_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == gpu_check.NO_GPU
    out = capsys.readouterr().out
    assert "no CUDA GPU is available" in out and "nothing was checked" in out


def test_cpu_smoke_runs_every_section(
    default_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setattr(gpu_check, "default_model_dir", lambda: default_model_dir)
    report = tmp_path / "gpu_check.json"
    status = gpu_check.main(["--cpu-smoke", "--json", str(report)])
    out = capsys.readouterr().out
    assert status == 0, out
    results = json.loads(report.read_text())
    assert results["ok"] and results["mode"] == "cpu-smoke" and results["peak_copy_gbps"] > 0
    (engine,) = results["engine"]  # the tiny model in bfloat16
    assert engine["ok"] and engine["turns"] > 0
    assert all(engine["counters"][c] > 0 for c in COUNTERS)
    kinds = {r["case"] for r in results["kernels"]}
    assert kinds == {"paper", "decode"} and all(r["ok"] for r in results["kernels"])
    assert results["swap"] and all(r["ok"] for r in results["swap"])
    assert results["overlap"][0]["both"] > 0
    for heading in ("1. set-up", "2. engine", "3. paged kernels", "4. swapper", "5. swap overlap"):
        assert heading in out
    assert "gpu_check passed" in out


def test_a_crashing_section_is_reported_and_the_others_still_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pensieve.bench import gpu_check_kernels

    def broken(*args: object) -> list:
        raise RuntimeError("injected kernel crash")

    monkeypatch.setattr(gpu_check_kernels, "kernels", broken)
    assert gpu_check.main(["--cpu-smoke", "--skip", "engine,overlap"]) == 1
    out = capsys.readouterr().out
    assert "injected kernel crash" in out and "every byte equal" in out
    assert "gpu_check FAILED" in out
