"""A baseline server as a child process: free loopback port, readiness poll, always stopped."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kiln.processes import check_ports_free, spawn, stop_process


@dataclass
class BaselineProcess:
    name: str  # what error messages call it
    command: list[str]
    port: int
    log_file: Path
    ready_path: str = "/health"  # GET answers 200 once the model is loaded
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _status(self) -> int:
        try:
            with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return 0

    def start(self, timeout: float = 180.0) -> "BaselineProcess":
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        check_ports_free({self.name: self.port}, self.host)
        with open(self.log_file, "w") as log:
            self.process = spawn(self.command, log=log, env={**os.environ, "PYTHONSAFEPATH": "1", **self.env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode} (log {self.log_file}):\n{tail}")
            if self._status() == 200:
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer {self.ready_path} within {timeout:.0f}s (log: {self.log_file})")

    def stop(self, timeout: float = 15.0) -> int | None:
        return stop_process(self.process, timeout)

    def __enter__(self) -> "BaselineProcess":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()



def fastapi_process(checkpoint: Path, model: str, log_file: Path, max_length: int = 256,
                    port: int | None = None) -> BaselineProcess:
    """kiln/baselines/fastapi_torch.py under uvicorn on a free loopback port (not started yet)."""
    import sys

    from kiln.processes import free_port

    port = port or free_port()
    cmd = [sys.executable, "-m", "kiln.baselines.fastapi_torch", "--checkpoint", str(checkpoint), "--model", model,
           "--max-length", str(max_length), "--host", "127.0.0.1", "--port", str(port)]
    return BaselineProcess("the FastAPI + PyTorch server", cmd, port, log_file, ready_path="/health",
                           env={"TOKENIZERS_PARALLELISM": "false"})
