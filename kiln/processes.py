"""Child processes that end with kiln, on ports nobody else answers.

Every server kiln starts (Triton, gateway worker processes, redis-server, the benchmarks'
baselines) is started by ``spawn``: in a session of its own, so Ctrl-C reaches kiln, which
stops them in order; and with a parent-death signal (Linux ``PR_SET_PDEATHSIG``), so a kiln
that is killed (``kill -9``, the OOM killer, a crash) takes them with it instead of leaving
them running and holding their ports::

    with open(log_path, "w") as log:
        process = spawn(command, log=log, env=env, cwd=workdir)

The kernel sends the signal when the *thread* that started the child ends, not the process:
``spawn`` therefore refuses to start a child that must die with its parent from any thread
but the main one (which lives as long as kiln does).

Before a server starts, ``check_ports_free`` makes sure its ports are not held: a port held by
another process (an orphan of an earlier run, another program) is refused with a
``PortBusy`` that names the port and, where it can be seen, the process holding it. Nothing
of kiln's may answer through a stranger.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import subprocess
import threading
from dataclasses import dataclass
from typing import IO, Mapping, Sequence

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _parent_death_hook(sig: signal.Signals):
    """The child's pre-exec step: ask the kernel for ``sig`` when the parent ends; if the parent
    ended already (between fork and here), end now. Resolved here, in the parent, so the child
    runs no import and no lookup between fork and exec."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent, number = os.getpid(), int(sig)

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, number, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), number)

    return hook


def spawn(command: Sequence[str], *, log: IO | int | None = None, env: Mapping[str, str] | None = None,
          cwd: os.PathLike | str | None = None, death_signal: signal.Signals | None = signal.SIGTERM,
          stdin: IO | int | None = subprocess.DEVNULL) -> subprocess.Popen:
    """Start ``command`` in its own session, its output to ``log`` (stdout and stderr); with
    ``death_signal`` (default SIGTERM, None: none) the kernel sends it that signal when this
    process ends, however it ends."""
    if death_signal is not None and threading.current_thread() is not threading.main_thread():
        raise RuntimeError("a child that dies with kiln must be started from the main thread (the kernel signals "
                           "the child when the thread that started it ends)")
    return subprocess.Popen(list(command), stdin=stdin, stdout=log, stderr=subprocess.STDOUT if log is not None else None,
                            env=None if env is None else dict(env), cwd=cwd, start_new_session=True,
                            preexec_fn=None if death_signal is None else _parent_death_hook(death_signal))


def stop_process(p: subprocess.Popen | None, timeout: float) -> int | None:
    """SIGTERM a child started in its own session; SIGKILL its group if it outlives timeout."""
    if p is None or p.poll() is not None:
        return p.returncode if p else None
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()
    return p.returncode


# ----------------------------------------------------------------------------- ports
@dataclass(frozen=True)
class PortHolder:
    pid: int | None  # None: the socket is someone's this user cannot see
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command})" if self.pid is not None else self.command


class PortBusy(RuntimeError):
    """A port a server of kiln's was to listen on is held by another process."""

    def __init__(self, what: str, host: str, port: int, holder: PortHolder | None, hint: str = ""):
        self.what, self.host, self.port, self.holder = what, host, port, holder
        held = f"held by {holder}" if holder is not None else "held by a process this user cannot see"
        super().__init__(f"{what} port {port} on {host} is in use, {held}; stop that process"
                         + (f" or {hint}" if hint else "") + ".")


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether binding ``host:port`` fails because someone holds it (as a listening server would find)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed socket's TIME_WAIT is not a holder
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def port_holder(port: int) -> PortHolder | None:
    """The process listening on ``port`` (any address), where this user may see it."""
    import psutil

    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
            if c.pid is None:
                return PortHolder(None, "a process of another user")
            try:
                proc = psutil.Process(c.pid)
                line = " ".join(proc.cmdline()) or proc.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                line = "gone or hidden"
            return PortHolder(c.pid, line if len(line) <= 160 else line[:157] + "...")
    return None


def check_ports_free(ports: Mapping[str, int], host: str = "127.0.0.1", hint: str = "") -> None:
    """Raise ``PortBusy`` for the first of ``{what: port}`` that is held on ``host``."""
    for what, port in ports.items():
        if port and port_in_use(port, host):
            raise PortBusy(what, host, port, port_holder(port), hint)
