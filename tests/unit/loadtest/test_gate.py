"""loadtest.gate: verdicts from measured figures, named with how far off they are."""

import pytest

from kiln_core.spec import Targets
from loadtest import gate


def _m(requests=100, failures=0, rejections=0, duration=10.0, p50=50.0, p95=200.0, p99=400.0, offered=None):
    return gate.Measured(requests, failures, rejections, duration, p50, None if p50 is None else p50 * 2, p95, p99,
                         offered_rps=offered)


def test_comfortable_run_passes_every_target():
    checks = gate.evaluate(Targets(), _m())
    assert gate.verdict(checks) and [c.name for c in checks] == ["p50 latency", "p95 latency", "p99 latency", "throughput", "error ratio"]


def test_missed_latency_names_target_and_margin():
    checks = gate.evaluate(Targets(p95_ms=100), _m(p95=250))
    bad = [c for c in checks if not c.passed]
    assert [c.name for c in bad] == ["p95 latency"]
    assert "150.0 ms over" in bad[0].detail and "2.50x" in bad[0].detail


def test_low_throughput_and_errors_fail():
    checks = gate.evaluate(Targets(min_qps=50, max_error_ratio=0.01), _m(requests=100, failures=5))
    failed = {c.name: c for c in checks if not c.passed}
    assert set(failed) == {"throughput", "error ratio"}
    assert failed["throughput"].measured == "9.5 QPS"  # successful requests only
    assert "5/100" in failed["error ratio"].measured


def test_unreachable_server_fails_everything_measured():
    m = _m(requests=40, failures=40, p50=None, p95=None, p99=None)
    checks = gate.evaluate(Targets(), m)
    assert not any(c.passed for c in checks)
    assert all(c.measured == "no successful request" for c in checks if "latency" in c.name)


def test_no_request_at_all_is_a_failure_not_a_pass():
    checks = gate.evaluate(Targets(min_qps=None, p50_ms=None, p95_ms=None, p99_ms=None), _m(requests=0, p50=None))
    assert not gate.verdict(checks) and checks[-1].detail == "no request was sent"


def test_unset_targets_are_not_checked():
    checks = gate.evaluate(Targets(p50_ms=None, p99_ms=None, min_qps=None), _m())
    assert [c.name for c in checks] == ["p95 latency", "error ratio"]


def test_rejections_are_counted_apart_from_other_failures():
    errors = {"minilm: Rejected('Exceeds maximum queue size')": 7, "minilm: ConnectionRefused()": 2}
    assert gate.count_rejections(errors) == 7
    m = _m(requests=100, failures=9, rejections=7)
    assert m.other_failures == 2


@pytest.mark.parametrize("p95, qps_ok, sustained", [(100.0, True, True), (2000.0, True, False), (100.0, False, False)])
def test_capacity_step_needs_latency_and_keeping_up(p95, qps_ok, sustained):
    offered = 10.0 if qps_ok else 50.0  # 100 ok requests in 10 s = 10 QPS
    assert gate.step_sustained(Targets(p95_ms=1000), _m(p95=p95, offered=offered)) is sustained


def test_capacity_is_highest_sustained_rate():
    steps = [gate.CapacityStep(r, _m(), ok) for r, ok in ((10, True), (15, True), (22.5, False))]
    assert gate.capacity(steps) == 15
    assert gate.capacity([gate.CapacityStep(10, _m(), False)]) is None
    s = gate.summary(Targets(), _m(), gate.evaluate(Targets(), _m()), {"kind": "capacity"}, steps)
    assert s["capacity_qps"] == 15 and s["verdict"] == "PASS" and len(s["steps"]) == 3


def test_streams_are_gated_on_time_to_first_token_and_say_so():
    m = _m(p50=40, p95=90, p99=150)
    m.latency_of = "TTFT"
    checks = gate.evaluate(Targets(p95_ms=80), m)
    assert [c.name for c in checks] == ["p50 TTFT", "p95 TTFT", "p99 TTFT", "throughput", "error ratio"]
    assert [c.name for c in checks if not c.passed] == ["p95 TTFT"] and "10.0 ms over" in checks[1].detail


def test_stream_figures_reach_the_summary():
    m = _m()
    m.latency_of = "TTFT"
    m.stream = gate.StreamFigures(inter_token_p50_ms=2.0, inter_token_p95_ms=9.0, tokens_per_s_p50=400.0,
                                  tokens_per_s_mean=420.5, output_tokens_per_s=1234.0, request_p50_ms=80.0,
                                  request_p95_ms=200.0)
    s = gate.summary(Targets(), m, gate.evaluate(Targets(), m), {"kind": "users", "protocol": "openai"})
    assert s["measured"]["latency_of"] == "TTFT"
    assert s["measured"]["stream"]["tokens_per_s_p50"] == 400.0 and s["measured"]["stream"]["output_tokens_per_s"] == 1234.0
    assert gate.summary(Targets(), _m(), [], {})["measured"]["stream"] is None


def test_gateway_rejections_count_by_their_exception_type():
    errors = {"""m: Rejected("queue_full (HTTP 429): Model 'm' is at capacity")""": 4,
              "m: RateLimitError(\"Error code: 429 - {'code': 'insufficient_quota'}\")": 1}
    assert gate.count_rejections(errors) == 4
