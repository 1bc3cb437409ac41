"""Per-key rate limits in a real redis-server: the same buckets as the in-memory limiter, one
limit shared by several limiters (threads and OS processes), and what happens when Redis dies."""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import pytest
import redis

from kiln.gateway.auth import Principal
from kiln.gateway.config import Limits
from kiln.gateway.limits import LimitsUnavailable, RateLimited, RateLimiter, TooLarge
from kiln.gateway.limits_redis import RedisRateLimiter, bucket_key, limiter_from_url
from kiln.redis_server import RedisServer
from kiln.processes import free_port


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture(scope="module")
def server():
    with RedisServer() as r:
        yield r


@pytest.fixture
def url(server) -> str:
    """The module's Redis, emptied for each test."""
    with redis.Redis.from_url(server.url) as client:
        client.flushall()
    return server.url


@pytest.fixture(params=["memory", "redis"])
def make_limiter(request, url) -> Callable[[Clock], RateLimiter | RedisRateLimiter]:
    """Both limiters, driven by the same fake clock: every behaviour below must hold for each."""
    made = []

    def make(clock: Clock):
        if request.param == "memory":
            return RateLimiter(clock)
        made.append(RedisRateLimiter(url, clock=clock))
        return made[-1]

    yield make
    for limiter in made:
        limiter.close()


# ----------------------------------------------------------------------------- the same buckets
def test_requests_per_minute_bucket_refills(make_limiter):
    clock = Clock()
    rl, who = make_limiter(clock), Principal("k", Limits(rpm=2))
    rl.check_request(who)
    rl.check_request(who)
    with pytest.raises(RateLimited, match="2 requests per minute for key 'k'") as err:
        rl.check_request(who)
    assert err.value.retry_after == pytest.approx(30)  # one request refills every 30 s
    clock.t += 30
    rl.check_request(who)


def test_tokens_reserve_settle_debt_and_too_large(make_limiter):
    clock = Clock()
    rl, who = make_limiter(clock), Principal("k", Limits(tpm=600))
    rl.reserve(who, 500).settle(100)  # used less than reserved: refunded
    rl.reserve(who, 450).settle(900)  # used more: 400 tokens of debt
    with pytest.raises(RateLimited, match="600 tokens per minute") as err:
        rl.reserve(who, 10)
    assert err.value.retry_after == pytest.approx(41)  # from -400 to 10 at 10 tokens a second
    clock.t += 60
    rl.reserve(who, 10)
    with pytest.raises(TooLarge):  # more than the whole bucket: no wait would ever do
        rl.reserve(who, 601)


def test_admission_takes_the_request_and_the_reservation_only_tokens(make_limiter):
    rl, who = make_limiter(Clock()), Principal("k", Limits(rpm=1, tpm=600))
    rl.check_request(who)
    for _ in range(3):
        rl.reserve(who, 10).settle(10)
    with pytest.raises(RateLimited, match="1 requests per minute"):
        rl.check_request(who)


def test_limits_are_per_key(make_limiter):
    rl = make_limiter(Clock())
    a, b = Principal("a", Limits(rpm=1)), Principal("b", Limits(rpm=1))
    rl.check_request(a)
    rl.check_request(b)
    with pytest.raises(RateLimited):
        rl.check_request(a)


def test_a_key_in_token_debt_waits_even_for_a_request_without_tokens(make_limiter):
    rl, who = make_limiter(Clock()), Principal("k", Limits(tpm=60))
    rl.reserve(who, 60).settle(120)
    with pytest.raises(RateLimited, match="60 tokens per minute") as err:
        rl.check_request(who)
    assert err.value.retry_after == pytest.approx(61)


def test_leaving_unsettled_keeps_the_whole_reservation(make_limiter):
    rl, who = make_limiter(Clock()), Principal("k", Limits(tpm=600))
    with rl.reserve(who, 400):
        pass
    with pytest.raises(RateLimited, match="600 tokens per minute"):
        rl.reserve(who, 201)
    rl.reserve(who, 200)


def test_a_new_limit_for_a_key_starts_a_full_bucket(make_limiter):
    rl = make_limiter(Clock())
    rl.check_request(Principal("k", Limits(rpm=1)))
    rl.check_request(Principal("k", Limits(rpm=2)))  # the key's limit was raised: a fresh bucket
    rl.check_request(Principal("k", Limits(rpm=2)))
    with pytest.raises(RateLimited):
        rl.check_request(Principal("k", Limits(rpm=2)))


