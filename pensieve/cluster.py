"""`pensieve cluster`: N `pensieve serve` workers on loopback ports behind an existing router.

For trying replicas on one machine and for tests; production runs the same two programs under an
orchestrator (docs/scale-out.md). Pensieve writes no router: `sglang-router` and `vllm-router`
(PyPI, `pip install -e ".[cluster]"`) do cache-aware routing and session affinity.

Start-up: every worker gets a free loopback port and its log file; once all answer /health
200, the router starts in front of them, and the command prints the router's URL when the
router's /readiness counts every worker healthy. SIGTERM or SIGINT stops the router first (no
new traffic), then the workers (each drains its in-flight replies), then kills what is left.
If any process exits on its own, the others are stopped too and the command fails.

With `--router vllm --policy kv_aware` every worker publishes its KV events on a loopback ZMQ
port of its own (`--kv-events-endpoint`, pensieve/kv_events.py) and the router subscribes to
each (`--kv-event-source URL=ENDPOINT`), so it routes on where the KV really is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp

from pensieve.errors import PensieveError


@dataclass(frozen=True)
class RouterKind:
    """How to launch one router package, and the policies it offers."""

    package: str  # PyPI name
    module: str  # run as `python -m module`
    policies: tuple[str, ...]


ROUTERS = {
    "sglang": RouterKind(
        "sglang-router",
        "sglang_router.launch_router",
        ("cache_aware", "round_robin", "random", "power_of_two", "manual"),
    ),
    "vllm": RouterKind(
        "vllm-router",
        "vllm_router.launch_router",
        (
            "cache_aware",
            "consistent_hash",
            "round_robin",
            "random",
            "power_of_two",
            "sticky_least_loaded",
            "kv_aware",
        ),
    ),
}
DEFAULT_POLICY = "cache_aware"  # suits every client: both routers key it on the history's text
# sglang-router fills a missing `model` with this placeholder before forwarding the request.
SGLANG_UNKNOWN_MODEL = "unknown"


class ClusterError(PensieveError):
    """A worker or the router failed to start, or exited."""


def router_installed(router: str) -> bool:
    return importlib.util.find_spec(ROUTERS[router].module.split(".")[0]) is not None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _serve_parser() -> argparse.ArgumentParser:
    from pensieve.server.serve_cli import add_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return parser


def model_alias_args(serve_args: list[str]) -> list[str]:
    """Serve flags that make workers accept sglang-router's "unknown" model placeholder.

    The model's own name has to stay first (it is what /v1/models reports), so it is read from
    the model's config here; for the default GGUF model this also converts it once, before the
    workers start, instead of in each of them at the same time.
    """
    from pensieve.cli_args import engine_config_from_args, parse_args

    args = parse_args(_serve_parser(), serve_args)  # with a --config file's values
    if SGLANG_UNKNOWN_MODEL in args.served_model_name:
        return []
    names = [SGLANG_UNKNOWN_MODEL]
    if not args.served_model_name:  # the model's own name first
        from pensieve.weights import load_config, resolve_model

        config = engine_config_from_args(args)
        names.insert(0, load_config(resolve_model(config.model, cache_dir=config.cache_dir)).name)
    return [a for name in names for a in ("--served-model-name", name)]


def kv_event_args(serve_args: list[str]) -> tuple[list[str], list[str], int]:
    """Per worker, the serve flags of its own loopback event sockets, and the event block size
    the router must be told (the workers' --kv-events-block-size)."""
    from pensieve.cli_args import parse_args

    block_size = parse_args(_serve_parser(), serve_args).kv_events_block_size
    endpoint, replay = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    flags = ["--kv-events-endpoint", endpoint, "--kv-events-replay-endpoint", replay]
    return flags, [endpoint, replay], block_size


def kv_event_router_args(
    worker_urls: list[str],
    endpoints: list[str],
    block_size: int,
    replay_endpoints: list[str] | None = None,
) -> list[str]:
    """vllm-router's flags for static KV event sources: one per worker, its block size, and a
    model identity (required; any name does, the workers share one model)."""
    args = []
    for url, endpoint in zip(worker_urls, endpoints, strict=True):
        args += ["--kv-event-source", f"{url}={endpoint}"]
    if replay_endpoints is not None:
        for url, endpoint in zip(worker_urls, replay_endpoints, strict=True):
            args += ["--kv-event-replay-source", f"{url}={endpoint}"]
    return args + ["--kv-event-block-size", str(block_size), "--kv-event-model", "pensieve"]


def worker_command(port: int, serve_args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "pensieve.cli", "serve",
        "--host", "127.0.0.1", "--port", str(port), *serve_args,
    ]  # fmt: skip


def router_command(
    router: str,
    worker_urls: list[str],
    host: str,
    port: int,
    policy: str,
    metrics_port: int,
    extra: list[str],
) -> list[str]:
    """The router's command line; its Prometheus port is set so that clusters never collide."""
    return [
        sys.executable, "-m", ROUTERS[router].module,
        "--host", host, "--port", str(port),
        "--worker-urls", *worker_urls,
        "--policy", policy,
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
        *extra,
    ]  # fmt: skip


@dataclass
class ClusterConfig:
    replicas: int
    router: str
    policy: str = DEFAULT_POLICY
    host: str = "127.0.0.1"
    port: int = 0  # the router's; 0: a free port
    serve_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    startup_timeout_s: float = 300.0
    stop_timeout_s: float = 30.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    log: IO[bytes]

    def tail(self, lines: int = 15) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class Cluster:
    """The processes of one cluster. Use `async with Cluster(config) as cluster:`."""

    def __init__(self, config: ClusterConfig):
        if config.router not in ROUTERS:
            raise ClusterError(f"unknown router {config.router!r}; choose from {sorted(ROUTERS)}")
        if config.policy not in ROUTERS[config.router].policies:
            policies = ", ".join(ROUTERS[config.router].policies)
            raise ClusterError(f"{config.router} has no policy {config.policy!r} ({policies})")
        if config.replicas < 1:
            raise ClusterError("--replicas must be at least 1")
        self.config = config
        self.log_dir = config.log_dir or Path(tempfile.mkdtemp(prefix="pensieve-cluster-"))
        self.workers: list[Child] = []
        self.router: Child | None = None
        self.worker_urls: list[str] = []
        self.url = ""

    async def __aenter__(self) -> Cluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, name: str, command: list[str]) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"{name}.log"
        log = path.open("wb")
        # A session of its own: a terminal's Ctrl-C reaches only us, and we stop the children
        # in order (router first) instead of all at once.
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return Child(name, proc, path, log)

    async def start(self) -> None:
        cfg = self.config
        if not router_installed(cfg.router):
            package = ROUTERS[cfg.router].package
            raise ClusterError(f"{package} is not installed (pip install {package})")
        serve_args = list(cfg.serve_args)
        if cfg.router == "sglang":
            serve_args += await asyncio.to_thread(model_alias_args, serve_args)
        kv_events = cfg.router == "vllm" and cfg.policy == "kv_aware"
        sockets: list[list[str]] = []  # per worker: its event and replay endpoints
        router_args = list(cfg.router_args)
        deadline = time.monotonic() + cfg.startup_timeout_s
        for i in range(cfg.replicas):
            port, own = free_port(), []
            if kv_events:
                own, endpoints, block_size = await asyncio.to_thread(kv_event_args, serve_args)
                sockets.append(endpoints)
            command = worker_command(port, serve_args + own)
            self.workers.append(self._spawn(f"worker-{i}", command))
            self.worker_urls.append(f"http://127.0.0.1:{port}")
        if kv_events:
            pub, replay = [s[0] for s in sockets], [s[1] for s in sockets]
            router_args += kv_event_router_args(self.worker_urls, pub, block_size, replay)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            await asyncio.gather(
                *(
                    self._wait(http, w, url + "/health", deadline)
                    for w, url in zip(self.workers, self.worker_urls, strict=True)
                )
            )
            port = cfg.port or free_port(cfg.host)
            command = router_command(
                cfg.router,
                self.worker_urls,
                cfg.host,
                port,
                cfg.policy,
                free_port(),
                router_args,
            )
            self.router = self._spawn("router", command)
            connect_host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
            self.url = f"http://{connect_host}:{port}"
            await self._wait(http, self.router, self.url + "/readiness", deadline, cfg.replicas)

    async def _wait(
        self,
        http: aiohttp.ClientSession,
        child: Child,
        url: str,
        deadline: float,
        healthy_workers: int | None = None,
    ) -> None:
        """Poll url until it answers 200 (and, for a router, counts every worker healthy)."""
        while True:
            self.check_alive()
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                async with http.get(url) as resp:
                    if resp.status == 200:
                        if healthy_workers is None:
                            return
                        body = await resp.json(content_type=None)
                        if body.get("healthy_workers", 0) >= healthy_workers:
                            return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{child.name} was not ready within {self.config.startup_timeout_s:.0f} s; "
                    f"its log ({child.log_path}) ends:\n{child.tail()}"
                )
            await asyncio.sleep(0.25)

    def children(self) -> list[Child]:
        return ([self.router] if self.router is not None else []) + self.workers

    def check_alive(self) -> None:
        """Raise if a process of the cluster has exited."""
        for child in self.children():
            code = child.proc.poll()
            if code is not None:
                raise ClusterError(
                    f"{child.name} exited with code {code}; its log ({child.log_path}) ends:\n"
                    f"{child.tail()}"
                )

    async def stop(self) -> None:
        """Router first, then the workers (they drain); kill whatever outlives the timeout."""
        groups = [[self.router] if self.router is not None else [], self.workers]
        for group in groups:
            running = [c for c in group if c.proc.poll() is None]
            for child in running:
                child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.config.stop_timeout_s
            while any(c.proc.poll() is None for c in running) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            for child in running:
                if child.proc.poll() is None:
                    child.proc.kill()
                    child.proc.wait()
        for child in self.children():
            child.log.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False  # a serve flag must never be read as an abbreviated cluster flag
    g = parser.add_argument_group(
        "cluster", "any other flag is passed to every `pensieve serve` worker"
    )
    g.add_argument("--replicas", type=int, default=2, help="number of workers (default: 2)")
    g.add_argument("--router", choices=sorted(ROUTERS), required=True)
    g.add_argument(
        "--policy",
        default=DEFAULT_POLICY,
        help="the router's policy (default: cache_aware); sglang: "
        + ", ".join(ROUTERS["sglang"].policies)
        + "; vllm: "
        + ", ".join(ROUTERS["vllm"].policies),
    )
    g.add_argument("--host", default="127.0.0.1", help="the router's address (workers: loopback)")
    g.add_argument("--port", type=int, default=30000, help="the router's port (0: any free port)")
    g.add_argument("--router-args", default="", help="extra router flags, one shell-quoted string")
    g.add_argument("--log-dir", type=Path, default=None, help="default: a new temporary folder")
    g.add_argument("--startup-timeout", type=float, default=300.0, help="seconds")


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(
        replicas=args.replicas,
        router=args.router,
        policy=args.policy,
        host=args.host,
        port=args.port,
        serve_args=[a for a in getattr(args, "passthrough_args", []) if a != "--"],
        router_args=shlex.split(args.router_args),
        log_dir=args.log_dir,
        startup_timeout_s=args.startup_timeout,
    )


async def _first(coro: asyncio.Future | asyncio.Task, stop: asyncio.Event) -> bool:
    """Wait for coro or a stop signal; True if coro finished first (its errors propagate)."""
    stopping = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({coro, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if coro in done:
        coro.result()
        return True
    coro.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await coro
    return False


async def run(args: argparse.Namespace) -> int:
    cluster = Cluster(config_from_args(args))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    workers = f"{args.replicas} worker{'s' if args.replicas != 1 else ''}"
    print(f"starting {workers} and {args.router}-router; logs in {cluster.log_dir}")
    try:
        if not await _first(asyncio.ensure_future(cluster.start()), stop):
            return 0
        print(f"workers: {' '.join(cluster.worker_urls)}")
        print(f"router ({args.router}, {args.policy}): {cluster.url}", flush=True)
        while not stop.is_set():
            cluster.check_alive()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        return 0
    except ClusterError as exc:
        print(f"pensieve cluster: {exc.message}", file=sys.stderr)
        return 1
    finally:
        print("stopping the cluster", flush=True)
        await cluster.stop()
