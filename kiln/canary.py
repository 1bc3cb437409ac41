"""`kiln reload SPEC --canary PCT`: the new version of an encoder takes a share of the live
traffic first and is promoted or rolled back by what it did.

While the canary runs, the repository card names it (``canary: {model, version, share}``) and
every gateway sends that share of the public model's requests to ``<name>__canary`` (an
ensemble pinned to the new version's steps, no response cache), the rest to the serving
version, counting both arms apart (``kiln_gateway_canary_requests_total{model,arm,outcome}``,
``kiln_gateway_canary_request_duration_seconds{model,arm}``). The reload reads those counts
from every gateway process (``gateway.json`` in the server folder names the gateway and its
workers) until the canary has answered ``min_requests`` or ``max_seconds`` have passed, and
sends the same texts to both versions for their agreement. Promoted when (the issue's rule):

- the canary's error rate is not higher than the serving version's by more than 1 point;
- its p95 is not worse by more than 20% (both from the gateways' histograms, as Prometheus'
  ``histogram_quantile`` reads them);
- the cosine of its answers with the serving version's, on the same texts, passes the new
  variant's own gate (``Parity``'s minimum cosine for its precision).

Otherwise rolled back. Either way the card drops the canary first (gateways stop sending
within a second) and the canary model is unloaded after its requests in flight. Pure parts here
(parsing, quantiles, the verdict) are unit-tested; ``kiln/reload.py`` runs it.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kiln_core.spec import DeploymentSpec

CANARY = "__canary"  # suffix of the ensemble the canary's share goes to
GATEWAY_FILE = "gateway.json"  # kiln.stack writes it in its folder while its gateway runs: {url, workers}
STABLE, CANARY_ARM = "stable", "canary"
SETTLE_S = 2.5  # after the card drops the canary: gateways re-read it within a second, then requests in flight end
_SAMPLE = re.compile(r'^(kiln_gateway_canary_\w+?)(_bucket|_count|_sum|_total)?\{([^}]*)\} ([0-9.eE+-]+|NaN|\+Inf)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class CanaryPlan:
    share: float  # of the public model's requests through the gateways, 0 < share < 1
    min_requests: int = 200  # the canary has answered this many: judge
    max_seconds: float = 60.0  # ... or this long has passed
    max_error_points: float = 0.01  # canary error rate - stable error rate
    max_p95_ratio: float = 1.2  # canary p95 / stable p95

    def __post_init__(self) -> None:
        if not 0.0 < self.share < 1.0:
            raise ValueError(f"a canary's share must lie strictly between 0 and 1 (got {self.share})")


@dataclass
class Arm:
    """One arm's counts (a difference of two scrapes, or one scrape)."""

    ok: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count

    @property
    def requests(self) -> float:
        return self.ok + self.errors

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def p95_s(self) -> float | None:
        return quantile(self.buckets, 0.95)

    def minus(self, earlier: "Arm") -> "Arm":
        return Arm(self.ok - earlier.ok, self.errors - earlier.errors,
                   {b: c - earlier.buckets.get(b, 0.0) for b, c in self.buckets.items()})

    def plus(self, other: "Arm") -> "Arm":
        keys = set(self.buckets) | set(other.buckets)
        return Arm(self.ok + other.ok, self.errors + other.errors,
                   {b: self.buckets.get(b, 0.0) + other.buckets.get(b, 0.0) for b in keys})


def parse_arms(metrics_text: str, model: str) -> tuple[str | None, dict[str, Arm]]:
    """(the process's pid, {arm: Arm}) from one gateway process's /metrics."""
    arms: dict[str, Arm] = {STABLE: Arm(), CANARY_ARM: Arm()}
    pid = None
    for line in metrics_text.splitlines():
        if line.startswith("kiln_gateway_process_info{"):
            pid = dict(_LABEL.findall(line)).get("pid")
            continue
        hit = _SAMPLE.match(line)
        if hit is None:
            continue
        name, suffix, labels, value = hit.group(1), hit.group(2), dict(_LABEL.findall(hit.group(3))), float(hit.group(4))
        if labels.get("model") != model or labels.get("arm") not in arms:
            continue
        arm = arms[labels["arm"]]
        if name == "kiln_gateway_canary_requests" and suffix == "_total":
            if labels.get("outcome") == "ok":
                arm.ok += value
            else:
                arm.errors += value
        elif name == "kiln_gateway_canary_request_duration_seconds" and suffix == "_bucket":
            arm.buckets[math.inf if labels["le"] == "+Inf" else float(labels["le"])] = value
    return pid, arms


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket the rank falls in; None: no
    observations; the highest finite bound when the rank lies in the +Inf bucket."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if math.isinf(b):
                return lower_bound
            if count == lower_count:
                return b
            return lower_bound + (b - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = b, count
    return lower_bound


def scrape(url: str, workers: int, model: str, tries_per_worker: int = 10) -> dict[str, Arm]:
    """Both arms summed over every gateway process behind `url` (several workers share one port:
    each connection reaches one of them, so it asks until it has heard from each)."""
    seen: dict[str, dict[str, Arm]] = {}
    for _ in range(max(1, workers) * tries_per_worker):
        text = urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10).read().decode()
        pid, arms = parse_arms(text, model)
        seen[pid or "?"] = arms
        if len(seen) >= workers:
            break
    total = {STABLE: Arm(), CANARY_ARM: Arm()}
    for arms in seen.values():
        for k in total:
            total[k] = total[k].plus(arms[k])
    return total


