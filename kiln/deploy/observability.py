"""What watching a deployment needs: Prometheus's scrape config, the Prometheus adapter's rule
behind the queue-time autoscaler, and a Grafana dashboard for the gateway and Triton.

The dashboard's queries name only series that are really exported: the gateway's own
(``kiln.gateway.metrics.Metrics``), Triton's (checked against a running Triton by
tests/e2e/test_deploy_metrics.py) and Prometheus's per-target ``up``. :func:`promql_metric_names`
reads them back out of the queries, so the test checks the dashboard as written. Triton's
response-cache series exist only where a model has the cache on, so tests/e2e/test_response_cache.py
checks those on a cached Triton.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kiln.deploy.k8s import (
    HTTP,
    METRICS,
    METRICS_PATH,
    PART_OF,
    QUEUE_TIME_METRIC,
    Names,
)
from kiln_core.spec import DeploymentSpec, Task

# Triton's series the rule and the dashboard read (names as Triton 2.51 / 25.07 export them)
TRITON_QUEUE = "nv_inference_queue_duration_us"  # cumulative queue time, per model
TRITON_SUCCESS = "nv_inference_request_success"
TRITON_FAILURE = "nv_inference_request_failure"
TRITON_REQUEST_TIME = "nv_inference_request_duration_us"  # cumulative end-to-end time in Triton
TRITON_COMPUTE_TIME = "nv_inference_compute_infer_duration_us"
TRITON_PENDING = "nv_inference_pending_request_count"
# the response cache's, per model that has it on (absent from a Triton without --cache-config)
TRITON_CACHE_HITS = "nv_cache_num_hits_per_model"
TRITON_CACHE_MISSES = "nv_cache_num_misses_per_model"
TRITON_CACHE_HIT_TIME = "nv_cache_hit_duration_per_model"  # cumulative µs fetching cached answers
TRITON_CACHE_MISS_TIME = "nv_cache_miss_duration_per_model"  # cumulative µs looking up and inserting on misses
# made by Prometheus for every scrape target, not exported by a server: 1 while the target answers
PROMETHEUS_SYNTHETIC = frozenset({"up"})

TRITON_JOB, GATEWAY_JOB = "kiln-triton", "kiln-gateway"
INSTANCE_LABEL = "kiln_instance"  # the deployment a series came from (the pods' app.kubernetes.io/instance)
RATE = "$__rate_interval"  # Grafana's window for rate(): at least four scrape intervals


# ----------------------------------------------------------------------------- Prometheus
def _pod_label(name: str) -> str:
    """The meta label Prometheus's pod discovery gives a pod label (non-alphanumerics -> '_')."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)


def scrape_job(job: str, component: str, port_name: str) -> dict:
    """Pods of one kiln component, at the container port carrying its metrics. namespace and
    pod become labels: the adapter maps them onto Kubernetes objects for the autoscaler."""
    return {
        "job_name": job,
        "metrics_path": METRICS_PATH,
        "kubernetes_sd_configs": [{"role": "pod"}],
        "relabel_configs": [
            {"source_labels": [_pod_label("app.kubernetes.io/part-of")], "regex": PART_OF, "action": "keep"},
            {"source_labels": [_pod_label("app.kubernetes.io/component")], "regex": component, "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": port_name, "action": "keep"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": [_pod_label("app.kubernetes.io/instance")], "target_label": INSTANCE_LABEL},
        ],
    }


def prometheus_config() -> dict:
    """prometheus.yml for a Prometheus running in the cluster (pod discovery needs its RBAC to
    list pods): Triton's metrics port and the gateway's /metrics, every kiln deployment."""
    return {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "scrape_configs": [scrape_job(TRITON_JOB, "triton", METRICS), scrape_job(GATEWAY_JOB, "gateway", HTTP)],
    }


def queue_time_rule() -> dict:
    """The adapter's rule for the autoscaler's metric: per pod, the average queue time per
    request over the last 30 s (NVIDIA's Helm chart: delta of the queue counter over 1 + the
    requests), taking the most-queued model of the pod (an ensemble's steps each have a queue;
    the slowest one is where pods are missing)."""
    per_model = (f"delta({TRITON_QUEUE}{{<<.LabelMatchers>>}}[30s]) / "
                 f"(1 + delta({TRITON_SUCCESS}{{<<.LabelMatchers>>}}[30s]))")
    return {
        "seriesQuery": f'{TRITON_QUEUE}{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{TRITON_QUEUE}$", "as": QUEUE_TIME_METRIC},
        "metricsQuery": f"max by (<<.GroupBy>>) ({per_model})",
    }


def adapter_values(prometheus_url: str = "http://prometheus-server.monitoring.svc", port: int = 80) -> dict:
    """Values for the prometheus-community/prometheus-adapter Helm chart: where Prometheus is,
    and the one custom rule (the default rules are left off: nothing here reads them)."""
    return {"prometheus": {"url": prometheus_url, "port": port},
            "rules": {"default": False, "custom": [queue_time_rule()]}}


# ----------------------------------------------------------------------------- Grafana
@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)


