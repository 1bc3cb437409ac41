"""The deploy dashboard and the autoscaler's adapter rule read Triton series that a running
Triton really exports: scraped from the shared MiniLM server's metrics port after a request."""

from __future__ import annotations

import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient

from kiln.deploy.observability import (
    PROMETHEUS_SYNTHETIC,
    adapter_values,
    dashboard_metric_names,
    grafana_dashboard,
)
from kiln.deploy.observability import promql_metric_names as names_in
from kiln_runtime.contract import TEXT


def exported(metrics_text: str) -> set[str]:
    """Series names in Prometheus' text format (sample lines and # TYPE lines)."""
    names = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(line.split("{")[0].split()[0])
    return names


def test_every_triton_series_the_dashboard_and_the_adapter_query_is_exported(minilm_int8_server):
    spec, server = minilm_int8_server
    text = np.array([[b"scrape me"]], dtype=object)
    inp = grpcclient.InferInput(TEXT, list(text.shape), "BYTES")
    inp.set_data_from_numpy(text)
    grpcclient.InferenceServerClient(server.grpc_url).infer(spec.name, [inp])  # every per-model series has a sample
    scraped = exported(urllib.request.urlopen(server.metrics_url, timeout=10).read().decode())

    (rule,) = adapter_values()["rules"]["custom"]
    # nv_cache_*: only where the served model has the response cache on (an int8 MiniLM need not be
    # batch-invariant, so may have it off): tests/e2e/test_response_cache.py checks those on a cached one
    wanted = {n for n in dashboard_metric_names(grafana_dashboard(spec)) | names_in(rule["metricsQuery"])
              if n not in PROMETHEUS_SYNTHETIC and not n.startswith(("kiln_", "nv_cache_"))}
    assert "nv_inference_queue_duration_us" in wanted
    assert sorted(wanted - scraped) == [], f"Triton exports: {sorted(n for n in scraped if n.startswith('nv_'))}"
