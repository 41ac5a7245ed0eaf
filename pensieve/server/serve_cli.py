"""`pensieve serve`: the OpenAI-compatible HTTP server.

Start-up order: listen first, then load the model, so that a supervisor can poll
GET /health from the start (503 "loading" until the engine is ready, then 200).
SIGTERM or SIGINT drains: new requests get 503, in-flight generations get --grace-period
seconds to finish, the rest end with an error chunk (their blocks freed), the engine stops,
exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from pensieve.cli_args import add_engine_arguments, engine_config_from_args, parse_args
from pensieve.config import EngineConfig
from pensieve.errors import PensieveError
from pensieve.server.app import create_app, start_server
from pensieve.server.auth import parse_keys
from pensieve.server.state import DEFAULT_MAX_BODY_BYTES, STATE, ServerOptions

if TYPE_CHECKING:
    from pensieve.engine import Engine

log = logging.getLogger("pensieve.server")

T = TypeVar("T")

# How long aiohttp waits for handlers still running after draining before cancelling them.
CANCEL_TIMEOUT_S = 1.0
API_KEY_ENV = "PENSIEVE_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    g.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body accepted; larger ones get 413",
    )
    g.add_argument(
        "--grace-period",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish on SIGTERM/SIGINT; the rest then end "
        "with an error chunk",
    )
    g.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/*; repeatable, each key its own tenant "
        f"(also ${API_KEY_ENV}, comma-separated, which keeps keys out of the process list)",
    )
    g.add_argument(
        "--metrics-auth",
        action="store_true",
        help="require an API key on /metrics too (default: open, like /health)",
    )
    g.add_argument(
        "--served-model-name",
        action="append",
        default=[],
        metavar="NAME",
        help="model name(s) requests may use; repeatable; the first is what /v1/models shows "
        "(default: the model's own name)",
    )
    g.add_argument(
        "--allowed-origins",
        action="append",
        default=[],
        metavar="ORIGINS",
        help="CORS: comma-separated origins browsers may call from ('*': any); repeatable "
        "(default: CORS off)",
    )


def server_options(args: argparse.Namespace) -> ServerOptions:
    """The server's options; keys from --api-key and $PENSIEVE_API_KEY together."""
    keys = parse_keys([*args.api_key, os.environ.get(API_KEY_ENV, "")])
    origins = tuple(o.strip() for v in args.allowed_origins for o in v.split(",") if o.strip())
    return ServerOptions(
        api_keys=keys,
        metrics_auth=args.metrics_auth,
        served_model_names=tuple(dict.fromkeys(args.served_model_name)),
        allowed_origins=origins,
        max_body_bytes=args.max_body_bytes,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(serve(args))


async def _until_stopped(coro: Coroutine[Any, Any, T], stop: asyncio.Event) -> asyncio.Task[T]:
    """Run coro until it ends or a stop signal comes (then cancel it); return its task."""
    task = asyncio.ensure_future(coro)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return task


async def _load_engine(config: EngineConfig, stop: asyncio.Event) -> Engine | None:
    """Start the engine unless a stop signal comes first (then None)."""
    from pensieve.engine import Engine

    engine = Engine(config)
    loading = await _until_stopped(engine.start(), stop)
    if loading.cancelled():
        await engine.stop()
        return None
    loading.result()  # raises the load error, if any
    return engine


async def serve(args: argparse.Namespace) -> int:
    options = server_options(args)
    app = create_app(options=options)
    state = app[STATE]
    try:
        runner, port = await start_server(
            app, args.host, args.port, shutdown_timeout=CANCEL_TIMEOUT_S
        )
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "listening on http://%s:%d (loading the model; /health is 503 until ready)", args.host, port
    )
    engine = None
    try:
        engine = await _load_engine(engine_config_from_args(args), stop)
        if engine is None:
            log.info("stopped while loading")
            return 0
        state.engine = engine
        keys = f"{len(options.api_keys)} API keys" if options.api_keys else "no API key: open"
        cors = ", ".join(options.allowed_origins) or "off"
        name = state.model_names(engine)[0]
        url = f"http://{args.host}:{port}"
        log.info("ready: serving %s on %s (%s, CORS %s)", name, url, keys, cors)
        await stop.wait()
        stop.clear()  # a second signal ends the grace period at once
        log.info(
            "shutting down: %d requests in flight, grace %.1fs", state.in_flight, args.grace_period
        )
        draining = await _until_stopped(state.drain(args.grace_period), stop)
        if draining.cancelled():  # a second signal: end what is left now
            log.warning("interrupting %d requests still in flight", state.in_flight)
            await state.interrupt()
        elif not draining.result():
            log.warning("grace period over: in-flight requests were interrupted")
        return 0
    except PensieveError as exc:
        log.error("%s: %s", type(exc).__name__, exc.message)
        return 1
    finally:
        state.draining = True
        await runner.cleanup()
        if engine is not None:
            await engine.stop()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pensieve serve", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parse_args(parser, argv))


if __name__ == "__main__":
    sys.exit(main())