def test_a_random_workload_gets_the_same_answers_from_both_limiters(url):
    """Same operations, same clock: the same admissions, messages and waits, call for call."""
    rng = random.Random(7)
    clock = Clock()
    memory, shared = RateLimiter(clock), RedisRateLimiter(url, clock=clock)
    keys = [Principal("a", Limits(rpm=5, tpm=300)), Principal("b", Limits(tpm=120)), Principal("c", Limits(rpm=3))]

    def outcome(call: Callable[[], object]) -> tuple:
        try:
            call()
            return ("admitted",)
        except RateLimited as err:
            return (str(err), round(err.retry_after, 6))
        except TooLarge as err:
            return (str(err),)

    held = {id(memory): [], id(shared): []}
    for _ in range(400):
        who, op, tokens = rng.choice(keys), rng.random(), rng.randint(0, 320)
        clock.t += rng.choice([0, 0, 0.05, 0.5, 3, 20])
        answers = []
        for rl in (memory, shared):
            if op < 0.4:
                answers.append(outcome(lambda: rl.check_request(who)))
            elif op < 0.8:
                answers.append(outcome(lambda: held[id(rl)].append(rl.reserve(who, tokens))))
            else:
                answers.append(outcome(lambda: [r.settle(tokens) for r in held[id(rl)][-1:]]))
        assert answers[0] == answers[1]
    shared.close()


# ----------------------------------------------------------------------------- Redis's own clock
def test_with_redis_time_a_bucket_refills_after_the_wait_it_gave(url):
    rl, who = RedisRateLimiter(url), Principal("k", Limits(tpm=6000))  # 100 tokens a second
    rl.reserve(who, 6000)
    with pytest.raises(RateLimited) as err:
        rl.reserve(who, 50)
    assert 0 < err.value.retry_after <= 0.5
    time.sleep(err.value.retry_after + 0.01)
    rl.reserve(who, 50)


def test_idle_keys_expire_when_their_bucket_would_be_full_again(url):
    rl, who = RedisRateLimiter(url), Principal("k", Limits(rpm=60, tpm=600))
    rl.check_request(who)  # one request of 60 taken: full again in 1 s
    rl.reserve(who, 300)  # half the tokens: full again in 30 s
    with redis.Redis.from_url(url) as client:
        assert 0 < client.pttl(bucket_key("kiln:limits", "k", "requests")) <= 2000
        assert 29_000 < client.pttl(bucket_key("kiln:limits", "k", "tokens")) <= 31_000
        assert set(client.keys("kiln:limits:{*")) == {bucket_key("kiln:limits", "k", kind).encode()
                                         for kind in ("requests", "tokens")}


