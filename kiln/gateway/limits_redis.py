"""Per-key rate limits shared by several gateway processes: the same buckets as ``RateLimiter``, in Redis.

One gateway process keeps its buckets in memory (``kiln.gateway.limits.RateLimiter``); N of
them behind a load balancer would each grant the whole limit, N times over. ``RedisRateLimiter``
keeps the same continuous token buckets (``rpm`` requests and ``tpm`` tokens per minute, full
on first use, debt through a negative refund) in one Redis, with the same messages and the
same meaning of ``RateLimited.retry_after``:

- each operation is ONE Lua script, so a read-refill-decide-write cannot interleave with another
  process's (no over-admission under concurrency), and costs one round trip;
- the clock is Redis's own ``TIME``, so processes whose clocks differ still agree on the refill;
- a bucket's key (``kiln:limits:{<key name>}:requests`` / ``:tokens``; the braces keep one key's
  buckets in one Redis Cluster slot) expires when the bucket would be full again, so a missing
  key and an idle one mean the same thing and idle keys cost no memory.

The endpoints call the limiter synchronously from the asyncio event loop. A synchronous
redis-py client with a connection pool is fine there: one script on loopback is one round trip,
about 100 µs on an idle machine (230 µs measured on a busy 2-core one), less than tokenizing the
request. What must not happen is a Redis that hangs stalling every request, hence short socket
timeouts (0.25 s), no client-side retries (a retried script could charge twice), and after a
failure no new attempt for ``retry_interval`` seconds (1 s): an outage costs each process at
most one stalled request per interval.

Redis unreachable: ``fail_open=True`` (the default) serves requests without limits, logs a
warning once per outage (and once when Redis is back) and ``status()`` says "degraded";
``fail_open=False`` refuses with ``LimitsUnavailable`` (a 503) and ``status()`` says "down".
"Unreachable" is no answer within the timeout, or an answer that it cannot take writes now
(a read-only replica after a failover, out of memory, loading).
Refunds are never refused: they settle work already done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from kiln.gateway.auth import Principal
from kiln.gateway.limits import (
    LimitsUnavailable,
    RateLimited,
    RateLimiter,
    TokenReservation,
    TooLarge,
)

log = logging.getLogger("kiln.gateway")

OK, DEGRADED, DOWN = "ok", "degraded", "down"
PREFIX = "kiln:limits"
# no answer, or one that says this Redis cannot take writes now (a replica after a failover, out
# of memory, still loading): either way the limits cannot be kept; other errors are bugs, raised
UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError, redis.OutOfMemoryError)

# Shared by the three scripts. Floats cross as "%.17g" strings both ways: Lua would turn a
# number into an integer reply (or 14 digits), and the buckets must equal RateLimiter's exactly.
_BUCKETS = """
local function now_of(arg)  -- the caller's clock (tests) or, normally, Redis's own
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function refill(key, capacity, now)  -- the level at now; a new bucket (or a new limit) is full
  local b = redis.call('HMGET', key, 'level', 'stamp', 'capacity')
  if not b[1] or tonumber(b[3]) ~= capacity then return capacity end
  return math.min(capacity, tonumber(b[1]) + (now - tonumber(b[2])) * (capacity / 60.0))
end

local function save(key, capacity, level, now)  -- expires when it would be full again
  redis.call('HSET', key, 'level', string.format('%.17g', level), 'stamp', string.format('%.17g', now),
             'capacity', string.format('%d', capacity))
  redis.call('PEXPIRE', key, string.format('%d', math.ceil((capacity - level) / (capacity / 60.0) * 1000) + 1000))
end

local function wait_for(capacity, level, amount)  -- seconds until amount is there
  return string.format('%.17g', (amount - level) / (capacity / 60.0))
