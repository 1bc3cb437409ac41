"""Keep Triton up under ``kiln serve``: when it dies, start it again on the same ports (the
gateway keeps running and reconnects), waiting longer after each death, and give up with
the reason when it keeps dying.

    supervisor = Supervisor(stack, say=print)
    supervisor.watch(stop)  # until `stop` is set or the gateway ends; raises GaveUp

Each restart is reported with how Triton ended (exit code or signal, its log's last error
lines) and counted in ``kiln_triton_restarts_total``, which the in-process gateway's
/metrics shows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from prometheus_client import Counter

from kiln.gateway.metrics import TRITON_RESTARTS
from kiln.processes import PortBusy
from kiln.server import ServerError, TritonServer
from kiln.stack import Stack

log = logging.getLogger("kiln.supervisor")


@dataclass(frozen=True)
class Backoff:
    """Wait first_s before the first restart, twice as long after each further death within
    window_s (at most max_s); more than max_failures deaths within window_s: give up."""

    first_s: float = 1.0
    max_s: float = 30.0
    max_failures: int = 5
    window_s: float = 300.0

    def delay(self, failures: int) -> float:
        return min(self.first_s * 2 ** (failures - 1), self.max_s)


class GaveUp(RuntimeError):
    """Triton kept dying; the message says how often and how it last ended."""


class Supervisor:
    """Restarts the stack's Tritons when they die. `clock` and `wait` are what unit tests
    replace (no real time passes there)."""

    def __init__(self, stack: Stack, backoff: Backoff = Backoff(), *, say: Callable[[str], None] = log.warning,
                 counter: Counter = TRITON_RESTARTS, clock: Callable[[], float] = time.monotonic):
        self.stack, self.backoff, self.say, self.counter, self.clock = stack, backoff, say, counter, clock
        self.deaths: deque[float] = deque()  # when Triton died or failed to start, within the window
        self.restarts = 0

    def dead(self) -> list[TritonServer]:
        return [b for b in self.stack.backends if b.process is not None and b.process.poll() is not None]

    def watch(self, stop: threading.Event, poll_s: float = 0.5) -> None:
        """Until `stop` is set or the gateway has ended: bring back every Triton that died."""
        gateway = self.stack.gateway
        while not stop.wait(poll_s) and (gateway is None or gateway.running()):
            for backend in self.dead():
                self.revive(backend, stop)

    def revive(self, backend: TritonServer, stop: threading.Event) -> None:
        """Start a dead Triton again, after a backoff, until it is ready; a start that fails
        counts as another death. Returns early when `stop` is set; raises GaveUp."""
        while not stop.is_set():
            now = self.clock()
            self.deaths.append(now)
            while self.deaths[0] < now - self.backoff.window_s:
                self.deaths.popleft()
            report = backend.exit_report()
            if len(self.deaths) > self.backoff.max_failures:
                raise GaveUp(f"Triton died {len(self.deaths)} times within {self.backoff.window_s:.0f}s; giving up. "
                             f"It last ended with {report}")
            delay = self.backoff.delay(len(self.deaths))
            self.say(f"Triton died ({report}); restarting it in {delay:.0f}s")
            if stop.wait(delay):
                return
            self.restarts += 1
            self.counter.inc()
            backend.stop()  # reaps what the dead one left behind
            try:
                backend.start(self.stack.triton_timeout)
            except (ServerError, PortBusy) as err:  # PortBusy: another process took its port meanwhile
                self.say(f"Triton failed to start again: {err}")
                continue
            self.say(f"Triton is back (restart {self.restarts}) on {backend.grpc_url}")
            return
