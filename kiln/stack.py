"""The one place that starts kiln's serving stack: Triton on model repositories and,
optionally, the OpenAI-compatible gateway in front, on free ports unless told otherwise.

``kiln serve``, ``kiln demo``, ``kiln loadtest``, the benchmarks and the end-to-end tests all
start servers through ``Stack``, so readiness waits and cleanup are written once::

    with Stack(repositories, workdir, gateway=GatewayOptions(keys="")) as stack:
        client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="none")

Whatever started is stopped on the way out (an exception, Ctrl-C, a failed start): the
gateway first (it drains: in-flight requests finish, new ones get 503), then Triton.
``restart_triton`` stops and starts Triton on the same ports while the gateway keeps running
and reconnects; ``kiln.supervisor`` does the same for a Triton that died. ``replicas`` > 1
starts that many Tritons on the same repositories, each on its own free ports (the first on
``ports``) and in its own folder; the gateway routes between them (``kiln.gateway.pool``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from kiln.canary import (
    GATEWAY_FILE,  # in the stack's folder while its gateway runs: {url, workers}
)
from kiln.gateway.config import GatewayConfig
from kiln.gateway.runner import GatewayGroup, GatewayProcess, GatewayThread
from kiln.processes import free_port
from kiln.server import TritonServer, free_ports
from kiln_core.spec import Ports

Gateway = GatewayProcess | GatewayThread | GatewayGroup


@dataclass(frozen=True)
class GatewayOptions:
    """How the stack runs the gateway. The stack sets ``config``'s Triton addresses, server
    folders and repositories (always its own), and picks a free port when ``config.port`` is 0."""

    config: GatewayConfig = field(default_factory=lambda: GatewayConfig(port=0))
    in_process: bool = False  # a uvicorn thread here (`kiln serve`), else a `kiln gateway` child process
    keys: str | None = None  # child process: its config.keys_env ("" accepts every request); None: this environment's
    log_file: Path | None = None  # child process: its log (default WORKDIR/gateway.log)
    workers: int = 1  # > 1: that many child processes on one port (their limits must be in Redis)

    def __post_init__(self) -> None:
        if self.workers < 1 or (self.workers > 1 and self.in_process):
            raise ValueError(f"gateway workers must be >= 1, and several run as child processes (got {self.workers}, "
                             f"in_process={self.in_process})")
        if self.in_process and (self.keys is not None or self.log_file is not None):
            raise ValueError("keys and log_file are for a gateway child process; in process the gateway reads "
                             f"{self.config.keys_env} from this environment and logs to stderr")


class Stack:
    """Triton on `repositories` (its files under `workdir`) and, with `gateway`, the gateway
    in front. Ports are settled here (free ones unless given) and an in-process gateway is
    built here, so callers can print the addresses and a bad key file fails before anything
    starts. `triton_class` and `gateway_class`
    are what the unit tests replace with fakes."""

    def __init__(
        self,
        repositories: Path | Sequence[Path],
        workdir: Path,
        ports: Ports | None = None,
        gateway: GatewayOptions | None = None,
        *,
        replicas: int = 1,
        cache_mb: float | None = None,
        triton_timeout: float = 180.0,
        triton_class: Callable[..., TritonServer] = TritonServer,
        gateway_class: Callable[[GatewayOptions, GatewayConfig, Path], Gateway] | None = None,
    ):
        self.repositories = [Path(repositories)] if isinstance(repositories, (str, Path)) else list(repositories)
        self.workdir = Path(workdir)
        self.triton_timeout = triton_timeout
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1 (got {replicas})")
        cache = {} if cache_mb is None else {"cache_mb": cache_mb}  # default: sized by the repositories' cards
        self.backends: list[TritonServer] = [
            triton_class(self.repositories, (ports or free_ports()) if i == 0 else free_ports(),
                         workdir=self.workdir if i == 0 else self.workdir / f"replica-{i}", **cache)
            for i in range(replicas)]
        self._gateway_class = gateway_class or _make_gateway
        self.gateway: Gateway | None = self._build_gateway(gateway) if gateway is not None else None
        self.started = False

    # ------------------------------------------------------------------------- what callers read
    @property
    def triton(self) -> TritonServer:
        """The Triton server (the first backend): http_url, grpc_url, metrics_url, log_file."""
        return self.backends[0]

    @property
    def gateway_url(self) -> str | None:
        return self.gateway.url if self.gateway is not None else None

    def ready(self) -> bool:
        """Every Triton ready, and the gateway (if any) answering /ready with 200."""
        return all(b.ready() for b in self.backends) and (self.gateway is None or self.gateway.get("/ready")[0] == 200)

    def alive(self) -> bool:
        """No part has exited on its own (Triton crashed, the gateway gave up)."""
        return (all(b.process is not None and b.process.poll() is None for b in self.backends)
                and (self.gateway is None or self.gateway.running()))

    # ------------------------------------------------------------------------- life cycle
    def start(self) -> "Stack":
        """Start Triton, wait until it is ready, then the gateway (until /ready). On any
        failure, Ctrl-C included, whatever started is stopped and the error raised."""
        try:
            self.check_ports()
            for backend in self.backends:
                backend.start(self.triton_timeout)
            self.started = True
            if self.gateway is not None:
                self._start_gateway()
        except BaseException:
            self.stop()
            raise
        return self

    def check_ports(self) -> None:
        """PortBusy, naming the port and who holds it, when any port of the stack is taken:
        checked before anything starts, so nothing of it answers through another server."""
        for backend in self.backends:
            backend.check_ports()
        if self.gateway is not None and not self.gateway.running():
            self.gateway.check_port()

    def start_gateway(self, options: GatewayOptions) -> Gateway:
        """Start the gateway in front of a running stack (the demo shows Triton alone first);
        it is stopped with the stack."""
        if self.gateway is not None:
            raise RuntimeError(f"the stack already has a gateway at {self.gateway.url}")
        self.gateway = self._build_gateway(options)
        try:
            self._start_gateway()
        except BaseException:
            self.stop_gateway()
            raise
        return self.gateway

    def restart_triton(self) -> None:
        """Stop Triton and start it again on the same ports; the gateway keeps running and
        reconnects (this waits until it is ready again)."""
        for backend in self.backends:
            backend.stop()
            backend.start(self.triton_timeout)
        if self.gateway is not None:
            self.gateway.wait_ready()

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            (self.workdir / GATEWAY_FILE).unlink(missing_ok=True)
            self.gateway.stop()

    def stop(self) -> int | None:
        """Stop the gateway, then every Triton (each one even if another fails to stop);
        returns Triton's exit code (the first backend's)."""
        self.started = False
        try:
            self.stop_gateway()
        finally:
            codes = _stop_all(self.backends)
        return codes[0]

    def __enter__(self) -> "Stack":
        return self if self.started else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------- the gateway
    def _build_gateway(self, options: GatewayOptions) -> Gateway:
        port = options.config.port or free_port()
        config = options.config.model_copy(update={"triton_grpc": self.triton.grpc_url,
                                                   "triton_replicas": [b.grpc_url for b in self.backends[1:]],
                                                   # /ready believes only these servers, never another on the port
                                                   "triton_ids": [b.server_id for b in self.backends],
                                                   "repositories": self.repositories, "port": port,
                                                   # where each Triton's connection file is: the admin routes'
                                                   # `kiln reload --server-dir`
                                                   "server_dirs": [b.workdir for b in self.backends]})
        return self._gateway_class(options, config, self.workdir)

    def _start_gateway(self) -> None:
        self.gateway.start()
        self.gateway.wait_ready()
        # where `kiln reload --canary` reads the gateway's per-arm counts (every worker's)
        workers = len(getattr(self.gateway, "workers", None) or [1])
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / GATEWAY_FILE).write_text(json.dumps({"url": self.gateway.url, "workers": workers}) + "\n")


def _make_gateway(options: GatewayOptions, config: GatewayConfig, workdir: Path) -> Gateway:
    if options.in_process:
        return GatewayThread(config)
    env = {} if options.keys is None else {config.keys_env: options.keys}
    if options.workers > 1:
        return GatewayGroup.of(config, options.workers, options.log_file.parent if options.log_file else workdir, env)
    return GatewayProcess(config, log_file=options.log_file or workdir / "gateway.log", env=env)


def _stop_all(backends: Sequence[TritonServer]) -> list[int | None]:
    """Stop every backend, last started first; an error stopping one is raised after the rest stopped."""
    codes: list[int | None] = [None] * len(backends)
    errors: list[BaseException] = []
    for i in reversed(range(len(backends))):
        try:
            codes[i] = backends[i].stop()
        except BaseException as err:
            errors.append(err)
    if errors:
        raise errors[0]
    return codes
