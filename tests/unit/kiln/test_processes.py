"""kiln.processes: children that end with the process that started them, and ports that are
refused, naming who holds them, instead of shared with a stranger. Real processes and real
sockets; no server of kiln's runs here."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from kiln.processes import PortBusy, check_ports_free, free_port, port_holder, port_in_use, spawn


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


PARENT = textwrap.dedent("""
    import signal, sys, time
    from kiln.processes import spawn
    death = None if sys.argv[1] == "none" else signal.Signals[sys.argv[1]]
    child = spawn([sys.executable, "-c", "import time; time.sleep(60)"], death_signal=death)
    print(child.pid, flush=True)
    time.sleep(60)
""")


def start_parent(death: str) -> tuple[subprocess.Popen, int]:
    """A process that spawns a sleeping child (with the given parent-death signal) and waits."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, death], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONSAFEPATH": "1"})
    return parent, int(parent.stdout.readline())


@pytest.mark.parametrize("death", ["SIGTERM", "SIGKILL"])
def test_a_spawned_child_ends_when_its_parent_is_killed(death):
    parent, child = start_parent(death)
    try:
        assert alive(child)
        parent.kill()  # kill -9: the parent runs no cleanup of its own
        parent.wait()
        assert wait_gone(child, 5), "the child outlived its SIGKILLed parent"
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_without_a_death_signal_the_child_outlives_its_parent():
    """The control: what every kiln child did before (its own session keeps it running)."""
    parent, child = start_parent("none")
    try:
        parent.kill()
        parent.wait()
        time.sleep(0.5)
        assert alive(child)
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_child_that_dies_with_kiln_is_started_only_from_the_main_thread():
    """The kernel signals the child when the *thread* that forked it ends."""
    errors = []

    def start():
        try:
            spawn(["true"])
        except RuntimeError as err:
            errors.append(str(err))

    t = threading.Thread(target=start)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]


def test_a_held_port_is_refused_naming_the_process_that_holds_it():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert port_in_use(port)
        assert port_holder(port).pid == os.getpid()
        with pytest.raises(PortBusy) as err:
            check_ports_free({"Triton HTTP": free_port(), "Triton gRPC": port}, hint="choose another")
        message = str(err.value)
        assert f"Triton gRPC port {port} on 127.0.0.1 is in use, held by pid {os.getpid()}" in message
        assert "or choose another" in message
    assert not port_in_use(port)  # closed: free again (TIME_WAIT is not a holder)
    check_ports_free({"Triton gRPC": port})