# ----------------------------------------------------------------------------- one limit, many gateways
def test_two_limiters_with_their_own_pools_share_one_limit_under_concurrent_threads(url):
    """Two "gateway processes" (separate connection pools), 8 threads each, all at once:
    exactly rpm requests and tpm // 100 reservations get through, never one more."""
    clock = Clock()  # frozen: no refill while the threads race, so the count is exact
    gateways = [RedisRateLimiter(url, clock=clock), RedisRateLimiter(url, clock=clock)]
    # two keys: an empty token bucket would refuse requests too (a key without tokens waits)
    requests, tokens = Principal("requests", Limits(rpm=50)), Principal("tokens", Limits(tpm=3000))
    admitted, reserved, start = [], [], threading.Barrier(16)

    def hammer(rl: RedisRateLimiter) -> None:
        start.wait()
        for _ in range(10):
            try:
                rl.check_request(requests)
                admitted.append(1)
            except RateLimited:
                pass
            try:
                reserved.append(rl.reserve(tokens, 100))
            except RateLimited:
                pass

    threads = [threading.Thread(target=hammer, args=(gateways[i % 2],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 50 and len(reserved) == 30
    for rl in gateways:
        rl.close()


WORKER = textwrap.dedent("""
    import sys
    from kiln.gateway.auth import Principal
    from kiln.gateway.config import Limits
    from kiln.gateway.limits import RateLimited
    from kiln.gateway.limits_redis import limiter_from_url

    rl = limiter_from_url(sys.argv[1], fail_open=False)
    who = Principal("shared", Limits(rpm=10))
    print("ready", flush=True)
    sys.stdin.readline()  # go
    admitted = 0
    for _ in range(15):
        try:
            rl.check_request(who)
            admitted += 1
        except RateLimited:
            pass
    print(admitted, flush=True)
""")


def test_two_gateway_processes_share_one_limit_on_redis_time(url, tmp_path):
    """Two OS processes, each trying 15 requests at rpm=10 (one refill every 6 s): 10 in all."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [subprocess.Popen([sys.executable, "-P", str(script), url], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd=tmp_path) for _ in range(2)]
    try:
        assert [w.stdout.readline().strip() for w in workers] == ["ready", "ready"]
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        counts = [int(w.communicate()[0].strip()) for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert sum(counts) == 10, counts


def test_limiter_from_url_picks_memory_or_redis(url):
    assert type(limiter_from_url(None, fail_open=True)) is RateLimiter
    rl = limiter_from_url(url, fail_open=False)
    assert isinstance(rl, RedisRateLimiter) and rl.status() == "ok" and not rl.fail_open


# ----------------------------------------------------------------------------- Redis killed
@pytest.fixture
def dying():
    """A Redis of the test's own, for killing."""
    with RedisServer() as r:
        yield r


def test_fail_open_serves_unlimited_while_redis_is_down_and_enforces_again_after_restart(dying, caplog):
    rl, who = RedisRateLimiter(dying.url, retry_interval=0), Principal("k", Limits(rpm=2, tpm=600))
    rl.check_request(who)
    rl.check_request(who)
    with pytest.raises(RateLimited):
        rl.check_request(who)
    dying.kill()
    with caplog.at_level(logging.WARNING, logger="kiln.gateway"):
        for _ in range(5):  # over the limit, admitted: limits are off, not the service
            rl.check_request(who)
            rl.reserve(who, 600).settle(1200)
        unlimited = rl.reserve(who, 600)
        assert rl.status() == "degraded"
        dying.restart()
        assert rl.status() == "ok"
        unlimited.settle(1200)  # granted while limits were off: settling it charges nothing later
        rl.reserve(who, 600).release()
        rl.check_request(who)  # a fresh Redis: a full bucket
        rl.check_request(who)
        with pytest.raises(RateLimited):
            rl.check_request(who)
    outage = [r.getMessage() for r in caplog.records]
    assert len(outage) == 2  # once when it went, once when it came back, however many requests between
    assert f"Redis at {dying.url} is unavailable" in outage[0] and "WITHOUT rate limits" in outage[0]
    assert "answers again" in outage[1]


def test_fail_closed_refuses_while_redis_is_down_and_enforces_again_after_restart(dying):
    rl, who = RedisRateLimiter(dying.url, fail_open=False, retry_interval=0), Principal("k", Limits(rpm=1, tpm=600))
    reservation = rl.reserve(who, 100)
    dying.kill()
    with pytest.raises(LimitsUnavailable):
        rl.check_request(who)
    with pytest.raises(LimitsUnavailable):
        rl.reserve(who, 10)
    reservation.settle(50)  # a request already served is settled without an error
    rl.check_request(Principal("free", Limits()))  # a key without limits needs no Redis
    assert rl.status() == "down"
    dying.restart()
    assert rl.status() == "ok"
    rl.check_request(who)
    with pytest.raises(RateLimited, match="1 requests per minute"):
        rl.check_request(who)


def test_after_a_failure_redis_is_not_tried_again_until_the_retry_interval(dying):
    """So an outage costs one stalled request per interval, not every request's timeout."""
    rl, who = RedisRateLimiter(dying.url, fail_open=False, retry_interval=3600), Principal("k", Limits(rpm=5))
    rl.check_request(who)
    dying.kill()
    with pytest.raises(LimitsUnavailable):
        rl.check_request(who)
    dying.restart()
    with pytest.raises(LimitsUnavailable):  # Redis is back, but not asked yet
        rl.check_request(who)
    assert rl.status() == "down"
    assert RedisRateLimiter(dying.url, fail_open=False).status() == "ok"  # a limiter of its own asks


def test_a_redis_that_became_a_read_only_replica_counts_as_unavailable(dying):
    """After a failover a client may still reach the old primary, now a replica refusing writes."""
    rl, who = RedisRateLimiter(dying.url, fail_open=False, retry_interval=0), Principal("k", Limits(rpm=5))
    rl.check_request(who)
    with redis.Redis.from_url(dying.url) as admin:
        admin.replicaof("127.0.0.1", free_port())  # a primary nobody runs: read-only from now on
        with pytest.raises(LimitsUnavailable):
            rl.check_request(who)
        assert rl.status() == "down"
        admin.replicaof("NO", "ONE")
    assert rl.status() == "ok"
    rl.check_request(who)
