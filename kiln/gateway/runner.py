"""Running the gateway: in this process on a thread (``GatewayThread``, what ``kiln serve``
does; ``kiln gateway`` runs ``uvicorn_server`` in the foreground) or as a child process
(``GatewayProcess``, what the demo, the benchmarks and the tests use). Both have the same
start / wait_ready / stop, so ``kiln.stack.Stack`` runs either.

Stopping drains: new requests are answered 503 "shutting down" (with Retry-After) while
those in flight finish, up to the drain deadline; then uvicorn closes (``DrainGate``,
``DrainingServer``; a SIGTERM to ``kiln gateway`` does the same, a second one stops at once).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from kiln.gateway.config import GatewayConfig
from kiln.gateway.http import error_response
from kiln.gateway.protocol import APIError
from kiln.processes import spawn, stop_process

STARTED_MARK = "kiln gateway: application started"  # printed by the app at start-up, whatever the log level
KEEP_ALIVE_S = 75  # idle keep-alive connections are closed after this (nginx's default)
DRAIN_S = GatewayConfig.model_fields["drain_timeout_s"].default  # in-flight requests get this long by default
RETRY_AFTER_SHUTDOWN_S = 5.0


class DrainGate:
    """ASGI wrapper around the app: counts the requests in flight and, once draining, answers
    new ones 503 (liveness and metrics still answer, so a drain can be watched)."""

    PASSING = ("/health", "/metrics")

    def __init__(self, app):
        self.app = app
        self.in_flight = 0
        self.deadline: float | None = None  # monotonic; set when the drain begins

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def begin(self, seconds: float) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + seconds

    def drained(self) -> bool:
        """Draining, and nothing is in flight any more or the deadline has passed."""
        return self.deadline is not None and (self.in_flight == 0 or time.monotonic() >= self.deadline)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.draining and scope["path"] not in self.PASSING:
            err = APIError(503, "The server is shutting down; retry shortly (or on another replica).", None,
                           "shutting_down", retry_after=RETRY_AFTER_SHUTDOWN_S)
            return await error_response(err)(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn that drains before it shuts down: ``drain()`` (or the first SIGINT / SIGTERM
    when it owns the signals) starts it; uvicorn exits once the gate is drained."""

    def __init__(self, config: uvicorn.Config, gate: DrainGate, drain_s: float,
                 sockets: list[socket.socket] | None = None):
        super().__init__(config)
        self.gate, self.drain_s, self.sockets = gate, drain_s, sockets

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        super().run(sockets=sockets or self.sockets)

    def drain(self) -> None:
        self.gate.begin(self.drain_s)

    def handle_exit(self, sig, frame) -> None:
        if self.gate.draining:  # a second signal: stop now
            super().handle_exit(sig, frame)
        else:
            self._captured_signals.append(sig)
            self.drain()

    async def on_tick(self, counter: int) -> bool:
        return await super().on_tick(counter) or self.gate.drained()


def uvicorn_server(config: GatewayConfig) -> DrainingServer:
    from kiln.gateway.app import build_app

    gate = DrainGate(build_app(config))  # reads repositories, tokenizers and keys now: bad config fails at start-up
    # the drain has run when uvicorn shuts down: what is still open after it gets one more second
    return DrainingServer(uvicorn.Config(gate, host=config.host, port=config.port, log_level=config.log_level,
                                         access_log=False, timeout_graceful_shutdown=1,
                                         # clients keep connections between requests (uvicorn's 5 s cut
                                         # them under a client that was about to reuse one: a lost request)
                                         timeout_keep_alive=KEEP_ALIVE_S), gate, config.drain_timeout_s,
                          [shared_socket(config.host, config.port)] if config.reuse_port else None)


def shared_socket(host: str, port: int) -> socket.socket:
    """A listening address several processes bind at once (SO_REUSEPORT): the kernel hands
    each new connection to one of them, so M gateway processes serve one port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def http_get(url: str) -> tuple[int, dict]:
    """(status, JSON body) of a GET; (0, {}) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
    except (OSError, ValueError):
        return 0, {}


