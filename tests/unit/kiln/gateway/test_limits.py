"""Per-key rate limits: request and token buckets that refill, and token reservations that
settle with the real usage."""

from __future__ import annotations

import threading

import pytest

from kiln.gateway.auth import Principal
from kiln.gateway.config import Limits
from kiln.gateway.limits import RateLimited, RateLimiter, TooLarge


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_requests_per_minute_bucket_refills():
    clock = Clock()
    rl, who = RateLimiter(clock), Principal("k", Limits(rpm=2))
    rl.check_request(who)
    rl.check_request(who)
    with pytest.raises(RateLimited) as err:
        rl.check_request(who)
    assert 29 < err.value.retry_after <= 30  # one request refills every 30 s
    clock.t += 30
    rl.check_request(who)


def test_tokens_per_minute_reserve_and_settle():
    clock = Clock()
    rl, who = RateLimiter(clock), Principal("k", Limits(tpm=600))
    rl.reserve(who, 500).settle(100)  # used less than reserved: refunded
    rl.reserve(who, 450).settle(900)  # used more: debt
    with pytest.raises(RateLimited) as err:
        rl.reserve(who, 10)
    assert err.value.retry_after > 10
    clock.t += 60
    rl.reserve(who, 10)
    with pytest.raises(TooLarge):  # more than the whole bucket: no wait would ever do
        rl.reserve(who, 601)


def test_admission_takes_the_request_and_the_reservation_only_tokens():
    """A request is counted once, when it is admitted (before its body is read or tokenized)."""
    rl, who = RateLimiter(Clock()), Principal("k", Limits(rpm=1, tpm=600))
    rl.check_request(who)
    for _ in range(3):
        rl.reserve(who, 10).settle(10)
    with pytest.raises(RateLimited, match="1 requests per minute"):
        rl.check_request(who)


def test_limits_are_per_key():
    rl = RateLimiter(Clock())
    a, b = Principal("a", Limits(rpm=1)), Principal("b", Limits(rpm=1))
    rl.check_request(a)
    rl.check_request(b)
    with pytest.raises(RateLimited):
        rl.check_request(a)


def test_a_key_in_token_debt_waits_even_for_a_request_without_tokens():
    rl, who = RateLimiter(Clock()), Principal("k", Limits(tpm=60))
    rl.reserve(who, 60).settle(120)
    with pytest.raises(RateLimited, match="60 tokens per minute") as err:
        rl.check_request(who)
    assert err.value.retry_after == pytest.approx(61)  # back to one token at one token per second


def test_settle_gives_unused_tokens_back():
    rl, who = RateLimiter(Clock()), Principal("k", Limits(tpm=600))
    rl.reserve(who, 500).settle(100)
    rl.reserve(who, 500)  # 100 of the first 500 stay used: 500 are left
    with pytest.raises(RateLimited):
        rl.reserve(who, 1)


def test_a_reservation_settles_once():
    rl, who = RateLimiter(Clock()), Principal("k", Limits(tpm=600))
    reservation = rl.reserve(who, 300)
    reservation.settle(0)
    reservation.settle(600)  # already settled: changes nothing
    rl.reserve(who, 600)


def test_release_after_a_refusal_gives_everything_back():
    rl, who = RateLimiter(Clock()), Principal("k", Limits(tpm=600))
    with pytest.raises(ConnectionError), rl.reserve(who, 600) as reservation:
        try:
            raise ConnectionError("Triton refused the request before any work")
        except ConnectionError:
            reservation.release()
            raise
    rl.reserve(who, 600)


def test_leaving_unsettled_keeps_the_whole_reservation():
    """A client that disconnects mid-generation still pays what it reserved."""
    rl, who = RateLimiter(Clock()), Principal("k", Limits(tpm=600))
    with rl.reserve(who, 400) as reservation:
        pass
    assert reservation.settled
    with pytest.raises(RateLimited, match="600 tokens per minute"):
        rl.reserve(who, 201)


def test_reservations_held_together_cannot_exceed_the_budget():
    rl, who = RateLimiter(Clock()), Principal("k", Limits(tpm=600))
    first = rl.reserve(who, 400)
    with pytest.raises(RateLimited):
        rl.reserve(who, 400)
    first.settle(100)
    rl.reserve(who, 400)


def test_concurrent_reservations_from_threads_stay_within_the_budget():
    rl, who = RateLimiter(Clock()), Principal("k", Limits(tpm=600))
    admitted, refused = [], []
    start = threading.Barrier(16)

    def take() -> None:
        start.wait()
        try:
            admitted.append(rl.reserve(who, 100))
        except RateLimited:
            refused.append(1)

    threads = [threading.Thread(target=take) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 6 and len(refused) == 10
