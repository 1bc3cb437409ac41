"""kiln.supervisor with a fake Triton and a fake clock: a dead Triton comes back after a
backoff that doubles, deaths long ago are forgotten, and one that keeps dying makes it
give up naming how Triton ended. No server runs and no real time passes."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry, Counter

from kiln.server import ServerError
from kiln.supervisor import Backoff, GaveUp, Supervisor


class FakeProcess:
    def __init__(self, returncode=None):
        self.returncode = returncode

    def poll(self):
        return self.returncode


class FakeTriton:
    """`starts` scripts each start: True comes up, False dies while starting."""

    def __init__(self, starts: list[bool]):
        self.starts, self.process, self.calls = list(starts), FakeProcess(), []
        self.grpc_url = "127.0.0.1:1"

    def die(self, code: int) -> None:
        self.process.returncode = code

    def exit_report(self) -> str:
        return f"exit code {self.process.returncode}"

    def stop(self) -> None:
        self.calls.append("stop")

    def start(self, timeout: float) -> None:
        self.calls.append("start")
        if not self.starts.pop(0):
            self.process = FakeProcess(returncode=1)
            raise ServerError("tritonserver exited with code 1")
        self.process = FakeProcess()


class FakeGateway:
    def __init__(self):
        self.up = True

    def running(self) -> bool:
        return self.up


@dataclass
class FakeStack:
    backends: list
    gateway: FakeGateway | None = None
    triton_timeout: float = 1.0


@dataclass
class Clock:
    """The stop event and the clock at once: waiting moves time on; `stop_after` waits set it."""

    now: float = 0.0
    waits: list[float] = field(default_factory=list)
    stop_after: int | None = None
    on_wait: object = None

    def __call__(self) -> float:
        return self.now

    def is_set(self) -> bool:
        return self.stop_after is not None and len(self.waits) >= self.stop_after

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        if self.on_wait:
            self.on_wait(len(self.waits))
        return self.is_set()


def supervisor(triton: FakeTriton, clock: Clock, backoff=Backoff(), gateway=None) -> tuple[Supervisor, list, Counter]:
    said: list[str] = []
    counter = Counter("restarts", "test", registry=CollectorRegistry())
    sup = Supervisor(FakeStack([triton], gateway), backoff, say=said.append, counter=counter, clock=clock)
    return sup, said, counter


def test_a_dead_triton_is_started_again_after_a_second_and_counted():
    triton, clock = FakeTriton([True]), Clock()
    sup, said, counter = supervisor(triton, clock)
    triton.die(-9)
    assert sup.dead() == [triton]
    sup.revive(triton, clock)
    assert clock.waits == [1.0] and triton.calls == ["stop", "start"]
    assert sup.dead() == [] and sup.restarts == 1 and counter._value.get() == 1
    assert "exit code -9" in said[0] and "restarting it in 1s" in said[0] and "back" in said[-1]


def test_the_backoff_doubles_to_its_cap_and_then_the_supervisor_gives_up():
    triton, clock = FakeTriton([False] * 10), Clock()
    sup, said, counter = supervisor(triton, clock, Backoff(first_s=1, max_s=4, max_failures=4, window_s=300))
    triton.die(-11)
    with pytest.raises(GaveUp, match="died 5 times within 300s.*exit code 1"):
        sup.revive(triton, clock)
    assert clock.waits == [1, 2, 4, 4]
    assert sup.restarts == 4 and counter._value.get() == 4 and triton.calls.count("start") == 4
    assert "exit code -11" in said[0] and any("failed to start again" in s for s in said)


def test_deaths_longer_ago_than_the_window_are_forgotten():
    triton, clock = FakeTriton([True] * 6), Clock()
    sup, _, _ = supervisor(triton, clock, Backoff(max_failures=2, window_s=60))
    for _ in range(6):  # one death every ~2 minutes: never "too often"
        triton.die(-9)
        sup.revive(triton, clock)
        clock.now += 120
    assert clock.waits == [1.0] * 6 and sup.restarts == 6


def test_a_stop_during_the_backoff_starts_nothing():
    triton, clock = FakeTriton([True]), Clock(stop_after=1)
    sup, _, counter = supervisor(triton, clock)
    triton.die(-9)
    sup.revive(triton, clock)
    assert triton.calls == [] and sup.restarts == 0 and counter._value.get() == 0


def test_watch_revives_what_died_and_ends_with_the_gateway():
    triton, gateway = FakeTriton([True]), FakeGateway()

    def script(n: int) -> None:
        if n == 2:
            triton.die(-9)  # Triton dies between two polls
        if n == 6:
            gateway.up = False  # later the gateway ends on its own

    clock = Clock(on_wait=script)
    sup, _, _ = supervisor(triton, clock, gateway=gateway)
    sup.watch(clock, poll_s=0.5)
    assert triton.calls == ["stop", "start"] and sup.restarts == 1
    assert clock.waits == [0.5, 0.5, 1.0, 0.5, 0.5, 0.5]  # polls, the backoff second, polls until the gateway ended


@pytest.mark.parametrize("failures, delay", [(1, 1), (2, 2), (3, 4), (5, 16), (6, 30), (20, 30)])
def test_backoff_delays(failures, delay):
    assert Backoff().delay(failures) == delay
