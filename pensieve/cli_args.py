"""Engine flags shared by every command (generate, serve, chat, bench), defined once from
`EngineConfig`: every field gets `--field-name` (help from the field's comment), its default
from `$PENSIEVE_FIELD_NAME` when set, and `--config FILE` reads a YAML mapping of option values.
So no option exists in the config that the command line cannot set.

Precedence, lowest first: the field's default, the environment variable, the --config file,
the flags on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pensieve.config import EngineConfig

ENV_PREFIX = "PENSIEVE_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
# Flags that keep a narrower shape than their field's type allows.
_CHOICES: dict[str, list[Any]] = {"block_size": [16, 32]}
_HELP_OVERRIDES = {
    "model": "HF model folder or GGUF file (default: SmolLM2-135M-Instruct)",
    "device": "cpu, cuda, cuda:N or auto",
    "dtype": "weights and KV cache dtype (auto: bfloat16 where the device has it natively)",
    "mode": "stateful (keep conversations), or a baseline: stateless, device-only",
}


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _field_comments() -> dict[str, str]:
    """`name: type = default  # comment` lines of EngineConfig: the flags' help."""
    source = inspect.getsource(EngineConfig)
    found = re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.MULTILINE)
    return {name: text.strip() for name, text in found}


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type inside Optional, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in _TRUE | _FALSE:
        raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")
    return value in _TRUE


def _env_default(
    parser: argparse.ArgumentParser,
    name: str,
    default: Any,
    convert: Any,
    choices: list[Any] | None = None,
) -> Any:
    """The flag's default: $PENSIEVE_<NAME> converted and checked like a flag's value."""
    raw = os.environ.get(env_name(name))
    if raw is None:
        return default
    try:
        value = convert(raw)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"${env_name(name)}={raw!r}: {exc}")
    if choices is not None and value not in choices:
        parser.error(f"${env_name(name)}={raw!r}: choose from {', '.join(map(str, choices))}")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field (plus --stateless/--device-only and --config)."""
    g = parser.add_argument_group("engine", "each flag's default comes from $PENSIEVE_<NAME>")
    comments = _field_comments()
    hints = typing.get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        name, flag = field.name, "--" + field.name.replace("_", "-")
        default = field.default
        hint, optional = _unwrap(hints[name])
        help_text = _HELP_OVERRIDES.get(name) or comments.get(name, name.replace("_", " "))
        help_text += f" [${env_name(name)}]"
        if hint is bool:
            action = argparse.BooleanOptionalAction
            value = _env_default(parser, name, default, _bool)
            g.add_argument(flag, action=action, default=value, help=help_text)
            continue
        kwargs: dict[str, Any] = {}
        if typing.get_origin(hint) is Literal:
            kwargs["choices"] = list(typing.get_args(hint))
            convert: Any = str
        elif hint in (int, float, str):
            convert = hint
        else:
            raise TypeError(f"EngineConfig.{name}: no flag type for {hint!r}")
        if name in _CHOICES:
            kwargs["choices"] = _CHOICES[name]
        value = _env_default(parser, name, default, convert, kwargs.get("choices"))
        if name == "mode":
            mode = g.add_mutually_exclusive_group()
            mode.add_argument(flag, type=convert, default=value, help=help_text, **kwargs)
            mode.add_argument(
                "--stateless",
                action="store_const",
                dest="mode",
                const="stateless",
                help="forget every conversation after its reply (baseline); = --mode stateless",
            )
            mode.add_argument(
                "--device-only",
                action="store_const",
                dest="mode",
                const="device-only",
                help="no host tier: drop instead of swapping (baseline); = --mode device-only",
            )
            continue
        g.add_argument(flag, type=convert, default=value, help=help_text, **kwargs)
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="YAML mapping of option values (keys: flag names, - or _), "
        "overridden by flags on the command line",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})


def config_file_flags(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """A YAML mapping as command-line tokens: `key: value` -> `--key value`; lists repeat the
    flag; true/false -> `--key` / `--no-key`; null leaves the default."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"cannot read --config {path}: {exc}")
    if data is None:
        return []
    if not isinstance(data, dict):
        parser.error(f"--config {path} must be a mapping of option names to values")
    tokens: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if flag == "--config":
            parser.error(f"--config {path}: a config file cannot name another")
        for item in value if isinstance(value, list) else [value]:
            if item is True:
                tokens.append(flag)
            elif item is False:
                tokens.append("--no-" + flag[2:])
            elif item is not None:
                tokens += [flag, str(item)]
    return tokens


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, command: bool = False
) -> argparse.Namespace:
    """Parse, applying a --config file's values beneath the command line's own flags.

    With `command`, argv starts with a subcommand and the file's flags go right after it.
    """
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    if path is None:
        return args
    at = 1 if command else 0
    return parser.parse_args(argv[:at] + config_file_flags(parser, path) + argv[at:])
