"""Per-key rate limits: the interface the endpoints use, and its in-memory implementation.

Limits are token buckets that refill continuously (OpenAI describes its own limits this
way): ``rpm`` requests and ``tpm`` tokens per minute. A request takes one request token
and reserves its expected tokens up front (a ``TokenReservation``); once the real usage
is known the reservation is settled, so a key may briefly go into debt and then waits
until the bucket refills. Endpoints depend on ``Limiter`` only, so a limiter shared by
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


class Limiter(Protocol):
    """What the endpoints need from a rate limiter."""

    def check_request(self, principal: Principal) -> None:
        """Take one request (no tokens); raise RateLimited with the wait."""

    def reserve(self, principal: Principal, tokens: int) -> TokenReservation:
        """Take one request and reserve ``tokens`` in one step; raise RateLimited with the wait."""

    def refund(self, principal: Principal, tokens: int) -> None:
        """Give ``tokens`` back to the key's budget (negative: charge them as debt)."""


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

    def _bucket(self, who: str, kind: str, per_minute: int) -> Bucket:
        b = self._buckets.get((who, kind))
        if b is None or b.capacity != per_minute:
            b = self._buckets[(who, kind)] = Bucket(per_minute, per_minute / 60.0)
        return b

    def check_request(self, principal: Principal) -> None:
        """A key in token debt waits too: even a request without tokens needs one in the bucket."""
        self.reserve(principal, 0)

    def reserve(self, principal: Principal, tokens: int) -> TokenReservation:
        lim = principal.limits
        with self._lock:
            now = self._clock()
            req = self._bucket(principal.name, "requests", lim.rpm) if lim.rpm else None
            tok = self._bucket(principal.name, "tokens", lim.tpm) if lim.tpm else None
            for b in (req, tok):
                if b is not None:
                    b.refill(now)
            if req is not None and req.level < 1:
                raise RateLimited(f"Rate limit reached: {lim.rpm} requests per minute for key {principal.name!r}",
                                  req.wait_for(1))
            if tok is not None:
                if tokens > tok.capacity:
                    raise RateLimited(
                        f"Request too large: it needs about {tokens} tokens, over the limit of {lim.tpm} tokens per "
                        f"minute for key {principal.name!r}; send less input or lower max_tokens", 60.0)
                if tok.level < max(tokens, 1):
                    raise RateLimited(f"Rate limit reached: {lim.tpm} tokens per minute for key {principal.name!r}",
                                      tok.wait_for(max(tokens, 1)))
                tok.level -= tokens
            if req is not None:
                req.level -= 1
        return TokenReservation(self, principal, tokens)

    def refund(self, principal: Principal, tokens: int) -> None:
        lim = principal.limits
        if not lim.tpm:
            return
        with self._lock:
            b = self._bucket(principal.name, "tokens", lim.tpm)
            b.refill(self._clock())
            b.level = min(b.capacity, b.level + tokens)
