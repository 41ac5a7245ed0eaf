"""`pensieve` command line: generate, serve, chat, bench."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from importlib import import_module

from pensieve.cli_args import add_engine_arguments, engine_config_from_args, parse_args
from pensieve.errors import PensieveError

# command -> (module, help); each module has add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "serve": ("pensieve.server.serve_cli", "run the OpenAI-compatible streaming server"),
    "chat": ("pensieve.chat_cli", "chat in the terminal with a cached conversation"),
    "bench": (
        "pensieve.bench.sweep",
        "replay conversation traces and compare systems "
        "(`pensieve bench step`: time one forward step against this machine's limits)",
    ),
    "cluster": ("pensieve.cluster", "run N serve workers behind sglang-router or vllm-router"),
}


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="one user message, rendered with the chat template")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--system", default=None, help="a system message before the prompt")
    parser.add_argument("--timing", action="store_true", help="print load and speed figures")
    add_engine_arguments(parser)


def run_generate(args: argparse.Namespace) -> int:
    """Stateless one-shot generation through the reference path (the oracle)."""
    from pensieve.reference import generate_tokens
    from pensieve.runtime import load_pretrained
    from pensieve.sampling import SamplingParams
    from pensieve.tokenizer import IncrementalDecoder

    sampling = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
    ).validate()
    loaded = load_pretrained(engine_config_from_args(args))
    messages = [{"role": "user", "content": args.prompt}]
    if args.system is not None:
        messages.insert(0, {"role": "system", "content": args.system})
    prompt = loaded.tokenizer.encode_chat(messages)
    decoder = IncrementalDecoder(loaded.tokenizer)
    eos = loaded.tokenizer.eos_token_ids
    started = time.perf_counter()
    first = None
    count = 0
    for token in generate_tokens(loaded.model, prompt, sampling, eos):
        first = first or time.perf_counter()
        count += 1
        if token not in eos:
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    if args.timing and first is not None:
        end = time.perf_counter()
        decode = (end - first) / max(count - 1, 1) * 1000
        print(
            f"[{loaded.model.dtype}, load {loaded.load_seconds:.1f} s, prompt {len(prompt)} tokens "
            f"in {first - started:.3f} s, decode {decode:.1f} ms/token over {count} tokens]",
            file=sys.stderr,
        )
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = argparse.ArgumentParser(prog="pensieve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    runners: dict[str, Callable] = {"generate": run_generate}
    add_generate_arguments(sub.add_parser("generate", help="answer one prompt and exit"))
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        runners[name] = module.run
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "step"]:  # the step benchmark; any other `bench` is the sweep
        from pensieve.bench import bench_step

        return bench_step.main(argv[2:], prog="pensieve bench step")
    parser, runners = build_parser()
    if argv[:1] == ["cluster"]:  # the flags cluster does not know are its workers' serve flags
        args, args.passthrough_args = parser.parse_known_args(argv)
    else:
        args = parse_args(parser, argv, command=True)
    try:
        result = runners[args.command](args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except PensieveError as exc:
        print(f"pensieve: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
