"""The Redis limiter without a Redis: what a gateway does when its Redis is unreachable or
hangs, and the pure helpers. (The buckets themselves are checked against a real redis-server
in tests/functional/test_limits_redis.py.)"""

from __future__ import annotations

import socket
import threading

import pytest

from kiln.gateway.auth import Principal
from kiln.gateway.config import Limits
from kiln.gateway.limits import LimitsUnavailable, TooLarge
from kiln.gateway.limits_redis import RedisRateLimiter, bucket_key, redacted
from kiln.processes import free_port

LIMITED = Principal("k", Limits(rpm=1, tpm=100))


@pytest.fixture
def nowhere() -> str:
    """A Redis URL on a loopback port nobody listens on: connections are refused."""
    return f"redis://127.0.0.1:{free_port()}/0"


def test_failing_open_an_unreachable_redis_admits_everything_and_says_degraded(nowhere):
    rl = RedisRateLimiter(nowhere, retry_interval=0)
    for _ in range(3):  # rpm=1, yet all admitted: limits are off, the service is not
        rl.check_request(LIMITED)
        rl.reserve(LIMITED, 100).settle(500)
    assert rl.status() == "degraded"


def test_failing_closed_an_unreachable_redis_refuses_with_limits_unavailable(nowhere):
    rl = RedisRateLimiter(nowhere, fail_open=False, retry_interval=0)
    with pytest.raises(LimitsUnavailable, match="retry shortly") as err:
        rl.check_request(LIMITED)
    assert err.value.retry_after >= 1  # a Retry-After of 0 would invite a busy loop
    assert "127.0.0.1" not in str(err.value)  # the client is not told where Redis lives; the log is
    with pytest.raises(LimitsUnavailable):
        rl.reserve(LIMITED, 10)
    rl.refund(LIMITED, -50)  # settling a request already served never fails
    assert rl.status() == "down"


def test_without_redis_a_key_without_limits_is_served_and_too_large_is_still_too_large(nowhere):
    rl = RedisRateLimiter(nowhere, fail_open=False)
    free = Principal("free", Limits())
    rl.check_request(free)
    rl.reserve(free, 10**6).settle(10**6)
    with pytest.raises(TooLarge):  # decided from the key's limits alone: a 400, not a 503
        rl.reserve(LIMITED, 101)


def test_an_outage_is_logged_once_however_many_requests_it_meets(nowhere, caplog):
    rl = RedisRateLimiter(nowhere, retry_interval=0)
    for _ in range(5):
        rl.check_request(LIMITED)
    warnings = [r.getMessage() for r in caplog.records if r.name == "kiln.gateway"]
    assert len(warnings) == 1 and "served WITHOUT rate limits" in warnings[0]


def test_a_hanging_redis_is_asked_once_per_retry_interval(caplog):
    """A Redis that accepts connections but never answers: the short socket timeout ends the
    first call, and within retry_interval no request waits on it again."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])  # and never answer
            except OSError:  # closed: the test is over
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        rl = RedisRateLimiter(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", fail_open=False,
                              timeout=0.1, retry_interval=3600)
        for _ in range(10):
            with pytest.raises(LimitsUnavailable):
                rl.check_request(LIMITED)
        assert rl.status() == "down"
        assert len(accepted) == 1  # the start-up probe's connection, timed out; nothing since
        assert "TimeoutError" in caplog.records[0].getMessage()
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


def test_log_lines_never_show_the_redis_password():
    assert redacted("redis://user:s3cret@cache.internal:6380/2") == "redis://cache.internal:6380/2"
    assert redacted("rediss://:s3cret@cache:6379") == "rediss://cache:6379"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_a_keys_two_buckets_share_one_cluster_hash_slot_and_never_another_keys():
    """One script touches both buckets, which Redis Cluster allows only within one slot."""
    keys = {bucket_key("kiln:limits", name, kind)
            for name in ("a", "a:b", "a}", "b") for kind in ("requests", "tokens")}
    assert len(keys) == 8
    assert bucket_key("kiln:limits", "a:b", "tokens") == "kiln:limits:{a:b}:tokens"