end
"""

# KEYS: requests bucket, tokens bucket; ARGV: rpm, tpm (0: unlimited), now ('': TIME).
# -> {0} admitted, {1, wait} out of requests, {2, wait} out of tokens (a key in debt waits too)
CHECK_REQUEST = _BUCKETS + """
local rpm, tpm, now = tonumber(ARGV[1]), tonumber(ARGV[2]), now_of(ARGV[3])
local req, tok
if rpm > 0 then req = refill(KEYS[1], rpm, now) end
if tpm > 0 then tok = refill(KEYS[2], tpm, now) end
local out = {0}
if req and req < 1 then out = {1, wait_for(rpm, req, 1)}
elseif tok and tok < 1 then out = {2, wait_for(tpm, tok, 1)}
elseif req then req = req - 1 end
if req then save(KEYS[1], rpm, req, now) end
if tok then save(KEYS[2], tpm, tok, now) end
return out
"""

# KEYS: tokens bucket; ARGV: tpm, tokens, now. -> {0} reserved, {2, wait} refused
RESERVE = _BUCKETS + """
local tpm, tokens, now = tonumber(ARGV[1]), tonumber(ARGV[2]), now_of(ARGV[3])
local tok, need = refill(KEYS[1], tpm, now), math.max(tonumber(ARGV[2]), 1)
local out = {0}
if tok < need then out = {2, wait_for(tpm, tok, need)} else tok = tok - tokens end
save(KEYS[1], tpm, tok, now)
return out
"""

# KEYS: tokens bucket; ARGV: tpm, tokens (negative: debt), now
REFUND = _BUCKETS + """
local tpm, now = tonumber(ARGV[1]), now_of(ARGV[3])
save(KEYS[1], tpm, math.min(tpm, refill(KEYS[1], tpm, now) + tonumber(ARGV[2])), now)
return 0
"""


def bucket_key(prefix: str, name: str, kind: str) -> str:
    """``kind`` is "requests" or "tokens"; the hash tag ``{name}`` puts a key's two buckets in one
    Cluster slot, which a script touching both needs."""
    return f"{prefix}:{{{name}}}:{kind}"


def redacted(url: str) -> str:
    """The URL for a log line: scheme, host, port and database, never a password."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def refused(kind: int, principal: Principal, wait: float) -> RateLimited:
    """The same message ``RateLimiter`` gives (1: requests, 2: tokens)."""
    lim = principal.limits
    figure = f"{lim.rpm} requests" if kind == 1 else f"{lim.tpm} tokens"
    return RateLimited(f"Rate limit reached: {figure} per minute for key {principal.name!r}", wait)


class _Unenforced:
    """The limiter behind a reservation granted while Redis was unreachable and limits were off:
    nothing was taken, so settling it gives back or charges nothing."""

    def check_request(self, principal: Principal) -> None:
        pass

    def reserve(self, principal: Principal, tokens: int) -> TokenReservation:
        return TokenReservation(self, principal, tokens)

    def refund(self, principal: Principal, tokens: int) -> None:
        pass


