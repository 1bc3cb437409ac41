"""Prometheus metrics of the gateway (its own registry, served at GET /metrics).

Routes are labelled by their template (``/v1/chat/completions``), never the raw path, so
a scanner cannot blow up the label space; unknown paths share the label ``other``.

``TRITON_RESTARTS`` belongs to the process, not to one gateway: ``kiln serve``'s supervisor
counts on it and the in-process gateway's /metrics shows it (a ``kiln gateway`` child
process restarts nothing and shows 0).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# a canary's latency is compared by its p95 within 20%: buckets 1.2x apart, 1 ms to ~2 min
CANARY_BUCKETS = tuple(round(0.001 * 1.2 ** i, 6) for i in range(65))
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)

TRITON_RESTARTS = Counter("kiln_triton_restarts", "times this process started Triton again after it died",
                          registry=None)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "kiln_gateway_"
        self.requests = Counter(p + "requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r)
        self.latency = Histogram(p + "request_duration_seconds", "time to the whole answer, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.canary_requests = Counter(p + "canary_requests", "requests while a canary runs (`kiln reload --canary`), "
                                       "by model, arm (stable | canary) and outcome (ok | error)",
                                       ["model", "arm", "outcome"], registry=r)
        self.canary_latency = Histogram(p + "canary_request_duration_seconds", "time in Triton of the requests "
                                        "counted in canary_requests, by model and arm", ["model", "arm"],
                                        buckets=CANARY_BUCKETS, registry=r)
        self.in_flight = Gauge(p + "requests_in_flight", "requests being answered now", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "request start to the first generated text, by model",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "time between streamed chunks, by model", ["model"],
                             buckets=TOKEN_BUCKETS, registry=r)
        self.tokens = Counter(p + "tokens", "tokens processed, by model and direction (prompt / completion)",
                              ["model", "direction"], registry=r)
        self.queue_rejections = Counter(p + "queue_rejections", "requests Triton rejected because its queue was full",
                                        ["model"], registry=r)
        self.shed = Counter(p + "shed", "requests refused at once because their expected queue time exceeded the "
                                        "model's budget", ["model"], registry=r)
        self.rate_limited = Counter(p + "rate_limited", "requests refused by a per-key limit", ["limit"], registry=r)
        self.cancelled = Counter(p + "cancelled_generations", "generations cancelled because the client went away",
                                 ["model"], registry=r)
        self.admin_actions = Counter(p + "admin_actions", "admin requests to reload or roll back a model, by action "
                                     "and outcome (started, conflict: one running already, refused: a bad request, "
                                     "forbidden: not an admin key)", ["action", "outcome"], registry=r)
        # several gateway processes may share a port (`--gateway-workers`): a scrape says which one answered
        Info(p + "process", "the gateway process that answered this scrape", registry=r).info({"pid": str(os.getpid())})
        self.cache = CacheCounts()
        r.register(self.cache)
        r.register(TRITON_RESTARTS)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CacheCounts:
    """``kiln_gateway_response_cache_{hits,misses}_total{model}``: Triton's response-cache
    counts, summed over the backends; the gateway reads them from Triton's statistics before
    each scrape (``set``), so they restart from 0 with a Triton, like any counter."""

    def __init__(self) -> None:
        self.counts: dict[str, tuple[int, int]] = {}

    def set(self, model: str, hits: int, misses: int) -> None:
        self.counts[model] = (hits, misses)

    def collect(self):
        p = "kiln_gateway_response_cache_"
        hits = CounterMetricFamily(p + "hits", "requests Triton answered from its response cache, by model",
                                   labels=["model"])
        misses = CounterMetricFamily(p + "misses", "requests Triton computed and then cached, by model",
                                     labels=["model"])
        for model, (h, m) in sorted(self.counts.items()):
            hits.add_metric([model], h)
            misses.add_metric([model], m)
        return [hits, misses]
