"""Launch the real Triton Inference Server that ships in the `nvidia-pytriton` wheel.

No container: the wheel carries `tritonserver`, the python backend and per-Python
stubs. We assemble a backend directory with the stub for the running interpreter,
put the wheel's bundled libraries on LD_LIBRARY_PATH and this environment's bin/ first
on PATH (the stub finds its site-packages from it, as PyTriton does), start the
server, wait for readiness, and on a failed model load surface Triton's own errors.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kiln.processes import check_ports_free, free_port, spawn, stop_process
from kiln_core.card import RepositoryCard
from kiln_core.spec import Ports


class ServerError(RuntimeError):
    """Triton did not come up; the message carries Triton's own error lines."""


def _wheel_root() -> Path:
    import pytriton

    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise ServerError(f"no tritonserver binary under {root}: is nvidia-pytriton installed?")
    return root


SHM_PREFIX = "kiln_triton_pb"  # the python backend's shared-memory regions: /dev/shm/kiln_triton_pb*
SHM_DIR = Path("/dev/shm")


def remove_stale_shm_regions(shm_dir: Path = SHM_DIR, prefix: str = SHM_PREFIX) -> list[Path]:
    """Remove the python backend's shared-memory regions that no running process has open or
    mapped (what a killed Triton leaves behind: each region holds a model's tensors, and
    /dev/shm is memory). Returns what was removed."""
    stale = [p for p in shm_dir.glob(prefix + "*") if p.is_file()]
    if not stale:
        return []
    in_use = shm_in_use()
    removed = []
    for path in stale:
        if str(path) not in in_use:
            try:
                path.unlink()
                removed.append(path)
            except OSError:  # another user's, or gone already
                pass
    return removed


def shm_in_use() -> set[str]:
    """Every file path a running process has mapped or open (as far as this user can read)."""
    paths: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                parts = line.split(maxsplit=5)
                if len(parts) == 6:
                    paths.add(parts[5].removesuffix(" (deleted)"))
            for fd in (proc / "fd").iterdir():
                paths.add(os.readlink(fd))
        except OSError:
            continue
    return paths


def free_ports() -> Ports:
    return Ports(http=free_port(), grpc=free_port(), metrics=free_port())


def prepare_backends(dest: Path) -> Path:
    """backends/python with the stub for this Python; returns the backend directory."""
    root = _wheel_root()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the nvidia-pytriton wheel has no python-backend stub for Python {py}")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in [*(root / "backends" / "python").glob("*.*"), stub]:
        target = python_dir / src.name
        if not target.exists() or target.stat().st_size != src.stat().st_size:
            shutil.copy2(src, target)
    return dest


