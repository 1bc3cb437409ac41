"""SLO verdicts from measured figures: pure functions, no Locust import (unit-tested)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kiln_core.spec import Targets

REJECTION_MARKERS = ("Rejected(", "maximum queue size")  # Locust keeps repr(exception)


@dataclass
class StreamFigures:
    """What a streamed answer's reader feels beyond time to first token."""

    inter_token_p50_ms: float | None
    inter_token_p95_ms: float | None
    tokens_per_s_p50: float | None  # decode rate of one stream, median over streams
    tokens_per_s_mean: float | None
    output_tokens_per_s: float  # completion tokens of all successful streams / run time
    request_p50_ms: float | None  # whole stream, first byte sent to last token
    request_p95_ms: float | None


@dataclass
class Measured:
    requests: int
    failures: int  # all failed requests, rejections included
    rejections: int  # shed under load (Triton's queue full; the gateway's 429s): not broken
    duration_s: float
    p50_ms: float | None  # of `latency_of`: the whole request, or the first token for streams
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    offered_rps: float | None = None  # open loop: the rate the client tried to send
    errors: dict[str, int] = field(default_factory=dict)  # message -> occurrences
    latency_of: str = "latency"  # "latency" (whole request) or "TTFT" (streams: time to first token)
    stream: StreamFigures | None = None

    @property
    def qps(self) -> float:
        """Successful requests per second."""
        return (self.requests - self.failures) / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 1.0

    @property
    def other_failures(self) -> int:
        return self.failures - self.rejections


@dataclass
class Check:
    name: str
    target: str
    measured: str
    passed: bool
    detail: str = ""


def evaluate(targets: Targets, m: Measured) -> list[Check]:
    """One check per target that is set. A run with no successful request fails every
    latency target too: nothing was measured, so nothing was met. For streams the latency
    targets are judged on the time to first token (what a reader waits for; the whole
    stream's length is the answer's length), and requests are whole streams."""
    checks: list[Check] = []
    ok = m.requests - m.failures
    for name, limit, value in (
        ("p50", targets.p50_ms, m.p50_ms),
        ("p95", targets.p95_ms, m.p95_ms),
        ("p99", targets.p99_ms, m.p99_ms),
    ):
        if limit is None:
            continue
        if ok == 0 or value is None:
            checks.append(Check(f"{name} {m.latency_of}", f"<= {limit:g} ms", "no successful request", False,
                                "nothing measured"))
            continue
        passed = value <= limit
        checks.append(Check(
            f"{name} {m.latency_of}", f"<= {limit:g} ms", f"{value:.1f} ms", passed,
            "" if passed else f"{value - limit:.1f} ms over ({value / limit:.2f}x the ceiling)",
        ))
    if targets.min_qps is not None:
        passed = m.qps >= targets.min_qps
        checks.append(Check(
            "throughput", f">= {targets.min_qps:g} QPS", f"{m.qps:.1f} QPS", passed,
            "" if passed else f"{targets.min_qps - m.qps:.1f} QPS short ({m.qps / targets.min_qps:.0%} of the target)",
        ))
    passed = m.requests > 0 and m.error_ratio <= targets.max_error_ratio
    checks.append(Check(
        "error ratio", f"<= {targets.max_error_ratio:.2%}",
        f"{m.error_ratio:.2%} ({m.failures}/{m.requests}, {m.rejections} rejected)", passed,
        "" if passed else ("no request was sent" if m.requests == 0 else f"{m.error_ratio - targets.max_error_ratio:.2%} over"),
    ))
    return checks


def verdict(checks: list[Check]) -> bool:
    return all(c.passed for c in checks)


def count_rejections(errors: dict[str, int]) -> int:
    return sum(n for msg, n in errors.items() if any(k in msg for k in REJECTION_MARKERS))


@dataclass
class CapacityStep:
    offered_rps: float
    measured: Measured
    sustained: bool


def step_sustained(targets: Targets, m: Measured, tolerance: float = 0.9) -> bool:
    """A rate is sustained when p95 meets its target, errors stay within the ratio and the
    server kept up (successful QPS >= tolerance x offered rate)."""
    if m.p95_ms is None or m.requests == 0:
        return False
    p95_ok = targets.p95_ms is None or m.p95_ms <= targets.p95_ms
    kept_up = m.offered_rps is None or m.qps >= tolerance * m.offered_rps
    return p95_ok and m.error_ratio <= targets.max_error_ratio and kept_up


def capacity(steps: list[CapacityStep]) -> float | None:
    """Highest sustained offered rate, like perf_analyzer's latency-threshold search."""
    ok = [s.offered_rps for s in steps if s.sustained]
    return max(ok) if ok else None


def summary(targets: Targets, m: Measured, checks: list[Check], shape: dict, steps: list[CapacityStep] | None = None) -> dict:
    out = {
        "verdict": "PASS" if verdict(checks) else "FAIL",
        "targets": targets.model_dump(),
        "shape": shape,
        "measured": {**asdict(m), "qps": m.qps, "error_ratio": m.error_ratio, "other_failures": m.other_failures},
        "checks": [asdict(c) for c in checks],
    }
    if steps is not None:
        out["capacity_qps"] = capacity(steps)
        out["steps"] = [
            {"offered_rps": s.offered_rps, "qps": s.measured.qps, "p95_ms": s.measured.p95_ms,
             "error_ratio": s.measured.error_ratio, "sustained": s.sustained}
            for s in steps
        ]
    return out
