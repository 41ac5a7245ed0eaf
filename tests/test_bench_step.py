"""bench_step on the tests' tiny random model: it runs through both entry points and its JSON
holds every field with positive finite numbers (no timing thresholds: machines differ)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pensieve import cli
from pensieve.bench import bench_step
from pensieve.runtime import LoadedModel

SMALL = "decode-b1-c512,decode-b8-c2048,mixed-*,prefill-512"


@pytest.fixture(scope="module")
def tiny_dir(tiny: LoadedModel, default_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny random model as an HF folder (Hugging Face names, q/k/v and gate/up unfused),
    with the default model's tokenizer files, so `--model` loads it like any checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-model")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(default_model_dir / name, folder / name)
    c = tiny.model.config
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    state = {}
    for name, tensor in tiny.model.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            prefix = name.removesuffix("qkv_proj.weight")
            for part, t in zip("qkv", tensor.split([q, kv, kv]), strict=True):
                state[f"{prefix}{part}_proj.weight"] = t.contiguous()
        elif name.endswith("gate_up_proj.weight"):
            prefix = name.removesuffix("gate_up_proj.weight")
            gate, up = tensor.split(c.intermediate_size)
            state[f"{prefix}gate_proj.weight"] = gate.contiguous()
            state[f"{prefix}up_proj.weight"] = up.contiguous()
        else:
            state[name] = tensor.contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def check_report(report: dict, cases: int) -> None:
    assert report["dtype"] == "float32" and report["model"]
    assert report["deterministic"] in (True, False, None)
    assert "tiled_matmuls" in report and "quantize" in report
    assert report["torch"] == torch.__version__ and report["threads"] >= 1
    flags = report["cpu_flags"]
    assert set(flags) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "native_bf16"}
    assert all(isinstance(v, bool) for v in flags.values())
    cpu = report["cpu"]  # which processor gave the figures (/proc/cpuinfo, LLVM's name)
    assert cpu.get("llvm_cpu")
    if os.path.exists("/proc/cpuinfo"):
        assert cpu["vendor"] and cpu["family"].isdigit() and cpu["model"].isdigit()
    limits = report["limits"]
    shapes = {"qkv", "o_proj", "gate_up", "down", "lm_head"}
    assert set(limits["shapes"]) == shapes
    assert set(limits["gemm_flops_per_s"]) == shapes | {"model"}
    numbers = [*limits["gemm_flops_per_s"].values(), limits["read_bytes_per_s"]]
    assert len(report["limit_runs"]) == 2  # before and after the cases; the higher counts
    assert all(limits["read_bytes_per_s"] >= r["read_bytes_per_s"] for r in report["limit_runs"])
    assert len(report["cases"]) == cases
    for row in report["cases"]:
        assert row["repeats"] == 1 and row["bound_kind"] in ("memory", "compute")
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        numbers += [row[k] for k in ("median_ms", "bytes", "flops", "bound_ms", "ratio")]
    assert all(math.isfinite(x) and x > 0 for x in numbers)
    assert len(report["load_average"]) == 2


def test_bench_step_json(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run.json"
    argv = ["--model", str(tiny_dir), "--dtype", "float32", "--device", "cpu"]
    argv += ["--cases", SMALL, "--repeats", "1", "--json", str(out)]
    assert bench_step.main(argv) == 0
    report = json.loads(out.read_text())
    check_report(report, cases=4)
    names = [r["case"] for r in report["cases"]]
    assert names == ["decode-b1-c512", "decode-b8-c2048", "mixed-b24-c512+256", "prefill-512"]
    mixed = report["cases"][2]
    assert (mixed["rows"], mixed["tokens"], mixed["context_tokens"]) == (25, 280, 24 * 513 + 768)
    assert "prefill-512" in capsys.readouterr().out

    # the same run through `pensieve bench step` (deterministic where this version has it),
    # then --compare of the two files
    again = tmp_path / "again.json"
    argv = [a if a != str(out) else str(again) for a in argv]
    argv[argv.index("--cases") + 1] = "prefill-*"
    deterministic = bench_step.HAS_DETERMINISTIC or None
    assert cli.main(["bench", "step", *argv] + ["--deterministic"] * bool(deterministic)) == 0
    report = json.loads(again.read_text())
    check_report(report, cases=1)
    assert report["deterministic"] is deterministic
    capsys.readouterr()
    assert cli.main(["bench", "step", "--compare", str(out), str(again)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[-1].startswith("prefill-512")  # only the shared case


def test_bench_without_step_is_still_the_sweep() -> None:
    parser, _ = cli.build_parser()
    args = cli.parse_args(parser, ["bench", "--rates", "0.5,1", "--systems", "stateful"], True)
    assert args.command == "bench" and args.rates == [0.5, 1.0] and args.systems == ["stateful"]


def test_unknown_case_is_an_error() -> None:
    with pytest.raises(SystemExit):
        bench_step.main(["--cases", "nothing-like-this"])