def server_env() -> dict[str, str]:
    root = _wheel_root()
    libs = root.parent.parent / "nvidia_pytriton.libs"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    # The stub's embedded interpreter ignores PYTHONPATH; it takes its prefix (and so this
    # environment's site-packages, via pyvenv.cfg) from the first `python3` on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), env.get("PATH", "")])
    env["PYTHONSAFEPATH"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # ORT sets its own intra-op threads per model
    return env


_ERROR_LINE = re.compile(r"^(E\d{4} |.*\b(UNAVAILABLE|INVALID_ARG|INTERNAL|error|Error|failed)\b)")


def error_lines(log_text: str, limit: int = 20) -> list[str]:
    """Triton's own error lines from its log (load failures, python tracebacks)."""
    lines = [l for l in log_text.splitlines() if _ERROR_LINE.search(l)]
    harmless = ("Failed to initialize NVML", "DCGM", "Unable to create DCGM", "cudaGetDeviceCount", "CUDA driver",
                "CudaDriverHelper", "pinned system memory")  # a CPU-only machine, said at every start
    return [l for l in lines if not any(h in l for h in harmless)][-limit:]


# Triton's admin APIs (the same set and header as triton/Dockerfile): answered only to requests
# carrying `kiln-admin: <key>`. Inference, health, metadata, model config and statistics stay open.
ADMIN_HEADER = "kiln-admin"
CONNECTION_FILE = "triton.json"  # in the server's folder while it runs: its addresses and admin key
RESTRICTED_APIS = "shared-memory,logging,trace,model-repository"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # Triton reads a gRPC restriction's header under this prefix


def card_cache_mb(repo: Path) -> float:
    """The response-cache size a repository's card asks for (0: none, or no readable card:
    the cache is a setting of the card, and a repository without one runs without it)."""
    try:
        return float(json.loads(RepositoryCard.path(repo).read_text()).get("response_cache_mb", 0) or 0)
    except (OSError, ValueError, AttributeError):
        return 0


def restricted_api_args(admin_key: str) -> list[str]:
    """Triton 2.51's own restriction of its admin APIs, on HTTP and gRPC alike: Triton 2.51 is
    listed by the 2025 advisories, and loading models or mapping shared memory must not be open
    to whoever reaches its port."""
    rule = f"{RESTRICTED_APIS}:{ADMIN_HEADER}={admin_key}"
    return [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]


@dataclass
class TritonServer:
    repository: Path | list[Path]  # one kiln repository, or several served together
    ports: Ports = field(default_factory=Ports)
    workdir: Path = Path("build/server")
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    # Triton's local response cache, in MiB (0: none); None: the largest its repositories' cards ask for
    cache_mb: float | None = None  # (a fraction of a MiB: the tests' small caches)
    # the admin APIs' key: drawn per server unless given (KILN_ADMIN_KEY), kept across restarts
    admin_key: str = field(default_factory=lambda: os.environ.get("KILN_ADMIN_KEY") or secrets.token_hex(16))
    # what this Triton answers as its name (`GET /v2`, `--id`), kept across restarts: readiness is
    # believed only from a server that says it, never from whoever else holds the port
    server_id: str = field(default_factory=lambda: f"kiln-{secrets.token_hex(8)}")

    def admin_headers(self, protocol: str = "http") -> dict[str, str]:
        """Headers for Triton's restricted APIs (repository index and control, logging, trace,
        shared memory); over gRPC Triton expects the header under its own prefix."""
        return {(GRPC_HEADER_PREFIX if protocol == "grpc" else "") + ADMIN_HEADER: self.admin_key}

    @property
    def repositories(self) -> list[Path]:
        return list(self.repository) if isinstance(self.repository, (list, tuple)) else [self.repository]

    @property
    def log_file(self) -> Path:
        return self.workdir / "tritonserver.log"

    @property
    def previous_log_file(self) -> Path:
        return self.workdir / "tritonserver.previous.log"

    def exit_report(self, limit: int = 5) -> str:
        """How a dead Triton ended, for a person: its exit code (or signal) and its log's last error lines."""
        code = self.process.returncode if self.process is not None else None
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        lines = error_lines(text, limit)
        return how + ("; last errors in its log:\n" + "\n".join("  " + l for l in lines) if lines
                      else f"; no error lines in {self.log_file}")

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    def response_cache_mb(self) -> float:
        """The response cache's size: ``cache_mb``, else the largest any repository's card asks for."""
        if self.cache_mb is not None:
            return self.cache_mb
        return max((card_cache_mb(r) for r in self.repositories), default=0)

    def command(self) -> list[str]:
        cache_mb = self.response_cache_mb()
        return [
            str(_wheel_root() / "bin" / "tritonserver"),
            *(f"--model-repository={r.resolve()}" for r in self.repositories),
            f"--backend-directory={(self.workdir / 'backends').resolve()}",
            f"--cache-directory={(_wheel_root() / 'caches').resolve()}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            # every model at start, then loads and unloads only when kiln asks (`kiln reload`,
            # with the admin key): a new version goes in beside the serving one
            "--model-control-mode=explicit",
            "--load-model=*",
            "--log-verbose=0",
            f"--id={self.server_id}",
            # the python backend's shared-memory regions under kiln's own prefix: a Triton killed
            # before it could remove them leaves files that the next start recognises and removes
            f"--backend-config=python,shm-region-prefix-name={SHM_PREFIX}",
            *restricted_api_args(self.admin_key),
            *([f"--cache-config=local,size={int(cache_mb * 2**20)}"] if cache_mb > 0 else []),
            *self.extra_args,
        ]

    @property
    def port_map(self) -> dict[str, int]:
        return {"Triton HTTP": self.ports.http, "Triton gRPC": self.ports.grpc, "Triton metrics": self.ports.metrics}

    def check_ports(self) -> None:
        """PortBusy, naming the port and who holds it, when one of this Triton's ports is taken."""
        check_ports_free(self.port_map, hint="choose other ports (--http-port, --grpc-port, --metrics-port)")

    def start(self, timeout: float = 180.0) -> "TritonServer":
        """Start Triton and wait until *it* is ready. Raises PortBusy (before anything starts)
        when one of its ports is held by another process, ServerError when it does not come up."""
        for repo in self.repositories:
            if not RepositoryCard.exists(repo):
                raise ServerError(f"{repo} is not a kiln model repository: run `kiln repo` first")
        self.check_ports()
        self.workdir.mkdir(parents=True, exist_ok=True)
        prepare_backends(self.workdir / "backends")
        remove_stale_shm_regions()
        if self.log_file.exists():  # a restart: keep the log of the run that died
            self.log_file.replace(self.previous_log_file)
        with open(self.log_file, "w") as log:
            # its own session (Ctrl-C reaches kiln, which stops Triton in order); SIGTERM when kiln
            # dies however it dies: Triton then unloads its models and its stubs end with it
            self.process = spawn(self.command(), log=log, env=server_env(), cwd=self.workdir)
        self.wait_ready(timeout)
        self.write_connection()
        return self

    @property
    def connection_file(self) -> Path:
        return self.workdir / CONNECTION_FILE

    def write_connection(self) -> None:
        """Where this Triton answers and its admin key, readable by this user only: what
        `kiln reload` in another process needs to load and unload model versions."""
        path = self.connection_file
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"grpc": self.grpc_url, "http": self.http_url, "admin_key": self.admin_key,
                       "server_id": self.server_id, "pid": self.process.pid if self.process else None}, f)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def answering_id(self) -> str | None:
        """The name the server on this Triton's HTTP port gives (`GET /v2`); None: no answer."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2", timeout=2) as r:
                return json.loads(r.read()).get("name")
        except (OSError, ValueError, AttributeError):
            return None

    def ready(self) -> bool:
        """This Triton runs, the server on its port is this one (its id), and it is ready."""
        if not self.running() or self.answering_id() != self.server_id:
            return False
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(self._failure(f"tritonserver exited with code {self.process.returncode}"))
            if self.ready():
                return
            time.sleep(0.25)
        self.stop()
        raise ServerError(self._failure(f"tritonserver was not ready after {timeout:.0f}s"))

    def _failure(self, head: str) -> str:
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        lines = error_lines(text) or text.splitlines()[-20:]
        return head + f" (log: {self.log_file})\n" + "\n".join("  " + l for l in lines)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Triton drains in-flight requests and unloads its models; a Triton that died leaves
        its python-backend stubs behind (its own process group), which are killed here."""
        if self.process is not None and self.process.poll() is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.connection_file.unlink(missing_ok=True)
        return stop_process(self.process, timeout)

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