def gateways_in(server_dirs: list[Path]) -> list[tuple[str, int]]:
    """(url, workers) of each gateway `kiln serve` runs for these folders."""
    out = []
    for folder in server_dirs:
        path = Path(folder) / GATEWAY_FILE
        if path.is_file():
            data = json.loads(path.read_text())
            out.append((data["url"], int(data.get("workers", 1))))
    return out


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The least cosine between rows of two answers to the same texts."""
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(cos.min())


def cosine_gate(spec: DeploymentSpec, precision: str) -> float:
    """The least cosine the new variant's own gate asks of it against fp32."""
    p = spec.parity
    return {"fp32": p.fp32_min_cosine, "fp16": p.fp16_min_cosine, "int8": p.int8_min_cosine}.get(precision,
                                                                                              p.int8_min_cosine)


@dataclass
class Comparison:
    stable: Arm
    canary: Arm
    agreement: float
    agreement_gate: float
    seconds: float
    plan: CanaryPlan
    reasons: list[str] = field(default_factory=list)  # why it was not promoted (empty: promoted)

    @property
    def promoted(self) -> bool:
        return not self.reasons

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(figure, serving, canary, rule) for the printed table."""
        def pct(v):
            return "-" if v is None else f"{v:.2%}"

        def ms(v):
            return "-" if v is None else f"{v * 1000:.1f} ms"

        s, c = self.stable, self.canary
        return [
            ("requests", f"{s.requests:.0f}", f"{c.requests:.0f}", f">= {self.plan.min_requests} or {self.plan.max_seconds:g} s"),
            ("error rate", pct(s.error_rate), pct(c.error_rate), f"canary <= serving + {self.plan.max_error_points:.0%}"),
            ("p95", ms(s.p95_s()), ms(c.p95_s()), f"canary <= {self.plan.max_p95_ratio:g}x serving"),
            ("cosine, same texts", "", f"{self.agreement:.6f}", f">= {self.agreement_gate:g} (its gate)"),
        ]

    def table(self) -> str:
        lines = [f"canary over {self.seconds:.0f} s ({self.plan.share:.0%} of requests):"]
        lines += [f"  {a:<20} {b:>12} {c:>12}   {d}" for a, b, c, d in [("", "serving", "canary", "rule"), *self.rows()]]
        lines.append("  verdict: " + ("promote" if self.promoted else "roll back: " + "; ".join(self.reasons)))
        return "\n".join(lines)


def judge(stable: Arm, canary: Arm, cos: float, gate: float, seconds: float, plan: CanaryPlan) -> Comparison:
    """The issue's rule (see the module's doc). No canary request, or no serving one to
    compare with, is not promoted: nothing was shown."""
    out = Comparison(stable, canary, cos, gate, seconds, plan)
    if canary.requests == 0 or stable.requests == 0:
        out.reasons.append(f"not enough traffic to compare ({canary.requests:.0f} canary, {stable.requests:.0f} "
                           f"serving requests in {seconds:.0f} s)")
        return out
    if canary.error_rate > stable.error_rate + plan.max_error_points:
        out.reasons.append(f"error rate {canary.error_rate:.2%} vs {stable.error_rate:.2%}")
    cp, sp = canary.p95_s(), stable.p95_s()
    if cp is None or sp is None or cp > plan.max_p95_ratio * sp:
        out.reasons.append(f"p95 {'-' if cp is None else f'{cp * 1000:.1f}'} ms vs "
                           f"{'-' if sp is None else f'{sp * 1000:.1f}'} ms")
    if not cos >= gate:
        out.reasons.append(f"cosine with the serving version {cos:.6f} < {gate:g}")
    return out


def watch(read: Callable[[], dict[str, Arm]], plan: CanaryPlan, clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep, say: Callable[[str], None] = lambda _: None,
          ) -> tuple[Arm, Arm, float]:
    """(serving, canary, seconds): the arms' counts since the start, once the canary has
    answered plan.min_requests or plan.max_seconds have passed."""
    start, t0 = read(), clock()
    last_said = t0
    while True:
        sleep(1.0)
        now = read()
        stable, canary = now[STABLE].minus(start[STABLE]), now[CANARY_ARM].minus(start[CANARY_ARM])
        elapsed = clock() - t0
        if clock() - last_said >= 5.0:
            say(f"canary: {canary.requests:.0f} requests ({canary.errors:.0f} errors), serving {stable.requests:.0f}, "
                f"{elapsed:.0f} s")
            last_said = clock()
        if canary.requests >= plan.min_requests or elapsed >= plan.max_seconds:
            return stable, canary, elapsed
