"""Several Tritons behind one gateway: routing, failover and a circuit breaker per backend.

``BackendPool`` answers the endpoints exactly as one ``TritonBackend`` does (``embed``,
``generate``, ``ready``, ``health``, ``close``, ``up``), so the endpoints never learn how many
Tritons there are. Each request goes to the backend with the fewest requests in flight (ties
in turn), among those that are up and whose circuit is closed.

A request that fails because its backend is unreachable (``triton_unavailable``, or the
backend went down during the call) goes to another backend, each at most once. Embeddings
are idempotent, so one that was already in flight on a backend that died is sent again: a
replica kill loses none. A generation is sent again only while it has produced nothing;
after its first chunk the error goes to the endpoint, which ends the stream with an error
event (the client already holds part of one answer, and a second backend would start
another). A 4xx or a model's own error is the same on every backend and is never retried.

A backend that fails ``failure_threshold`` times in a row is taken out (its circuit opens)
for a cool-down that doubles on each failed probe, up to a cap; once the cool-down is over
one readiness probe decides whether it rejoins. A backend that ``TritonBackend`` itself marked
down is out until its own probe finds Triton again. Only unreachability counts against a
circuit: a model that is not loaded, or a broken engine, is reported by /ready, and counting
it would let one missing model take every backend, and so every other model, out.

A pool of one backend is that backend: the same answers and errors, no retries, no circuit
(the backend already refuses at once while its Triton is down); only the counters for
/metrics are added.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kiln.gateway.backend import Chunk, triton_unavailable
from kiln.gateway.protocol import APIError

log = logging.getLogger("kiln.gateway")

FAILURE_THRESHOLD = 3  # consecutive unreachable answers that take a backend out
COOLDOWN_S = 5.0  # the first cool-down; a failed probe doubles it
MAX_COOLDOWN_S = 30.0  # a backend that stays away is still asked twice a minute

CLOSED, OPEN, PROBING = "closed", "open", "probing"
OK, FAILED, ERROR, CANCELLED = "ok", "failed", "error", "cancelled"  # request outcomes, per backend
OUTCOMES = (OK, FAILED, ERROR, CANCELLED)
UNAVAILABLE = triton_unavailable().code


class Backend(Protocol):
    """What the pool needs of a backend: ``TritonBackend``'s interface. ``up`` and ``url`` may
    be missing (then the backend counts as up, and is named by its place in the list)."""

    async def embed(self, model: str, texts: list[str], max_batch: int, request_id: str = "") -> np.ndarray: ...

    def generate(self, model: str, values: dict[str, Any], request_id: str = "") -> AsyncIterator[Chunk]: ...

    async def ready(self, models: list[str]) -> tuple[bool, dict[str, bool]]: ...

    async def health(self, model: str) -> bool: ...

    async def close(self) -> None: ...


class Circuit:
    """One backend's breaker. Closed: serves; ``threshold`` failures in a row open it. Open:
    no requests until the cool-down is over, then ``due`` and one probe (``probing``) decides:
    success closes it and resets the cool-down, failure opens it again for twice as long (up
    to ``max_cooldown_s``)."""

    def __init__(self, threshold: int = FAILURE_THRESHOLD, cooldown_s: float = COOLDOWN_S,
                 max_cooldown_s: float = MAX_COOLDOWN_S, clock: Callable[[], float] = time.monotonic):
        if threshold < 1 or cooldown_s < 0 or max_cooldown_s < cooldown_s:
            raise ValueError(f"circuit: need threshold >= 1 and 0 <= cooldown <= max cooldown (got {threshold}, "
                             f"{cooldown_s}, {max_cooldown_s})")
        self.threshold, self.base_s, self.max_s, self.clock = threshold, cooldown_s, max_cooldown_s, clock
        self.state = CLOSED
        self.streak = 0  # failures in a row while closed
        self.cooldown_s = cooldown_s
        self.reopen_at = 0.0  # clock time the cool-down ends

    @property
    def closed(self) -> bool:
        return self.state == CLOSED

    def due(self) -> bool:
        """Open and its cool-down is over: time for a probe."""
        return self.state == OPEN and self.clock() >= self.reopen_at

    def succeeded(self) -> None:
        if self.state == CLOSED:
            self.streak = 0

    def failed(self) -> bool:
        """One more failure; True when it opened the circuit. Answers of requests that were
        in flight when it opened change nothing: the probe decides."""
        if self.state != CLOSED:
            return False
        self.streak += 1
        if self.streak < self.threshold:
            return False
        self._open(self.base_s)
        return True

    def start_probe(self) -> None:
        self.state = PROBING

    def abandon_probe(self) -> None:
        """A probe that never answered decides nothing: open, and due at once."""
        self.state = OPEN

    def probed(self, ok: bool) -> None:
        if ok:
            self.state, self.streak, self.cooldown_s = CLOSED, 0, self.base_s
        else:
            self._open(min(self.cooldown_s * 2, self.max_s))

    def _open(self, cooldown_s: float) -> None:
        self.state, self.cooldown_s = OPEN, cooldown_s
        self.reopen_at = self.clock() + cooldown_s


@dataclass(eq=False)
class Member:
    """A backend in the pool and what /metrics shows of it."""

    backend: Backend
    url: str
    circuit: Circuit
    outstanding: int = 0  # requests in flight on it now
    requests: int = 0  # requests sent to it (a failover counts on each backend it tried)
    failures: int = 0  # requests it failed as unreachable
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    @property
    def up(self) -> bool:
        return getattr(self.backend, "up", True)


class BackendPool:
    def __init__(self, backends: Sequence[Backend], *, failure_threshold: int = FAILURE_THRESHOLD,
                 cooldown_s: float = COOLDOWN_S, max_cooldown_s: float = MAX_COOLDOWN_S,
                 clock: Callable[[], float] = time.monotonic):
        if not backends:
            raise ValueError("a backend pool needs at least one backend")
        self.members = [Member(b, str(getattr(b, "url", f"backend-{i}")),
                               Circuit(failure_threshold, cooldown_s, max_cooldown_s, clock))
                        for i, b in enumerate(backends)]
        self._failover = len(self.members) > 1  # a pool of one is its backend: no retries, no circuit
        self._turn = 0  # where the next pick starts looking: ties go round robin
        self._probe: asyncio.Task | None = None

    # ------------------------------------------------------------------------- routing
    def _usable(self, m: Member) -> bool:
        if not self._failover:
            return True
        if m.circuit.state != CLOSED:
            if m.circuit.due():
                self._start_probe()
            return False
        return m.up

    def _pick(self, tried: list[Member]) -> Member | None:
        """The usable backend not yet tried with the fewest requests in flight; None when none is left."""
        members = self.members
        n = len(members)
        start = self._turn
        if not tried:  # one turn per request, so a failover does not skip the next request's turn
            self._turn = (start + 1) % n
        best: Member | None = None
        for i in range(n):
            m = members[(start + i) % n]
            if m in tried or not self._usable(m):
                continue
            if best is None or m.outstanding < best.outstanding:
                best = m
        return best

    def _begin(self, m: Member) -> None:
        m.outstanding += 1
        m.requests += 1

    def _end(self, m: Member, outcome: str) -> None:
        m.outstanding -= 1
        m.outcomes[outcome] += 1
        if outcome == OK:
            m.circuit.succeeded()
        elif outcome == FAILED:
            m.failures += 1
            if self._failover and m.circuit.failed():
                log.warning("Triton at %s failed %d times in a row: taken out for %.0fs, then probed", m.url,
                            m.circuit.threshold, m.circuit.cooldown_s)

    @staticmethod
    def _outcome(m: Member, err: BaseException, was_up: bool) -> str:
        """FAILED: the backend could not be reached (it said so, or it went down during the
        call); only this is retried and counted against its circuit."""
        if isinstance(err, (asyncio.CancelledError, GeneratorExit)):
            return CANCELLED
        if not isinstance(err, APIError):
            return ERROR
        if err.status >= 500 and (err.code == UNAVAILABLE or (was_up and not m.up)):
            return FAILED
        return CANCELLED if err.code == "cancelled" else ERROR

    # ------------------------------------------------------------------------- requests
    def _next(self, tried: list[Member], last: APIError | None) -> tuple[Member, bool]:
        """The next backend to try (never one in ``tried``), counted as begun, and whether it
        was up; none left: the last failure, or triton_unavailable when none was usable."""
        m = self._pick(tried)
        if m is None:
            raise last if last is not None else triton_unavailable()
        tried.append(m)
        was_up = m.up
        self._begin(m)
        return m, was_up

    async def embed(self, model: str, texts: list[str], max_batch: int, request_id: str = "") -> np.ndarray:
        """Embeddings from the first backend that answers; idempotent, so one that was in
        flight on a backend that died is sent again."""
        tried: list[Member] = []
        last: APIError | None = None
        while True:
            m, was_up = self._next(tried, last)
            try:
                vectors = await m.backend.embed(model, texts, max_batch, request_id)
            except BaseException as err:
                outcome = self._outcome(m, err, was_up)
                self._end(m, outcome)
                if outcome == FAILED and self._failover:
                    last = err
                    continue
                raise
            self._end(m, OK)
            return vectors

    def generate(self, model: str, values: dict[str, Any], request_id: str = "") -> AsyncIterator[Chunk]:
        """A generation's chunks (an async generator, as ``TritonBackend.generate``): sent to
        another backend only if it failed as unreachable before its first chunk."""
        return self._generate(model, values, request_id)

    async def _generate(self, model: str, values: dict[str, Any], request_id: str) -> AsyncIterator[Chunk]:
        tried: list[Member] = []
        last: APIError | None = None
        while True:
            m, was_up = self._next(tried, last)
            stream = m.backend.generate(model, values, request_id)
            outcome, started, finished = CANCELLED, False, False
            try:
                try:
                    first = await anext(stream)
                except StopAsyncIteration:  # ended with nothing: the endpoint answers that as the backend would
                    outcome = OK
                    return
                started, finished = True, first.final
                yield first
                async for chunk in stream:
                    finished = chunk.final  # the endpoint closes us after the final chunk, without asking for more
                    yield chunk
                outcome = OK
                return
            except BaseException as err:  # GeneratorExit too: the consumer closed us
                outcome = OK if finished else self._outcome(m, err, was_up)
                if outcome == FAILED and not started and self._failover:
                    last = err
                    continue
                raise
            finally:
                self._end(m, outcome)
                await stream.aclose()  # the backend's own cleanup (it cancels its Triton request)

    # ------------------------------------------------------------------------- readiness
    @property
    def up(self) -> bool:
        """Some backend takes requests now."""
        if not self._failover:
            return self.members[0].up
        return any(m.up and m.circuit.closed for m in self.members)

    async def ready(self, models: list[str]) -> tuple[bool, dict[str, bool]]:
        """(some Triton ready, {model: ready on some backend}); never raises. Backends in their
        cool-down are not asked; one whose cool-down is over takes this as its probe."""
        if not self._failover:
            return await self.members[0].backend.ready(models)
        asked = [m for m in self.members if m.circuit.closed or m.circuit.due()]
        answers = await asyncio.gather(*(self._ready_of(m, models) for m in asked))
        live = [states for server, states in answers if server]
        return bool(live), {name: any(states.get(name, False) for states in live) for name in models}

    async def _ready_of(self, m: Member, models: list[str]) -> tuple[bool, dict[str, bool]]:
        probe = not m.circuit.closed
        if probe:
            m.circuit.start_probe()
        try:
            server, states = await m.backend.ready(models)
        except asyncio.CancelledError:
            if probe:  # the caller went away (a client of /ready, shutdown): the next pick probes again
                m.circuit.abandon_probe()
            raise
        except Exception:  # a backend's readiness never raises; one that does is not ready
            log.exception("readiness of %s failed", m.url)
            server, states = False, {}
        if probe:
            m.circuit.probed(bool(server))
            if server:
                log.warning("Triton at %s passed its probe: it takes requests again", m.url)
        return bool(server), states

    def _start_probe(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self.probe())

    async def probe(self) -> None:
        """Ask every backend whose cool-down is over whether its Triton is ready (the router
        starts this in the background when it meets one; /ready does it on its way)."""
        due = [m for m in self.members if m.circuit.due()]
        await asyncio.gather(*(self._ready_of(m, []) for m in due))

    async def wait_probes(self) -> None:
        """Wait for the background probe, if one runs."""
        if self._probe is not None:
            await asyncio.shield(self._probe)

    async def health(self, model: str) -> bool:
        """A generation model's engine works on some backend that takes requests."""
        for m in self.members:
            if (not self._failover or (m.up and m.circuit.closed)) and await m.backend.health(model):
                return True
        return False

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        await asyncio.gather(*(m.backend.close() for m in self.members))

    # ------------------------------------------------------------------------- /metrics
    def stats(self) -> list[dict[str, Any]]:
        """Each backend as /metrics and a person see it."""
        return [{"url": m.url, "up": m.up, "circuit": m.circuit.state, "outstanding": m.outstanding,
                 "requests": m.requests, "failures": m.failures, "outcomes": dict(m.outcomes)}
                for m in self.members]

    async def cache_counts(self, model: str) -> tuple[int, int] | None:
        """Response-cache (hits, misses) for ``model`` summed over the backends that answered
        (each Triton has its own cache); None when none did."""
        counts = [c for c in await asyncio.gather(*(m.backend.cache_counts(model) for m in self.members
                                                   if hasattr(m.backend, "cache_counts"))) if c is not None]
        return (sum(h for h, _ in counts), sum(m for _, m in counts)) if counts else None

    def register_metrics(self, registry: CollectorRegistry) -> PoolCollector:
        """Per-backend gauges and counters, read from ``stats()`` at each scrape."""
        collector = PoolCollector(self)
        registry.register(collector)
        return collector