def _quantiles(series: str, by: str, sel: str) -> tuple[tuple[str, str], ...]:
    """p50 and p95 of a histogram, per ``by`` label."""
    return tuple((f"histogram_quantile({q}, sum by (le, {by}) (rate({series}_bucket{sel}[{RATE}])))",
                  f"p{round(q * 100)} {{{{{by}}}}}") for q in (0.5, 0.95))


def _cache_panels(sel: str) -> list[Panel]:
    """Triton's response cache per model. A ratio's denominator keeps only windows with lookups
    (``> 0``): an idle model shows no point rather than a hit rate of 0."""
    def per_s(series: str) -> str:
        return f"sum by (model) (rate({series}{sel}[{RATE}]))"

    def per(total: str, count: str) -> str:
        return f"{per_s(total)} / ({per_s(count)} > 0)"

    def hit_rate(hits: str, misses: str) -> str:
        return f"{per_s(hits)} / ({per_s(hits)} + {per_s(misses)} > 0)"

    return [
        # the gateway's line: Triton's counts as its gateways read them from the Tritons they call
        # (kiln.gateway.metrics.CacheCounts), a cross-check; only the ratio, as gateways may share a Triton
        Panel("Response cache hit rate by model", "percentunit",
              ((hit_rate(TRITON_CACHE_HITS, TRITON_CACHE_MISSES), "Triton {{model}}"),
               (hit_rate("kiln_gateway_response_cache_hits_total", "kiln_gateway_response_cache_misses_total"),
                "gateway sees {{model}}"))),
        Panel("Response cache hits and misses /s", "reqps",
              ((per_s(TRITON_CACHE_HITS), "hits {{model}}"), (per_s(TRITON_CACHE_MISSES), "misses {{model}}"))),
        Panel("Response cache time per lookup", "µs",
              ((per(TRITON_CACHE_HIT_TIME, TRITON_CACHE_HITS), "hit (fetch) {{model}}"),
               (per(TRITON_CACHE_MISS_TIME, TRITON_CACHE_MISSES), "miss (lookup + insert) {{model}}"))),
    ]


