"""Start and always stop a real ``redis-server`` on a free loopback port.

The shared rate limiter (``kiln/gateway/limits_redis.py``) needs a Redis that several gateway
processes reach. ``kiln serve --redis`` and the tests start the Debian package's binary
themselves, each on its own free port, rather than rely on the package's system service:
nothing to configure, no clash between two stacks on one machine, and a fault test can
SIGKILL it and bring it back on the same port. Nothing is persisted (``--save ""
--appendonly no``): the limiter keeps minutes of bucket state, and losing it only refills
every bucket once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kiln.processes import check_ports_free, free_port, spawn, stop_process

HOST = "127.0.0.1"
NOT_INSTALLED = ("redis-server is not installed (the shared rate limits need it): run `make setup`, "
                 "which installs it with `apt-get install redis-server`")


class RedisServerError(RuntimeError):
    """redis-server is missing or did not answer PING; the message says what to do or carries its log."""


class RedisServer:
    """A ``redis-server`` child bound to 127.0.0.1: ``with RedisServer() as r: r.url``.

    The port is chosen once (a free one unless given) and kept across ``restart()``, so clients
    holding ``url`` reconnect to the new process. Its log goes to ``workdir`` (a temporary folder,
    removed on ``stop()``, unless one is given).
    """

    def __init__(self, port: int | None = None, workdir: Path | None = None, binary: str = "redis-server"):
        self.port = port or free_port()
        self.binary = binary
        self.workdir = Path(workdir).resolve() if workdir is not None else None  # redis-server runs in it
        self.process: subprocess.Popen | None = None
        self._own_workdir = False

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_file(self) -> Path | None:
        return self.workdir / "redis-server.log" if self.workdir is not None else None

    def command(self, binary: str) -> list[str]:
        return [binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--daemonize", "no"]

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = shutil.which(self.binary)
        if binary is None:
            raise RedisServerError(NOT_INSTALLED)
        if self.workdir is None:
            self.workdir, self._own_workdir = Path(tempfile.mkdtemp(prefix="kiln-redis-")), True
        self.workdir.mkdir(parents=True, exist_ok=True)
        check_ports_free({"redis-server": self.port}, HOST, hint="give RedisServer another port")
        with open(self.log_file, "w") as log:
            # its own session (Ctrl-C reaches us; we stop it last), and SIGTERM when we die
            self.process = spawn(self.command(binary), log=log, cwd=self.workdir)
        try:
            self._wait_ready(timeout)
        except BaseException:  # a failed or interrupted start leaves nothing running
            self.stop()
            raise
        return self

    def ping(self) -> bool:
        """Whether a Redis answers PING on the port (ours or, after a crash, nobody's)."""
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5,
                             retry=Retry(NoBackoff(), 0))
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def answering_pid(self) -> int | None:
        """The process id the Redis on the port reports (INFO server); None: no answer."""
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5,
                             retry=Retry(NoBackoff(), 0))
        try:
            return int(client.info("server")["process_id"])
        except (redis.RedisError, KeyError, ValueError):
            return None
        finally:
            client.close()

    def _wait_ready(self, timeout: float) -> None:
        """Until *our* redis-server answers (its process id), never a stranger on the port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisServerError(self._failure(f"redis-server exited with code {self.process.returncode}"))
            if self.answering_pid() == self.process.pid:
                return
            time.sleep(0.02)
        raise RedisServerError(self._failure(f"redis-server did not answer PING after {timeout:.0f}s"))

    def _failure(self, head: str) -> str:
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return head + f" on port {self.port}; the end of its log:\n" + "\n".join(
            "  " + line for line in text.splitlines()[-10:])

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, clients see their connections reset."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """A fresh, empty Redis on the same port (after ``kill()``, or stopping the running one first)."""
        stop_process(self.process, timeout)
        return self.start(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (SIGKILL after ``timeout``); removes the temporary folder it made."""
        stop_process(self.process, timeout)
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir, self._own_workdir = None, False

    def __enter__(self) -> RedisServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
