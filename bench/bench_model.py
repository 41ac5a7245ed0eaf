"""Load time, prefill tokens/s and decode ms/step of a model on this machine, per dtype.

python -m pensieve.bench.bench_model [--model PATH] [--dtypes bfloat16,float32]
"""

from __future__ import annotations

import argparse
import time

import torch

from pensieve.attention import ContiguousKV
from pensieve.config import EngineConfig
from pensieve.runtime import load_pretrained


def measure(
    model_path: str | None, dtype: str, prompt_tokens: int, decode_steps: int, repeats: int
) -> dict[str, float]:
    loaded = load_pretrained(EngineConfig(model=model_path, dtype=dtype, device="cpu"))
    model = loaded.model
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (prompt_tokens,))
    prefill, decode = float("inf"), float("inf")
    for _ in range(repeats):
        kv = ContiguousKV(layers)
        started = time.perf_counter()
        model.logits(model(ids, torch.arange(prompt_tokens), kv)[-1:])
        prefill = min(prefill, time.perf_counter() - started)
        token = torch.tensor([1])
        started = time.perf_counter()
        for step in range(decode_steps):
            pos = torch.tensor([prompt_tokens + step])
            token = model.logits(model(token, pos, kv)).argmax(-1)
        decode = min(decode, (time.perf_counter() - started) / decode_steps)
    return {
        "load_s": loaded.load_seconds,
        "prefill_tok_s": prompt_tokens / prefill,
        "decode_ms": decode * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print("| dtype | load s | prefill tok/s | decode ms/step |")
    print("|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        r = measure(args.model, dtype, args.prompt_tokens, args.decode_steps, args.repeats)
        print(f"| {dtype} | {r['load_s']:.1f} | {r['prefill_tok_s']:.0f} | {r['decode_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
