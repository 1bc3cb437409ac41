"""API keys (kept as SHA-256 digests, compared in constant time) and per-key rate limits.

Limits are token buckets that refill continuously (OpenAI describes its own limits this
way): ``rpm`` requests and ``tpm`` tokens per minute. A request takes one request token
and reserves its expected tokens up front; once the real usage is known the reservation
is settled, so a key may briefly go into debt and then waits until the bucket refills.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kiln.gateway.config import GatewayError, Limits

KEY_PREFIX = "sk-kiln-"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Principal:
    """Who a request comes from, and their limits."""

    name: str
    limits: Limits


ANONYMOUS = Principal("anonymous", Limits())


class KeyStore:
    """Digest -> principal. ``check`` hashes the presented key and compares it with every
    stored digest (hmac.compare_digest, no early exit), so timing reveals neither the key
    nor which entry matched."""

    def __init__(self, entries: list[tuple[str, Principal]]):
        self._entries = [(bytes.fromhex(d), p) for d, p in entries]

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, presented: str | None) -> Principal | None:
        if not self._entries:
            return ANONYMOUS
        if not presented:
            return None
        d = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, d):
                found = principal
        return found

    @classmethod
    def load(cls, keys_file: Path | None, env_keys: list[str], defaults: Limits) -> "KeyStore":
        entries: list[tuple[str, Principal]] = []
        for i, key in enumerate(env_keys):
            entries.append((digest(key), Principal(f"env-{i}", defaults)))
        if keys_file is not None:
            entries += _read_keys_file(Path(keys_file), defaults)
        return cls(entries)


def _read_keys_file(path: Path, defaults: Limits) -> list[tuple[str, Principal]]:
    """YAML list of {name, key | sha256, rpm?, tpm?}; a bare string is a key."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise GatewayError(f"cannot read keys file {path}: {err}") from None
    if isinstance(data, dict) and "keys" in data:
        data = data["keys"]
    if not isinstance(data, list) or not data:
        # an empty file must not quietly turn authentication off
        raise GatewayError(f"{path}: expected a non-empty list of keys (or a mapping with `keys:`)")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            item = {"key": item}
        if not isinstance(item, dict):
            raise GatewayError(f"{path}: entry {i} must be a string or a mapping")
        if ("key" in item) == ("sha256" in item):
            raise GatewayError(f"{path}: entry {i} needs exactly one of `key` or `sha256`")
        d = digest(str(item["key"])) if "key" in item else str(item["sha256"]).lower().removeprefix("sha256:")
        if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
            raise GatewayError(f"{path}: entry {i}: sha256 must be 64 hex digits")
        limits = Limits(rpm=item.get("rpm", defaults.rpm), tpm=item.get("tpm", defaults.tpm))
        out.append((d, Principal(str(item.get("name", f"key-{i}")), limits)))
    return out


# ----------------------------------------------------------------------------- limits
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


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class RateLimiter:
    """Per-principal request and token buckets; thread-safe; the clock is injectable."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], Bucket] = {}

    def _bucket(self, who: str, kind: str, per_minute: int) -> Bucket:
        b = self._buckets.get((who, kind))
        if b is None or b.capacity != per_minute:
            b = self._buckets[(who, kind)] = Bucket(per_minute, per_minute / 60.0)
        return b

    def admit(self, principal: Principal, tokens: int = 0) -> None:
        """Take one request and reserve ``tokens``; raise RateLimited with the wait."""
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

    def settle(self, principal: Principal, reserved: int, used: int) -> None:
        """Replace a reservation with the real usage (refund, or debt to wait off)."""
        lim = principal.limits
        if not lim.tpm or reserved == used:
            return
        with self._lock:
            b = self._bucket(principal.name, "tokens", lim.tpm)
            b.refill(self._clock())
            b.level = min(b.capacity, b.level + reserved - used)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
