"""Engine flags shared by every command (generate, serve, chat, bench)."""

from __future__ import annotations

import argparse

from pensieve.config import EngineConfig


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=None,
        help="HF model folder or GGUF file (default: SmolLM2-135M-Instruct)",
    )
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default=defaults.dtype)
    g.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:N or auto")
    g.add_argument("--block-size", type=int, choices=[16, 32], default=defaults.block_size)
    g.add_argument("--device-cache-tokens", type=int, default=defaults.device_cache_tokens)
    g.add_argument("--host-cache-tokens", type=int, default=defaults.host_cache_tokens)
    g.add_argument("--max-batch-tokens", type=int, default=defaults.max_batch_tokens)
    g.add_argument("--max-running", type=int, default=defaults.max_running)
    g.add_argument("--max-queue", type=int, default=defaults.max_queue)
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--stateless",
        action="store_const",
        dest="mode",
        const="stateless",
        help="forget every conversation after its reply (baseline)",
    )
    mode.add_argument(
        "--device-only",
        action="store_const",
        dest="mode",
        const="device-only",
        help="no host tier: drop instead of swapping (baseline)",
    )
    parser.set_defaults(mode="stateful")
    g.add_argument("--cache-dir", default=None, help="where GGUF files are converted")
    g.add_argument(
        "--no-profile-cost",
        dest="profile_cost",
        action="store_false",
        help="skip start-up profiling of Cost(l); use a linear stand-in",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        mode=args.mode,
        block_size=args.block_size,
        device_cache_tokens=args.device_cache_tokens,
        host_cache_tokens=args.host_cache_tokens,
        max_batch_tokens=args.max_batch_tokens,
        max_running=args.max_running,
        max_queue=args.max_queue,
        cache_dir=args.cache_dir,
        profile_cost=args.profile_cost,
    )
