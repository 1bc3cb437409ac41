"""`kiln bench --replicas 2` on the tiny BERT, with real servers: two Tritons, a gateway over
both and one over the first. Few rounds and a short window: the figures are checked for
being there and finite, never against a wall-clock bar."""

from __future__ import annotations

import json
import math

from rich.console import Console

from kiln.bench_replicas import path_name, run_replica_bench
from kiln_testkit import tiny_spec


def test_replica_bench_measures_both_gateways_and_its_requests_reach_both_tritons(tiny_bert, tmp_path):
    from export.pipeline import run_export

    spec = tiny_spec(tiny_bert, tmp_path, name="tiny-bench-replicas", precisions=["fp32"])
    run_export(spec)
    console = Console(record=True, width=200)
    result = run_replica_bench(spec, console, replicas=2, rounds=30, seconds=2.0, runs=1, clients=4)
    one, two = path_name(1), path_name(2)

    routing = {r.path: r for r in result.routing}
    assert sorted(routing) == sorted([one, two])
    assert all(r.requests == 30 and 0 < r.p50_ms <= r.p95_ms and math.isfinite(r.p95_ms) for r in routing.values())
    assert routing[one].added_p50_ms is None and math.isfinite(routing[two].added_p50_ms)
    paired = result.paired
    assert paired.rounds == 30 and paired.low_ms <= paired.median_ms <= paired.high_ms
    assert result.target.value == paired.median_ms and result.target.verdict in ("PASS", "MISS")
    assert result.pool["backends"] == 2 and 0 < result.pool["bare_us"] < result.pool["pool_us"]

    throughput = {r.path: r for r in result.throughput}
    assert sorted(throughput) == sorted([one, two])
    for r in throughput.values():
        assert r.requests > 0 and r.errors == 0, r
        assert math.isfinite(r.per_s) and r.per_s > 0 and math.isfinite(r.x_one_backend)
    assert throughput[one].x_one_backend == 1.0

    # the 2-backend gateway's /metrics: each Triton answered some; the other gateway used the first only
    first, second = result.backends
    pooled, single = result.backend_requests[two], result.backend_requests[one]
    assert sorted(pooled) == sorted([first, second]) and pooled[first] > 0 and pooled[second] > 0, pooled
    assert list(single) == [first] and single[first] > 0, single

    text = console.export_text()
    assert "routing overhead: tiny-bench-replicas" in text and "throughput: tiny-bench-replicas" in text
    doc = json.loads(result.path.read_text())
    assert result.path.parent == spec.root and result.path.name == "bench-replicas.json"
    assert [r["path"] for r in doc["throughput"]["rows"]] == [one, two]
    assert doc["routing"]["target"]["threshold"] == 1.0 and doc["backend_requests"][two] == pooled
    assert doc["routing"]["paired"]["median_ms"] == paired.median_ms and doc["routing"]["pool_in_process"]["pool_us"] > 0
    assert doc["machine"]["flags_line"] and "vnni" in doc["machine"]
