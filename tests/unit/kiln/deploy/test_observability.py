"""kiln.deploy's observability files: every series the Grafana dashboard queries is one the
gateway really exports (its Metrics registry) or one of Triton's (tests/e2e/test_deploy_metrics.py
checks those on a running Triton); Prometheus's scrape jobs find the pods the manifests make,
with the labels the adapter's rule needs; the PromQL reader itself is checked."""

from __future__ import annotations

import json

import pytest

from kiln.deploy import observability, writer
from kiln.deploy.k8s import DeployOptions
from kiln.deploy.observability import (
    PROMETHEUS_SYNTHETIC,
    RATE,
    adapter_values,
    dashboard_metric_names,
    grafana_dashboard,
    prometheus_config,
    promql_metric_names,
)
from kiln.gateway.metrics import Metrics
from kiln_core.spec import ResponseCache, load_spec

SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("", "_count", "_sum", "_created"), "info": ("_info",)}


def exported_names(registry) -> set[str]:
    """Sample names a registry exposes: a labelled family with no children yet has no samples,
    so its names follow from its type (the exposition format's suffixes)."""
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
        names |= {sample.name for sample in family.samples}
    return names


def gateway_registry():
    """The registry a gateway serves: its own metrics and its backend pool's (build_app wires both)."""
    from kiln.gateway.pool import BackendPool

    class Backend:
        url = "127.0.0.1:8001"

    metrics = Metrics()
    BackendPool([Backend()]).register_metrics(metrics.registry)
    return metrics.registry


GATEWAY = exported_names(gateway_registry())


def unexported(dashboard: dict) -> set[str]:
    """Series the dashboard queries that neither the gateway nor Triton nor Prometheus makes."""
    triton = {getattr(observability, n) for n in dir(observability) if n.startswith("TRITON_") and not n.endswith("_JOB")}
    return dashboard_metric_names(dashboard) - GATEWAY - triton - PROMETHEUS_SYNTHETIC


def test_the_promql_reader_finds_series_and_skips_functions_labels_and_durations():
    expr = ('histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{route="/v1/{x}",job=~"b|c"}[$__rate_interval])))'
            ' / ignoring(pod) clamp_min(sum without (model) (b_total offset 5m), 1e-9) and on(pod) up')
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "up"}


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_every_series_the_dashboard_queries_is_exported(name):
    dashboard = grafana_dashboard(load_spec(name))
    assert unexported(dashboard) == set()
    triton = dashboard_metric_names(dashboard) - GATEWAY - PROMETHEUS_SYNTHETIC
    # the e2e tests check them on Triton: test_deploy_metrics.py, test_response_cache.py (nv_cache_*)
    assert triton and all(n.startswith(("nv_inference_", "nv_cache_")) for n in triton)


def test_a_misspelt_series_in_the_dashboard_is_caught():
    dashboard = grafana_dashboard(load_spec("minilm"))
    dashboard["panels"][0]["targets"][0]["expr"] = "sum(rate(kiln_gateway_request_total[5m]))"  # requests_total
    assert unexported(dashboard) == {"kiln_gateway_request_total"}


def test_the_dashboard_shows_what_an_operator_needs():
    names = dashboard_metric_names(grafana_dashboard(load_spec("smollm2")))
    for series in ("kiln_gateway_requests_total",  # request rate
                   "kiln_gateway_request_duration_seconds_bucket",  # p50 / p95 latency
                   "kiln_gateway_time_to_first_token_seconds_bucket", "kiln_gateway_tokens_total",  # TTFT, tokens/s
                   "nv_inference_queue_duration_us", "kiln_gateway_queue_rejections_total",  # queue time, rejections
                   "up"):  # per-backend health
        assert series in names
    queries = " ".join(t["expr"] for p in grafana_dashboard(load_spec("smollm2"))["panels"] for t in p["targets"])
    assert "histogram_quantile(0.5," in queries and "histogram_quantile(0.95," in queries