class PoolCollector:
    """A prometheus-client collector: ``kiln_gateway_backend_up``, ``_circuit_open``,
    ``_outstanding`` and ``_requests_total{outcome}``, labelled by backend URL."""

    def __init__(self, pool: BackendPool):
        self.pool = pool

    def collect(self):
        p = "kiln_gateway_backend_"
        up = GaugeMetricFamily(p + "up", "1 while the backend's Triton answers (it marks itself down when it "
                                         "does not)", labels=["backend"])
        circuit = GaugeMetricFamily(p + "circuit_open", "1 while the pool keeps requests off the backend after "
                                                        "repeated failures (open or probing)", labels=["backend"])
        outstanding = GaugeMetricFamily(p + "outstanding", "requests in flight on the backend", labels=["backend"])
        requests = CounterMetricFamily(p + "requests", "requests sent to the backend, by outcome (ok, failed: "
                                                       "unreachable, error: answered with an error, cancelled)",
                                       labels=["backend", "outcome"])
        for s in self.pool.stats():
            url = s["url"]
            up.add_metric([url], float(s["up"]))
            circuit.add_metric([url], float(s["circuit"] != CLOSED))
            outstanding.add_metric([url], s["outstanding"])
            for outcome, n in s["outcomes"].items():
                requests.add_metric([url, outcome], n)
        return [up, circuit, outstanding, requests]
