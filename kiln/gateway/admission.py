"""Load shedding by expected queue time: admit a request only while it can be answered soon.

A fixed cap on requests in flight is either too low (idle capacity) or too high (every
accepted request waits behind hundreds of others: under overload nobody gets a timely
answer). The gateway instead keeps, per model, the requests it has sent to Triton and the
rate at which Triton has been answering them; by Little's law the wait of one more request
is about ``in_flight / rate``. A request whose expected wait exceeds the model's queue
budget is refused at once (503 with Retry-After, in the microseconds it takes to count),
so the accepted ones keep their latency and the server keeps its throughput.

The rate is measured, never configured: completions over a sliding window. Below the
floor (``min_in_flight``, e.g. the model's batch size) every request is admitted, so an
idle model always serves, and the limit grows with the rate as load rises (at equilibrium
``limit = rate x budget``). Pure and clock-injected, so tests drive it with a fake clock.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_S = 2.0  # completions counted over this long to measure the rate
MIN_SPAN_S = 0.25  # a rate from fewer seconds than this is noise
MIN_RETRY_S = 0.05
MAX_RETRY_S = 5.0


class Overloaded(Exception):
    """The model's queue would keep this request longer than its budget."""

    def __init__(self, model: str, in_flight: int, limit: int, wait_s: float, retry_after: float):
        super().__init__(f"Model {model!r} is answering all it can ({in_flight} requests in flight, about "
                         f"{wait_s:.2f} s of queue); retry shortly.")
        self.model, self.in_flight, self.limit, self.wait_s, self.retry_after = model, in_flight, limit, wait_s, retry_after


@dataclass
class ModelLoad:
    budget_s: float
    min_in_flight: int
    in_flight: int = 0
    done: deque[float] = field(default_factory=deque)  # completion times within the window
    since: float | None = None  # first completion seen (the window is shorter before WINDOW_S has passed)


class Admission:
    """Per-model admission by expected queue time; one event loop (no lock)."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s, self._clock = window_s, clock
        self._models: dict[str, ModelLoad] = {}

    def configure(self, model: str, budget_s: float, min_in_flight: int) -> None:
        """Shed ``model``'s requests once their expected wait exceeds ``budget_s``; never below
        ``min_in_flight`` requests in flight."""
        self._models[model] = ModelLoad(budget_s, max(1, min_in_flight))

    def rate(self, model: str) -> float:
        """Requests per second Triton has answered for ``model`` lately."""
        load = self._models[model]
        now = self._clock()
        self._expire(load, now)
        if not load.done or load.since is None:
            return 0.0
        span = max(MIN_SPAN_S, min(self.window_s, now - load.since))
        return len(load.done) / span

    def limit(self, model: str) -> int:
        """Requests in flight the budget allows now: max(floor, rate x budget)."""
        return self._limit(self._models[model], self.rate(model))

    @staticmethod
    def _limit(load: ModelLoad, rate: float) -> int:
        return max(load.min_in_flight, math.floor(rate * load.budget_s))

    def refusal(self, model: str) -> Overloaded | None:
        """Why one more request for ``model`` would be shed now (None: it would be admitted).
        A model that was never configured is not limited here."""
        load = self._models.get(model)
        if load is None or load.in_flight < load.min_in_flight:
            return None
        rate = self.rate(model)  # measured once: the limit and the wait come from the same figure
        limit = self._limit(load, rate)
        if load.in_flight < limit:
            return None
        # the queue's own length in time: a client that waits that long finds room, and
        # many refused clients retrying sooner would only be refused again (at a cost)
        wait = load.in_flight / rate if rate else load.budget_s
        return Overloaded(model, load.in_flight, limit, wait, min(MAX_RETRY_S, max(MIN_RETRY_S, wait)))

    def enter(self, model: str) -> None:
        """Count one more request in flight, or raise ``Overloaded`` with how long to wait."""
        refused = self.refusal(model)
        if refused is not None:
            raise refused
        if model in self._models:
            self._models[model].in_flight += 1

    def leave(self, model: str, answered: bool) -> None:
        """The request is over; ``answered``: Triton did its work (counted in the rate), as
        opposed to a refusal or a failure that cost nothing."""
        load = self._models.get(model)
        if load is None:
            return
        load.in_flight -= 1
        if answered:
            now = self._clock()
            if load.since is None:
                load.since = now
            load.done.append(now)
            self._expire(load, now)

    def in_flight(self, model: str) -> int:
        load = self._models.get(model)
        return load.in_flight if load is not None else 0

    def _expire(self, load: ModelLoad, now: float) -> None:
        cutoff = now - self.window_s
        while load.done and load.done[0] < cutoff:
            load.done.popleft()
        if not load.done:
            load.since = None  # idle: the next burst measures its rate afresh