def panels(spec: DeploymentSpec) -> list[Panel]:
    sel = f'{{{INSTANCE_LABEL}="{Names.of(spec).base}"}}'
    per_request = (lambda total: f"sum by (model) (rate({total}{sel}[{RATE}])) / "
                   f"clamp_min(sum by (model) (rate({TRITON_SUCCESS}{sel}[{RATE}])), 1e-9) / 1000")
    # generation is never cached (model_repository.writer.response_cache_mb): no empty panels for it
    cache = _cache_panels(sel) if spec.task is not Task.text_generation and spec.response_cache.enabled else []
    return [
        Panel("Gateway requests/s by route and status", "reqps",
              ((f"sum by (route, status) (rate(kiln_gateway_requests_total{sel}[{RATE}]))", "{{route}} {{status}}"),)),
        Panel("Gateway latency p50 / p95", "s", _quantiles("kiln_gateway_request_duration_seconds", "route", sel)),
        Panel("Time to first token p50 / p95", "s", _quantiles("kiln_gateway_time_to_first_token_seconds", "model", sel)),
        Panel("Inter-token latency p50 / p95", "s", _quantiles("kiln_gateway_inter_token_latency_seconds", "model", sel)),
        Panel("Tokens/s by model and direction", "short",
              ((f"sum by (model, direction) (rate(kiln_gateway_tokens_total{sel}[{RATE}]))", "{{model}} {{direction}}"),)),
        Panel("Triton queue time per request (autoscaler input)", "ms",
              ((per_request(TRITON_QUEUE), "queue {{model}}"),
               (per_request(TRITON_COMPUTE_TIME), "compute {{model}}"),
               (per_request(TRITON_REQUEST_TIME), "in Triton {{model}}"))),
        Panel("Rejections and cancellations /s", "reqps", (
            (f"sum by (model) (rate(kiln_gateway_queue_rejections_total{sel}[{RATE}]))", "queue full {{model}}"),
            (f"sum by (limit) (rate(kiln_gateway_rate_limited_total{sel}[{RATE}]))", "rate limited ({{limit}})"),
            (f"sum by (model) (rate(kiln_gateway_shed_total{sel}[{RATE}]))", "shed (queue budget) {{model}}"),
            (f"sum by (model) (rate(kiln_gateway_cancelled_generations_total{sel}[{RATE}]))", "cancelled {{model}}"),
            (f"sum by (model) (rate({TRITON_FAILURE}{sel}[{RATE}]))", "Triton failures {{model}}"))),
        Panel("Triton requests/s by model", "reqps",
              ((f"sum by (model) (rate({TRITON_SUCCESS}{sel}[{RATE}]))", "{{model}}"),)),
        Panel("Per-backend health (1 = scraped and up)", "short",
              ((f'up{{job=~"{TRITON_JOB}|{GATEWAY_JOB}",{INSTANCE_LABEL}="{Names.of(spec).base}"}}', "{{job}} {{pod}}"),
               (f"min by (backend) (kiln_gateway_backend_up{sel})", "gateway sees Triton {{backend}}"),
               (f"max by (backend) (kiln_gateway_backend_circuit_open{sel})", "circuit open {{backend}}"))),
        Panel("Work in flight per pod", "short", (
            (f"sum by (pod) (kiln_gateway_requests_in_flight{sel})", "gateway {{pod}}"),
            (f"sum by (pod) ({TRITON_PENDING}{sel})", "Triton pending {{pod}}"))),
        *cache,
    ]


def grafana_dashboard(spec: DeploymentSpec) -> dict:
    """A Grafana dashboard (import it, pick the Prometheus data source) for one deployment."""
    base = Names.of(spec).base
    out = []
    for i, panel in enumerate(panels(spec)):
        out.append({
            "id": i + 1, "type": "timeseries", "title": panel.title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
            "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for j, (expr, legend) in enumerate(panel.queries)],
        })
    return {
        "title": f"kiln: {spec.name}", "uid": base[:40], "tags": ["kiln"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"}]},
        "panels": out,
    }


def dashboard_queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


# ----------------------------------------------------------------------------- reading PromQL back
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: identifiers that are not functions or
    aggregations (followed by '('), keywords, label names (inside {} or by (...)), durations or
    Grafana variables. Enough for the expressions kiln writes; not a PromQL parser."""
    text = _STRINGS.sub('""', expr)
    text = _GROUPING.sub(" ", _RANGES.sub("", _MATCHERS.sub("", text)))
    return {m[1] for m in _IDENT.finditer(text) if not m[2] and m[1].lower() not in _KEYWORDS}


def dashboard_metric_names(dashboard: dict) -> set[str]:
    return {name for expr in dashboard_queries(dashboard) for name in promql_metric_names(expr)}

