"""Running the gateway: in this process (``run_gateway``, what ``kiln gateway`` and
``kiln serve`` do) or as a child process with readiness and shutdown (``GatewayProcess``,
what the demo, the benchmark and the tests use)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def run_gateway(config: GatewayConfig) -> None:
    uvicorn_server(config).run()


@dataclass
class GatewayProcess:
    """`kiln gateway` as a child process."""

    config: GatewayConfig
    log_file: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def command(self) -> list[str]:
        kiln = Path(sys.executable).parent / "kiln"
        return [str(kiln), "gateway", "--config-json", self.config.model_dump_json()]

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

    def get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")
        except (OSError, ValueError):
            return 0, {}

    def wait_ready(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        status, body = 0, {}
        while time.monotonic() < deadline:
            status, body = self.get("/ready")
            if status == 200:
                return body
            time.sleep(0.2)
        raise RuntimeError(f"the gateway's /ready did not turn 200 within {timeout:.0f}s: {status} {body}")

    def stop(self, timeout: float = 15.0) -> int | None:
        from kiln.server import stop_process

        return stop_process(self.process, timeout)

    def __enter__(self) -> "GatewayProcess":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
