"""kiln.bench's arithmetic on made-up timings: no model, no server."""

import json

import pytest

from kiln.bench import (
    ONNXRUNTIME,
    PYTORCH,
    SERVED,
    BenchRow,
    add_ratios,
    evaluate_targets,
    latency_percentiles,
    make_row,
    request_batches,
    sentence_pool,
    write_results,
)
from kiln.spec import load_spec


def test_percentiles_are_in_milliseconds_and_interpolated():
    latencies = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    p50, p95 = latency_percentiles(latencies)
    assert p50 == pytest.approx(50.5)
    assert p95 == pytest.approx(95.05)


def test_percentiles_refuse_an_empty_run():
    with pytest.raises(ValueError, match="nothing was timed"):
        latency_percentiles([])


def test_row_throughput_counts_sentences_over_wall_time():
    # 8 concurrent clients, 40 batch-1 requests of 0.2 s each, finished in 1 s of wall time
    row = make_row("served", SERVED, "int8", 1, [0.2] * 40, wall_s=1.0, concurrency=8)
    assert row.sentences_per_s == pytest.approx(40.0)
    assert row.requests == 40 and row.p50_ms == pytest.approx(200.0)
    # 4 sequential batch-32 requests in 2 s
    assert make_row("ort", ONNXRUNTIME, "int8", 32, [0.5] * 4, wall_s=2.0).sentences_per_s == pytest.approx(64.0)


def _row(kind, precision, batch, sps, concurrency=1):
    return BenchRow(kind, kind, precision, batch, concurrency, 10, sps, 1.0, 2.0)


ROWS = [
    _row(PYTORCH, "fp32", 1, 8.0),
    _row(PYTORCH, "fp32", 32, 40.0),
    _row(ONNXRUNTIME, "fp32", 32, 176.0),
    _row(ONNXRUNTIME, "int8", 1, 200.0),
    _row(ONNXRUNTIME, "int8", 32, 440.0),
    _row(SERVED, "int8", 1, 100.0),
    _row(SERVED, "int8", 32, 352.0),
    _row(SERVED, "int8", 1, 300.0, concurrency=8),
]


def test_ratios_compare_the_same_batch_and_the_served_precision():
    rows = add_ratios(ROWS, "int8")
    by = {(r.kind, r.precision, r.batch, r.concurrency): r for r in rows}
    assert by[(SERVED, "int8", 32, 1)].x_pytorch == pytest.approx(352 / 40)
    assert by[(SERVED, "int8", 32, 1)].served_over_inprocess == pytest.approx(352 / 440)
    assert by[(SERVED, "int8", 1, 8)].served_over_inprocess == pytest.approx(300 / 200)
    assert by[(ONNXRUNTIME, "fp32", 32, 1)].x_pytorch == pytest.approx(176 / 40)
    assert by[(ONNXRUNTIME, "fp32", 32, 1)].served_over_inprocess is None  # only served rows get one
    assert by[(PYTORCH, "fp32", 1, 1)].x_pytorch == pytest.approx(1.0)


def test_targets_pass_and_miss_on_the_figures():
    targets = evaluate_targets(ROWS, "int8", batch=32)
    assert targets["served_vs_inprocess"].value == pytest.approx(0.8)
    assert targets["served_vs_inprocess"].verdict == "PASS"
    assert targets["served_vs_pytorch"].value == pytest.approx(8.8)
    assert targets["served_vs_pytorch"].passed is True

    slow = [r if r.kind != SERVED or r.batch != 32 else _row(SERVED, "int8", 32, 200.0) for r in ROWS]
    targets = evaluate_targets(slow, "int8", batch=32)
    assert targets["served_vs_inprocess"].verdict == "MISS"  # 200 / 440 = 0.45 < 0.7
    assert targets["served_vs_pytorch"].verdict == "MISS"  # 200 / 40 = 5 < 8


def test_targets_ignore_the_concurrent_row_and_say_when_a_row_is_missing():
    # only the concurrent served row at batch 1: the batch-1 target reads the single-client row
    assert evaluate_targets(ROWS, "int8", batch=1)["served_vs_inprocess"].value == pytest.approx(0.5)
    no_served = [r for r in ROWS if r.kind != SERVED]
    t = evaluate_targets(no_served, "int8", batch=32)["served_vs_pytorch"]
    assert t.value is None and t.passed is None and t.verdict == "N/A"


def test_requests_walk_round_the_sentence_pool():
    pool = sentence_pool(["a", "b", "c"], 5)
    assert pool == ["a", "b", "c", "a", "b"]
    assert request_batches(pool, 2, 3) == [["a", "b"], ["c", "a"], ["b", "a"]]
    with pytest.raises(ValueError):
        sentence_pool([], 4)


def test_results_land_in_bench_json_under_the_spec_root(tmp_path):
    spec = load_spec("minilm", workdir=str(tmp_path))
    rows = add_ratios(ROWS, "int8")
    path = write_results(spec, rows, evaluate_targets(rows, "int8"), {"served_vs_inprocess_min_cosine": 1.0}, {})
    assert path == tmp_path / "minilm" / "bench.json"
    doc = json.loads(path.read_text())
    assert len(doc["rows"]) == len(ROWS)
    assert doc["targets"]["served_vs_inprocess"]["passed"] is True
    assert doc["rows"][-1]["concurrency"] == 8


def test_gateway_overhead_rows_subtract_the_direct_grpc_median():
    from kiln.bench_gateway import MAX_ADDED_P50_MS, overhead_rows, target_row

    lat = {"Triton gRPC (direct)": [0.010, 0.011, 0.012], "gateway, HTTP keep-alive (float)": [0.0115, 0.0125, 0.0135],
           "gateway, openai client (base64)": [0.020, 0.021, 0.022]}
    rows = overhead_rows(lat, "Triton gRPC (direct)", 1)
    added = {r.path: r.added_p50_ms for r in rows}
    assert added["Triton gRPC (direct)"] is None
    assert abs(added["gateway, HTTP keep-alive (float)"] - 1.5) < 1e-9 and abs(added["gateway, openai client (base64)"] - 10) < 1e-9
    assert target_row(rows) == (added["gateway, HTTP keep-alive (float)"], True)
    slow = overhead_rows({**lat, "gateway, HTTP keep-alive (float)": [0.0135, 0.0145]}, "Triton gRPC (direct)", 1)
    value, passed = target_row(slow)
    assert value > MAX_ADDED_P50_MS and passed is False
    assert target_row(rows, batch=32) == (None, None)  # not measured is not a pass


def test_interleaved_times_every_path_each_round():
    from kiln.bench_gateway import interleaved

    seen = []
    out = interleaved({"a": lambda i: seen.append(("a", i)), "b": lambda i: seen.append(("b", i))}, rounds=3, warmup=1)
    assert [len(v) for v in out.values()] == [3, 3]
    assert seen[2:] == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
