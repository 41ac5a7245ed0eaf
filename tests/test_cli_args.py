"""Engine flags are generated from EngineConfig (so none is missing), with environment
defaults and a --config YAML file beneath the command line; serve's own options too."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path

import pytest

from pensieve.cli import build_parser
from pensieve.cli_args import add_engine_arguments, engine_config_from_args, env_name, parse_args
from pensieve.config import EngineConfig
from pensieve.server.serve_cli import add_arguments as add_serve_arguments
from pensieve.server.serve_cli import server_options


def engine_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return parser


def other_value(field: dataclasses.Field, hint: object) -> tuple[list[str], object]:
    """Flag tokens that set `field` to a value other than its default, and that value."""
    flag = "--" + field.name.replace("_", "-")
    kind = hint
    if typing.get_origin(hint) is not typing.Literal and type(None) in typing.get_args(hint):
        kind = next(a for a in typing.get_args(hint) if a is not type(None))  # Optional[X]
    if kind is bool:
        return ([f"--no-{flag[2:]}"] if field.default else [flag]), not field.default
    if typing.get_origin(kind) is typing.Literal:
        value = next(v for v in typing.get_args(kind) if v != field.default)
        return [flag, str(value)], value
    if field.name == "block_size":
        return [flag, "16"], 16
    value = {int: 7, float: 0.5, str: "x"}[kind]  # type: ignore[index]
    return [flag, str(value)], value


def test_every_engine_config_field_has_a_flag_and_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("PENSIEVE_")]:  # e.g. a CI cache dir
        monkeypatch.delenv(name)
    hints = typing.get_type_hints(EngineConfig)
    parser = engine_parser()
    defaults = engine_config_from_args(parser.parse_args([]))
    assert defaults == EngineConfig()
    for field in dataclasses.fields(EngineConfig):
        tokens, value = other_value(field, hints[field.name])
        config = engine_config_from_args(parser.parse_args(tokens))
        assert getattr(config, field.name) == value, field.name
        assert env_name(field.name) in parser.format_help().replace("\n", " ").replace(" ", "")


def test_historical_flag_names_still_work() -> None:
    parser = engine_parser()
    args = parser.parse_args(
        ["--stateless", "--no-profile-cost", "--block-size", "16", "--device-cache-tokens", "64"]
    )
    config = engine_config_from_args(args)
    assert (config.mode, config.profile_cost, config.block_size) == ("stateless", False, 16)
    assert config.device_cache_tokens == 64
    assert engine_config_from_args(parser.parse_args(["--device-only"])).mode == "device-only"
    with pytest.raises(SystemExit):
        parser.parse_args(["--block-size", "24"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--stateless", "--device-only"])


def test_environment_gives_defaults_that_flags_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PENSIEVE_DEVICE_CACHE_TOKENS", "1234")
    monkeypatch.setenv("PENSIEVE_PROFILE_COST", "false")
    monkeypatch.setenv("PENSIEVE_MAX_MODEL_LEN", "512")
    monkeypatch.setenv("PENSIEVE_DTYPE", "float32")
    config = engine_config_from_args(engine_parser().parse_args([]))
    assert (config.device_cache_tokens, config.profile_cost) == (1234, False)
    assert (config.max_model_len, config.dtype) == (512, "float32")
    flagged = engine_config_from_args(engine_parser().parse_args(["--device-cache-tokens", "9"]))
    assert flagged.device_cache_tokens == 9
    for name, bad in [("PENSIEVE_DTYPE", "float16"), ("PENSIEVE_MAX_RUNNING", "many")]:
        monkeypatch.setenv(name, bad)
        with pytest.raises(SystemExit):
            engine_parser()
        monkeypatch.delenv(name)


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser


def test_config_file_sits_between_environment_and_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "pensieve.yaml"
    config.write_text(
        "device_cache_tokens: 2048\nhost-cache-tokens: 512\nprofile_cost: false\n"
        "mode: device-only\napi_key: [k1, k2]\nserved_model_name: [gpt-4o-mini]\n"
        "allowed_origins: 'https://a.example,https://b.example'\nmetrics_auth: true\n"
        "max_model_len: null\n"
    )
    monkeypatch.setenv("PENSIEVE_DEVICE_CACHE_TOKENS", "999")
    monkeypatch.setenv("PENSIEVE_MAX_QUEUE", "7")
    monkeypatch.setenv("PENSIEVE_API_KEY", "k3, k1")
    args = parse_args(serve_parser(), ["--config", str(config), "--host-cache-tokens", "4096"])
    engine = engine_config_from_args(args)
    assert engine.device_cache_tokens == 2048  # the file beats the environment
    assert engine.host_cache_tokens == 4096  # a flag beats the file
    assert engine.max_queue == 7 and engine.mode == "device-only" and not engine.profile_cost
    options = server_options(args)
    assert options.api_keys == ("k1", "k2", "k3")
    assert options.served_model_names == ("gpt-4o-mini",) and options.metrics_auth
    assert options.allowed_origins == ("https://a.example", "https://b.example")

    bad = tmp_path / "bad.yaml"
    for text in ("no_such_option: 1\n", "- a list\n", "port: [unclosed\n"):
        bad.write_text(text)
        with pytest.raises(SystemExit):
            parse_args(serve_parser(), ["--config", str(bad)])


def test_subcommands_take_a_config_file_too(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("max_running: 3\nport: 9001\n")
    parser, _ = build_parser()
    args = parse_args(parser, ["serve", "--config", str(config), "--port", "9002"], command=True)
    assert args.command == "serve" and args.port == 9002
    assert engine_config_from_args(args).max_running == 3
    only_engine = tmp_path / "engine.yaml"
    only_engine.write_text("max_running: 5\n")
    chat = parse_args(parser, ["chat", "--config", str(only_engine)], command=True)
    assert chat.command == "chat" and engine_config_from_args(chat).max_running == 5
