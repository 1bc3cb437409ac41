"""Per-key rate limits: the interface the endpoints use, and its in-memory implementation.

Limits are token buckets that refill continuously (OpenAI describes its own limits this
way): ``rpm`` requests and ``tpm`` tokens per minute. A request is admitted first (one
request token: cheap, before its body is read or tokenized), then reserves its expected
tokens (a ``TokenReservation``); once the real usage is known the reservation is settled,
so a key may briefly go into debt and then waits until the bucket refills. A request
larger than the whole bucket can never be admitted: ``TooLarge`` (a 400, since a client
retries a 429 forever). Endpoints depend on ``Limiter`` only, so a limiter shared by
several gateway processes (Redis) can replace ``RateLimiter`` without touching them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kiln.gateway.auth import Principal


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class LimitsUnavailable(Exception):
    """The shared limit store (Redis) cannot be reached and the gateway fails closed: a 503 with
    Retry-After, since admitting would break the limit and refusing with a 429 would blame the key."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class TooLarge(Exception):
    """A request that needs more tokens than the key's whole per-minute budget: waiting never helps."""

    def __init__(self, tokens: int, tpm: int):
        super().__init__(f"it needs about {tokens} tokens, more than the limit of {tpm} tokens per minute")
        self.tokens, self.tpm = tokens, tpm


class Limiter(Protocol):
    """What the endpoints need from a rate limiter."""

    def check_request(self, principal: Principal) -> None:
        """Take one request (no tokens; a key in token debt waits too); raise RateLimited with the wait."""

    def reserve(self, principal: Principal, tokens: int) -> TokenReservation:
        """Reserve ``tokens`` for a request already admitted by ``check_request``; raise
        RateLimited with the wait, or TooLarge when no wait would do."""

    def refund(self, principal: Principal, tokens: int) -> None:
        """Give ``tokens`` back to the key's budget (negative: charge them as debt)."""

    def status(self) -> str:
        """For /ready: "ok"; a shared store that cannot be reached: "degraded" (serving without
        limits) or "down" (refusing)."""


class TokenReservation:
    """Tokens held against a key's budget while a request runs, settled once.

    ``settle(used)`` replaces the reservation with the real usage (unused tokens go back,
    extra ones become debt); ``release()`` gives it all back (refused before any work).
    Leaving a ``with`` block unsettled keeps the whole reservation: a client cannot dodge
    its limit by disconnecting or by a failure half-way.
    """

    def __init__(self, limiter: Limiter, principal: Principal, tokens: int):
        self.limiter, self.principal, self.tokens = limiter, principal, tokens
        self.settled = False

    def settle(self, used: int) -> None:
        if self.settled:
            return
        self.settled = True
        if used != self.tokens:
            self.limiter.refund(self.principal, self.tokens - used)

    def release(self) -> None:
        self.settle(0)

    def __enter__(self) -> TokenReservation:
        return self

    def __exit__(self, *exc) -> None:
        self.settle(self.tokens)


@dataclass
class Bucket:
    capacity: float
    per_second: float
    level: float = field(default=-1.0)
    stamp: float = 0.0

    def refill(self, now: float) -> None:
        if self.level < -0.5 and self.stamp == 0.0:  # first use: full
            self.level, self.stamp = self.capacity, now
            return
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_second)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0: now)."""
        short = amount - self.level
        return 0.0 if short <= 0 else short / self.per_second


class RateLimiter:
    """Per-principal request and token buckets in this process; thread-safe; the clock is injectable."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], Bucket] = {}

    def _bucket(self, who: str, kind: str, per_minute: int, now: float) -> Bucket:
        """The principal's bucket of ``kind``, refilled to ``now`` (call with the lock held)."""
        b = self._buckets.get((who, kind))
        if b is None or b.capacity != per_minute:
            b = self._buckets[(who, kind)] = Bucket(per_minute, per_minute / 60.0)
        b.refill(now)
        return b

    def status(self) -> str:
        return "ok"  # in this process: nothing to reach

    def check_request(self, principal: Principal) -> None:
        """A key in token debt waits too: even a request without tokens needs one in the bucket."""
        lim = principal.limits
        with self._lock:
            now = self._clock()
            req = self._bucket(principal.name, "requests", lim.rpm, now) if lim.rpm else None
            tok = self._bucket(principal.name, "tokens", lim.tpm, now) if lim.tpm else None
            if req is not None and req.level < 1:
                raise RateLimited(f"Rate limit reached: {lim.rpm} requests per minute for key {principal.name!r}",
                                  req.wait_for(1))
            if tok is not None and tok.level < 1:
                raise RateLimited(f"Rate limit reached: {lim.tpm} tokens per minute for key {principal.name!r}",
                                  tok.wait_for(1))
            if req is not None:
                req.level -= 1

    def reserve(self, principal: Principal, tokens: int) -> TokenReservation:
        lim = principal.limits
        if lim.tpm:
            if tokens > lim.tpm:
                raise TooLarge(tokens, lim.tpm)
            with self._lock:
                tok = self._bucket(principal.name, "tokens", lim.tpm, self._clock())
                if tok.level < max(tokens, 1):
                    raise RateLimited(f"Rate limit reached: {lim.tpm} tokens per minute for key {principal.name!r}",
                                      tok.wait_for(max(tokens, 1)))
                tok.level -= tokens
        return TokenReservation(self, principal, tokens)

    def refund(self, principal: Principal, tokens: int) -> None:
        lim = principal.limits
        if not lim.tpm:
            return
        with self._lock:
            b = self._bucket(principal.name, "tokens", lim.tpm, self._clock())
            b.level = min(b.capacity, b.level + tokens)
