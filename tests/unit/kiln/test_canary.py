"""kiln.canary without servers: the gateway's own /metrics text parsed per arm, p95 from its
histogram buckets, the promote / roll back rule, and the window (a fake clock)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from kiln.canary import (
    CANARY_ARM,
    STABLE,
    Arm,
    CanaryPlan,
    agreement,
    judge,
    parse_arms,
    quantile,
    watch,
)
from kiln.gateway.metrics import Metrics

PLAN = CanaryPlan(share=0.1, min_requests=200, max_seconds=60)


def observed(stable: list[float], canary: list[float], errors: tuple[int, int] = (0, 0), model: str = "m") -> str:
    """The /metrics text a gateway process gives after these answers (seconds) and errors."""
    m = Metrics()
    for arm, times, bad in ((STABLE, stable, errors[0]), (CANARY_ARM, canary, errors[1])):
        for t in times:
            m.canary_requests.labels(model, arm, "ok").inc()
            m.canary_latency.labels(model, arm).observe(t)
        for _ in range(bad):
            m.canary_requests.labels(model, arm, "error").inc()
    m.canary_requests.labels("other", STABLE, "ok").inc(99)  # another model's counts are not read
    return m.render().decode()


def test_the_arms_are_read_back_from_the_gateways_own_metrics_with_its_pid():
    rng = np.random.default_rng(0)
    stable, canary = list(rng.uniform(0.01, 0.05, 300)), list(rng.uniform(0.02, 0.1, 40))
    pid, arms = parse_arms(observed(stable, canary, errors=(1, 2)), "m")
    assert pid == str(os.getpid())
    assert (arms[STABLE].ok, arms[STABLE].errors, arms[CANARY_ARM].ok, arms[CANARY_ARM].errors) == (300, 1, 40, 2)
    assert arms[STABLE].buckets[math.inf] == 300
    # p95 from 1.2x-apart buckets is within a bucket of the exact one
    for arm, times in ((STABLE, stable), (CANARY_ARM, canary)):
        exact = float(np.quantile(times, 0.95))
        assert exact / 1.2 <= arms[arm].p95_s() <= exact * 1.2


def test_quantile_reads_buckets_as_prometheus_does():
    buckets = {0.1: 50.0, 0.2: 90.0, 0.4: 100.0, math.inf: 100.0}
    assert quantile(buckets, 0.5) == pytest.approx(0.1)
    assert quantile(buckets, 0.7) == pytest.approx(0.15)  # linear within (0.1, 0.2]
    assert quantile(buckets, 0.95) == pytest.approx(0.3)
    assert quantile({0.1: 0.0, math.inf: 0.0}, 0.95) is None
    assert quantile({0.1: 0.0, math.inf: 5.0}, 0.95) == 0.1  # all beyond the last bound: that bound


def test_differences_of_scrapes_count_only_the_window():
    _, before = parse_arms(observed([0.01] * 10, [0.01] * 5), "m")
    _, after = parse_arms(observed([0.01] * 30, [0.02] * 5 + [0.01] * 5, errors=(0, 1)), "m")
    window = after[CANARY_ARM].minus(before[CANARY_ARM])
    assert (window.ok, window.errors) == (5, 1) and window.buckets[math.inf] == 5
    assert after[STABLE].minus(before[STABLE]).requests == 20


def arm(n: int, p95_s: float, errors: int = 0) -> Arm:
    return Arm(n, errors, {p95_s / 2: 0.5 * n, p95_s: 0.95 * n, p95_s * 2: n, math.inf: n})


def test_the_canary_is_promoted_within_the_issues_margins_and_rolled_back_past_any():
    ok = judge(arm(1000, 0.100, errors=10), arm(200, 0.118, errors=3), 0.9995, 0.999, 30, PLAN)
    assert ok.promoted and "promote" in ok.table() and "p95" in ok.table()
    worse_errors = judge(arm(1000, 0.1, errors=10), arm(200, 0.1, errors=5), 1.0, 0.999, 30, PLAN)  # 2.5% vs 1%
    slower = judge(arm(1000, 0.1), arm(200, 0.125), 1.0, 0.999, 30, PLAN)  # 1.25x
    disagrees = judge(arm(1000, 0.1), arm(200, 0.1), 0.99, 0.999, 30, PLAN)
    idle = judge(arm(1000, 0.1), Arm(), 1.0, 0.999, 60, PLAN)
    assert [r.reasons[0].split()[0] for r in (worse_errors, slower, disagrees, idle)] == ["error", "p95", "cosine", "not"]
    assert not any(r.promoted for r in (worse_errors, slower, disagrees, idle))
    assert "roll back: not enough traffic" in idle.table()


def test_the_window_ends_at_enough_canary_requests_or_at_its_time():
    t = [0.0]
    reads = iter([{STABLE: arm(n * 10, 0.1), CANARY_ARM: arm(n, 0.1)} for n in (3, 50, 120, 230, 400)])
    stable, canary, seconds = watch(lambda: next(reads), PLAN, clock=lambda: t[0],
                                    sleep=lambda s: t.__setitem__(0, t[0] + s))
    assert canary.requests == 227 and stable.requests == 2270 and seconds == 3.0  # since the first read
    t[0] = 0.0
    slow = watch(lambda: {STABLE: arm(10, 0.1), CANARY_ARM: arm(1, 0.1)}, CanaryPlan(0.1, 200, 5),
                 clock=lambda: t[0], sleep=lambda s: t.__setitem__(0, t[0] + s))
    assert slow[2] == 5.0 and slow[1].requests == 0


def test_agreement_is_the_least_row_cosine():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 1.0]])
    assert agreement(a, b) == pytest.approx(1 / math.sqrt(2))


def test_a_share_outside_zero_and_one_is_refused():
    for share in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError):
            CanaryPlan(share)