class _Gateway:
    """What both ways of running the gateway share: its URL, GETs, waiting for /ready."""

    config: GatewayConfig

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def get(self, path: str) -> tuple[int, dict]:
        return http_get(self.url + path)

    def check_port(self) -> None:
        """PortBusy (naming who holds it) when the gateway's port is taken: it must not start
        beside, or look ready through, another server."""
        from kiln.processes import check_ports_free

        check_ports_free({"gateway": self.config.port}, self.config.host, hint="choose another --gateway-port")

    def wait_ready(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        status, body = 0, {}
        while time.monotonic() < deadline:
            status, body = self.get("/ready")
            if status == 200:
                return body
            time.sleep(0.2)
        raise RuntimeError(f"the gateway's /ready did not turn 200 within {timeout:.0f}s: {status} {body}")

    def __enter__(self):
        return self.start() if not self.running() else self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class GatewayProcess(_Gateway):
    """`kiln gateway` as a child process."""

    config: GatewayConfig
    log_file: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        kiln = Path(sys.executable).parent / "kiln"
        return [str(kiln), "gateway", "--config-json", self.config.model_dump_json()]

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def launch(self) -> None:
        """Start the process; ``started()`` tells when its app is up."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONSAFEPATH": "1", **self.env}
        with open(self.log_file, "w") as log:
            # SIGKILL when the process that started it dies: its Triton goes too, nothing to drain for
            self.process = spawn(self.command(), log=log, env=env, death_signal=signal.SIGKILL)

    def started(self) -> bool:
        """Its app said it started (its own log, not the port: siblings may share the port);
        raises if the process exited instead."""
        if self.process.poll() is not None:
            raise RuntimeError(f"the gateway exited with code {self.process.returncode}:\n"
                               + self.log_file.read_text(errors="replace")[-3000:])
        return STARTED_MARK in self.log_file.read_text(errors="replace")

    def start(self, timeout: float = 60.0) -> "GatewayProcess":
        self.check_port()
        self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.started() and self.get("/health")[0] == 200:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the gateway did not answer /health within {timeout:.0f}s (log: {self.log_file})")

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM: the gateway drains (up to its deadline), then it is killed if still there
        (``timeout``: default the drain deadline and 5 s)."""
        return stop_process(self.process, self.config.drain_timeout_s + 5 if timeout is None else timeout)


@dataclass
class GatewayGroup(_Gateway):
    """M `kiln gateway` processes on one port (SO_REUSEPORT): what `kiln serve --gateway-workers
    M` runs, when one process's event loop is the bottleneck. They share nothing in memory, so
    their rate limits must live in Redis (``config.redis_url``). Started, drained and stopped
    together; running while every worker runs."""

    config: GatewayConfig
    workers: list[GatewayProcess]

    @classmethod
    def of(cls, config: GatewayConfig, count: int, log_dir: Path, env: dict[str, str] | None = None) -> "GatewayGroup":
        if count < 2:
            raise ValueError("a gateway group has at least two workers; one is a GatewayProcess")
        shared = config.model_copy(update={"reuse_port": True})
        return cls(shared, [GatewayProcess(shared, log_dir / f"gateway-{i}.log", dict(env or {}))
                            for i in range(count)])

    def running(self) -> bool:
        return all(w.running() for w in self.workers)

    def start(self, timeout: float = 60.0) -> "GatewayGroup":
        self.check_port()
        for w in self.workers:
            w.launch()
        deadline = time.monotonic() + timeout
        try:
            while not all(w.started() for w in self.workers):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway workers did not start within {timeout:.0f}s "
                                       f"(logs: {', '.join(str(w.log_file) for w in self.workers)})")
                time.sleep(0.1)
            while self.get("/health")[0] != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM to all at once (each drains; a second one would stop it at once), then each
        is waited for, its group killed past ``timeout`` (default the drain deadline and 5 s)."""
        for w in self.workers:
            if w.running():
                w.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + (self.config.drain_timeout_s + 5 if timeout is None else timeout)
        codes = []
        for w in self.workers:
            if w.process is None:
                continue
            try:
                w.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(w.process.pid, signal.SIGKILL)
                w.process.wait()
            codes.append(w.process.returncode)
        return next((c for c in codes if c), codes[0] if codes else None)


class GatewayThread(_Gateway):
    """The gateway on a thread of this process (uvicorn; its log goes to this process's
    stderr). Built here: a bad key file or repository fails on construction, before anything
    is started. Signals stay with the main thread (uvicorn leaves them alone off it)."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.server = uvicorn_server(config)
        self.thread: threading.Thread | None = None

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, timeout: float = 60.0) -> "GatewayThread":
        self.check_port()
        self.thread = threading.Thread(target=self.server.run, name="kiln-gateway", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():  # uvicorn logged why (a port in use, ...) and gave up
                raise RuntimeError(f"the gateway did not start on {self.config.host}:{self.config.port} (see above)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the gateway did not start within {timeout:.0f}s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Drain (new requests 503, in-flight ones finish up to the deadline), then wait for uvicorn to close."""
        self.server.drain()
        if self.thread is not None:
            self.thread.join(self.server.drain_s + 10)