def test_an_encoders_dashboard_shows_its_response_cache_hit_rate_and_traffic():
    by_title = {p["title"]: p for p in grafana_dashboard(load_spec("minilm"))["panels"]}
    rate = by_title["Response cache hit rate by model"]
    assert rate["fieldConfig"]["defaults"]["unit"] == "percentunit"
    sources = {(observability.TRITON_CACHE_HITS, observability.TRITON_CACHE_MISSES),  # Triton's own
               ("kiln_gateway_response_cache_hits_total", "kiln_gateway_response_cache_misses_total")}  # the gateway's
    ratios = set()
    for target in rate["targets"]:  # hits / (hits + misses), per model, over Grafana's rate window
        numerator, denominator = target["expr"].split(" / ", 1)
        (hits,) = promql_metric_names(numerator)
        (misses,) = promql_metric_names(denominator) - {hits}
        assert "sum by (model) (rate(" in numerator and f"{RATE}]" in numerator and "{{model}}" in target["legendFormat"]
        assert promql_metric_names(denominator) == {hits, misses} and " + " in denominator
        ratios.add((hits, misses))
    assert ratios == sources
    traffic = by_title["Response cache hits and misses /s"]
    assert traffic["fieldConfig"]["defaults"]["unit"] == "reqps"
    assert [promql_metric_names(t["expr"]) for t in traffic["targets"]] == [
        {observability.TRITON_CACHE_HITS}, {observability.TRITON_CACHE_MISSES}]


@pytest.mark.parametrize("name, cache", [("smollm2", ResponseCache()), ("minilm", ResponseCache(enabled=False))])
def test_no_cache_panels_where_the_cache_is_never_on(name, cache):
    """Generation is never cached and a spec may turn the cache off: no panel that stays empty."""
    spec = load_spec(name).model_copy(update={"response_cache": cache})
    names = dashboard_metric_names(grafana_dashboard(spec))
    assert not {n for n in names if n.startswith("nv_cache_") or "response_cache" in n}


def test_the_adapter_rule_reads_only_tritons_series():
    (rule,) = adapter_values()["rules"]["custom"]
    used = promql_metric_names(rule["metricsQuery"]) | promql_metric_names(rule["seriesQuery"])
    assert used == {observability.TRITON_QUEUE, observability.TRITON_SUCCESS}
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_prometheus_finds_the_pods_the_manifests_make_with_the_labels_the_adapter_needs():
    documents = writer.manifests(load_spec("minilm"), "k8s", DeployOptions())
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in documents if d["kind"] == "Deployment"}
    for job in prometheus_config()["scrape_configs"]:
        keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
        targets = set(r.get("target_label") for r in job["relabel_configs"])
        assert {"namespace", "pod"} <= targets
        found = []
        for name, pod in pods.items():
            labels = {"__meta_kubernetes_pod_label_" + k.replace(".", "_").replace("/", "_").replace("-", "_"): v
                      for k, v in pod["metadata"]["labels"].items()}
            ports = [p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])]
            if all(labels.get(src) == regex for src, regex in keep.items() if src != "__meta_kubernetes_pod_container_port_name"):
                if keep["__meta_kubernetes_pod_container_port_name"] in ports:
                    found.append(name)
        assert found, f"job {job['job_name']} scrapes none of {sorted(pods)}"
    assert {j["job_name"] for j in prometheus_config()["scrape_configs"]} == {"kiln-triton", "kiln-gateway"}


def test_the_written_dashboard_is_grafana_json(tmp_path):
    files = writer.write_deploy(load_spec("minilm"), "k8s", DeployOptions(), tmp_path)
    dashboard = json.loads((tmp_path / "grafana-dashboard.json").read_text())
    assert tmp_path / "grafana-dashboard.json" in files
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(p["targets"] for p in dashboard["panels"])
    assert dashboard == grafana_dashboard(load_spec("minilm"))
