"""Running the gateway: in this process on a thread (``GatewayThread``, what ``kiln serve``
does; ``kiln gateway`` runs ``uvicorn_server`` in the foreground) or as a child process
(``GatewayProcess``, what the demo, the benchmarks and the tests use). Both have the same
start / wait_ready / stop, so ``kiln.stack.Stack`` runs either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kiln.gateway.config import GatewayConfig


def uvicorn_server(config: GatewayConfig):
    import uvicorn

    from kiln.gateway.app import build_app

    app = build_app(config)  # reads repositories, tokenizers and keys now: bad config fails at start-up
    return uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                         access_log=False, timeout_graceful_shutdown=5))


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

    def start(self, timeout: float = 60.0) -> "GatewayProcess":
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "w")
        env = {**os.environ, "PYTHONSAFEPATH": "1", **self.env}
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with code {self.process.returncode}:\n"
                                   + self.log_file.read_text(errors="replace")[-3000:])
            if self.get("/health")[0] == 200:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the gateway did not answer /health within {timeout:.0f}s (log: {self.log_file})")

    def stop(self, timeout: float = 15.0) -> int | None:
        from kiln.server import stop_process

        return stop_process(self.process, timeout)


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

    def stop(self, timeout: float = 15.0) -> None:
        """Ask uvicorn to shut down (it drains for up to 5 s) and wait for its thread."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