class RedisRateLimiter:
    """``RateLimiter``'s buckets in the Redis at ``url``, shared by every process that names it.

    ``clock`` replaces Redis's ``TIME`` (tests only: a fake clock drives both limiters alike);
    ``retry_interval``: after a failure, Redis is not tried again for that many seconds.
    """

    def __init__(self, url: str, *, fail_open: bool = True, prefix: str = PREFIX, timeout: float = 0.25,
                 retry_interval: float = 1.0, clock: Callable[[], float] | None = None):
        self.url, self.fail_open, self.prefix = url, fail_open, prefix
        self.retry_interval = retry_interval
        self._clock = clock
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                            retry=Retry(NoBackoff(), 0))
        self._check = self._client.register_script(CHECK_REQUEST)  # scripts load on first use (and
        self._reserve = self._client.register_script(RESERVE)      # again after a Redis restart)
        self._refund = self._client.register_script(REFUND)
        self._lock = threading.Lock()
        self._reachable = True
        self._retry_at = 0.0  # time.monotonic() before which Redis is not tried again
        self.status()  # an unreachable Redis is logged at start-up, not at the first request

    # ------------------------------------------------------------------ Limiter
    def check_request(self, principal: Principal) -> None:
        lim = principal.limits
        if not lim.rpm and not lim.tpm:
            return
        out = self._run(self._check, [bucket_key(self.prefix, principal.name, "requests"),
                                      bucket_key(self.prefix, principal.name, "tokens")],
                        [lim.rpm or 0, lim.tpm or 0])
        if out is not None and int(out[0]):
            raise refused(int(out[0]), principal, float(out[1]))

    def reserve(self, principal: Principal, tokens: int) -> TokenReservation:
        lim = principal.limits
        if not lim.tpm:
            return TokenReservation(self, principal, tokens)
        if tokens > lim.tpm:
            raise TooLarge(tokens, lim.tpm)
        out = self._run(self._reserve, [bucket_key(self.prefix, principal.name, "tokens")], [lim.tpm, tokens])
        if out is None:
            return TokenReservation(_Unenforced(), principal, tokens)
        if int(out[0]):
            raise refused(int(out[0]), principal, float(out[1]))
        return TokenReservation(self, principal, tokens)

    def refund(self, principal: Principal, tokens: int) -> None:
        """Never raises LimitsUnavailable, even failing closed: it settles a request already
        served (often from a ``with`` block's exit), and a lost refund only errs by ``tokens``."""
        lim = principal.limits
        if lim.tpm:
            self._run(self._refund, [bucket_key(self.prefix, principal.name, "tokens")], [lim.tpm, tokens],
                      refuse=False)

    # ------------------------------------------------------------------ health
    def status(self) -> str:
        """For /ready: "ok", or with Redis unreachable "degraded" (failing open: serving without
        limits) or "down" (failing closed: refusing with 503). Writes a short-lived probe key
        (unless Redis failed less than ``retry_interval`` ago), so an idle gateway notices Redis
        coming back, and a Redis that answers PING but takes no writes is not called "ok"."""
        if time.monotonic() >= self._retry_at:
            try:
                self._client.set(f"{self.prefix}:probe", "1", px=10_000)
            except UNAVAILABLE as err:
                self._failed(err)
            else:
                self._answered()
        if self._reachable:
            return OK
        return DEGRADED if self.fail_open else DOWN

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------ plumbing
    def _run(self, script: Script, keys: list[str], args: list[int], refuse: bool = True) -> list | None:
        """The script's reply; None when Redis is unreachable and the request goes unlimited
        (failing open, or ``refuse=False``); failing closed, LimitsUnavailable."""
        if time.monotonic() >= self._retry_at:
            now = repr(float(self._clock())) if self._clock is not None else ""
            try:
                out = script(keys=keys, args=[*args, now])
            except UNAVAILABLE as err:
                self._failed(err)
            else:
                self._answered()
                return out
        if self.fail_open or not refuse:
            return None
        # the client learns only that it may retry; the log line says which Redis and why
        raise LimitsUnavailable("rate limits cannot be checked right now; retry shortly",
                                max(1.0, self.retry_interval))

    def _failed(self, err: Exception) -> None:
        with self._lock:
            self._retry_at = time.monotonic() + self.retry_interval
            if self._reachable:
                self._reachable = False
                then = ("requests are served WITHOUT rate limits until it answers (failing open)" if self.fail_open
                        else "requests are refused with 503 until it answers (--limits-fail-closed)")
                log.warning("rate limits: Redis at %s is unavailable (%s: %s); %s", redacted(self.url),
                            type(err).__name__, err, then)

    def _answered(self) -> None:
        if self._reachable:  # the common case: no lock
            return
        with self._lock:
            if not self._reachable:
                self._reachable = True
                log.warning("rate limits: Redis at %s answers again; limits are enforced", redacted(self.url))


def limiter_from_url(url: str | None, fail_open: bool = True) -> RateLimiter | RedisRateLimiter:
    """The in-memory buckets for one process (``url`` None), else the buckets in that Redis."""
    return RateLimiter() if url is None else RedisRateLimiter(url, fail_open=fail_open)
