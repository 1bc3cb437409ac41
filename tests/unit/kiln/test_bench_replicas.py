"""kiln.bench_replicas on made-up latencies and outcomes: the routing overhead's rows and
verdict, the throughput rows and ratios, what the tables say, the per-backend counts read
from /metrics, and the second gateway's config. No server runs here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from rich.console import Console

from kiln.bench_gateway import overhead_rows
from kiln.bench_replicas import (
    MAX_ROUTING_ADDED_P50_MS,
    alternating,
    backend_ok_counts,
    one_backend_gateway,
    paired_difference,
    path_name,
    pool_cost_us,
    routing_table,
    routing_target,
    task_kind,
    throughput_row,
    throughput_table,
    window_rate,
    with_ratios,
)
from kiln.faults import Outcome
from kiln.stack import Stack
from kiln_core.spec import Ports, load_spec, parse_spec

ONE, TWO = path_name(1), path_name(2)


def rendered(table) -> str:
    console = Console(record=True, width=250)
    console.print(table)
    return console.export_text()


def closed_run(n: int, seconds: float, status: int = 200, tokens: int = 0, start: float = 0.0) -> list[Outcome]:
    """`n` back-to-back answers of `seconds` each from one client, starting at `start`."""
    return [Outcome(status, seconds, True, start + i * seconds, tokens=tokens) for i in range(n)]


# ----------------------------------------------------------------------------- routing overhead
def routing_rows(added_s: float) -> list:
    one = [0.004 + 0.0001 * i for i in range(200)]  # 4.0 .. 23.9 ms: p50 ~ 13.95 ms
    return overhead_rows({ONE: one, TWO: [x + added_s for x in one]}, ONE, 1)


def test_the_pool_row_adds_its_p50_over_the_one_backend_row_and_the_baseline_adds_nothing():
    rows = routing_rows(0.0004)
    by_path = {r.path: r for r in rows}
    assert by_path[ONE].added_p50_ms is None and by_path[ONE].requests == 200
    assert by_path[TWO].added_p50_ms == pytest.approx(0.4)
    assert by_path[TWO].p95_ms > by_path[TWO].p50_ms


@pytest.mark.parametrize("added_s, verdict", [(0.0004, "PASS"), (-0.0002, "PASS"), (0.0015, "MISS")])
def test_routing_target_passes_at_or_under_one_millisecond_added(added_s, verdict):
    one = [0.004 + 0.0001 * i for i in range(200)]
    target = routing_target(paired_difference([x + added_s for x in one], one), 2, "embedding")
    assert target.threshold == MAX_ROUTING_ADDED_P50_MS == 1.0 and target.at_most
    assert target.verdict == verdict
    assert target.value == pytest.approx(added_s * 1e3)


def test_routing_target_is_not_applicable_unmeasured_and_names_chat_ttft():
    assert routing_target(None, 2, "embedding").verdict == "N/A"
    assert "time to first token" in routing_target(None, 2, "chat").description


def test_the_paired_difference_cancels_drift_that_the_difference_of_medians_keeps():
    """Rounds drift from 5 to 45 ms and the two paths' samples are not equally spread over the
    drift (the N-backend path ran slower rounds more often): medians differ by ~8 ms, while
    each round's own difference is 0.3 ms, which the paired median reports, interval included."""
    drift = [0.005 + 0.0002 * i for i in range(200)]
    one = drift
    two = [x + 0.0003 for x in drift]
    # reorder the 2-backend samples as if its slow rounds were over-represented: same pairs kept
    rows = overhead_rows({ONE: one[:100] + one[:100], TWO: two[100:] + two[100:]}, ONE, 1)
    assert next(r for r in rows if r.path == TWO).added_p50_ms > 5  # the unpaired figure is misled
    paired = paired_difference(two, one)
    assert paired.median_ms == pytest.approx(0.3) and paired.low_ms == pytest.approx(0.3)
    assert paired.high_ms == pytest.approx(0.3) and paired.rounds == 200
    noisy = paired_difference([x + (0.002 if i % 2 else -0.002) for i, x in enumerate(one)], one)
    assert noisy.low_ms < 0 < noisy.high_ms  # noise of +-2 ms: the interval says so
    with pytest.raises(ValueError):
        paired_difference([0.1], [0.1, 0.2])


def test_the_pools_own_cost_is_measured_against_a_bare_await_of_one_backend():
    cost = pool_cost_us(2, calls=2000, repeats=2)
    assert cost["backends"] == 2 and cost["pool_us"] > cost["bare_us"] > 0
    assert cost["added_us"] == pytest.approx(cost["pool_us"] - cost["bare_us"])


def test_routing_table_shows_both_paths_and_the_added_p50_against_one_triton():
    one = [0.004 + 0.0001 * i for i in range(200)]
    paired = paired_difference([x + 0.0004 for x in one], one)
    pool = {"backends": 2, "bare_us": 1.0, "pool_us": 9.5, "added_us": 8.5}
    text = rendered(routing_table("routing overhead: tiny, 2 Tritons vs 1", routing_rows(0.0004), paired, pool))
    assert ONE in text and TWO in text and "+0.40" in text
    assert "1-Triton gateway's p50" in text and "direct gRPC" not in text
    assert "paired: median over 200 rounds" in text and "+8.5 us a request" in text


def test_alternating_swaps_the_order_every_other_round_and_keeps_only_timed_rounds():
    order: list[tuple[str, int]] = []

    def call(name: str, seconds: float):
        def timed(i: int) -> float:
            order.append((name, i))
            return seconds
        return timed

    out = alternating({"a": call("a", 0.001), "b": call("b", 0.002)}, rounds=4, warmup=1)
    assert order == [("a", 0), ("b", 0),  # warm-up
                     ("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert out == {"a": [0.001] * 4, "b": [0.002] * 4}


# ----------------------------------------------------------------------------- throughput
def test_embeddings_throughput_is_the_median_of_the_runs_answered_per_second_and_errors_are_counted():
    fast = closed_run(10, 0.1) + [Outcome(503, 0.001, True, 0.5)]  # 10 answered within 1.05 s, one shed
    slow = closed_run(10, 0.2)  # 5 answered within the window, 5 after it
    row = throughput_row(2, 16, [fast, slow], 1.05, per_token=False)
    assert row.path == TWO and row.backends == 2 and row.clients == 16 and row.runs == 2
    assert row.per_s_runs == pytest.approx((10 / 1.05, 5 / 1.05)) and row.per_s == pytest.approx(7.5 / 1.05)
    assert (row.requests, row.errors, row.unit) == (20, 1, "req/s")  # every answer counts for the latencies
    assert row.p50_ms == pytest.approx(150.0) and row.p95_ms == pytest.approx(200.0)


def test_a_slow_last_answer_does_not_stretch_the_window():
    steady = closed_run(20, 0.05)  # 20 answers in 1 s
    straggler = steady + [Outcome(200, 2.0, True, 0.99)]  # sent just before the end, answered 2 s later
    assert window_rate(straggler, 1.0, False) == pytest.approx(window_rate(steady, 1.0, False)) == pytest.approx(20.0)
    assert window_rate([], 1.0, False) == 0.0
    with pytest.raises(ValueError, match="positive"):
        window_rate(steady, 0.0, False)


def test_chat_throughput_counts_completion_tokens_per_second():
    row = throughput_row(1, 8, [closed_run(4, 0.5, tokens=32)], 2.0, per_token=True)  # 128 tokens within 2 s
    assert row.per_s == pytest.approx(64.0) and row.unit == "tok/s" and row.path == ONE


def test_a_throughput_row_refuses_runs_that_timed_nothing():
    with pytest.raises(ValueError, match="nothing was timed"):
        throughput_row(1, 16, [[]], 1.0, per_token=False)


def test_ratios_are_against_the_one_backend_row_and_absent_when_it_did_nothing():
    one = throughput_row(1, 16, [closed_run(10, 0.1)], 1.05, per_token=False)  # 10 answers
    two = throughput_row(2, 16, [closed_run(8, 0.125)], 1.05, per_token=False)  # 8 answers
    rows = with_ratios([one, two])
    assert rows[0].x_one_backend == pytest.approx(1.0) and rows[1].x_one_backend == pytest.approx(0.8)
    idle = throughput_row(1, 16, [closed_run(3, 0.1, status=503)], 1.05, per_token=False)
    assert idle.per_s == 0 and idle.p50_ms is None
    assert [r.x_one_backend for r in with_ratios([idle, two])] == [None, None]


def test_throughput_table_shows_the_ratio_and_says_no_gain_is_expected_on_two_cores():
    rows = with_ratios([throughput_row(1, 16, [closed_run(10, 0.099)], 1.0, False),  # all end by 0.99 s
                        throughput_row(2, 16, [closed_run(8, 0.124) + [Outcome(503, 0.01, True, 0.1)]], 1.0, False)])
    text = rendered(throughput_table("throughput: tiny", rows, cores=2))
    assert "10.0 req/s" in text and "8.0 req/s" in text and "0.80x" in text
    assert "on 2 cores no gain is expected" in " ".join(text.split())  # the caption wraps
    cells = [c.strip() for c in next(ln for ln in text.splitlines() if TWO in ln).split("│")]
    assert cells[1:8] == [TWO, "16", "1", "8", "1", "8.0 req/s", "124.0"]  # clients, runs, answered, errors
    assert "no gain is expected" not in " ".join(rendered(throughput_table("t", rows, cores=16)).split())
    assert all(math.isfinite(r.per_s) for r in rows)


# ----------------------------------------------------------------------------- /metrics, config, task
def test_backend_counts_read_only_the_ok_outcome_of_each_backend():
    text = "\n".join([
        "# HELP kiln_gateway_backend_requests_total requests sent to the backend, by outcome",
        "# TYPE kiln_gateway_backend_requests_total counter",
        'kiln_gateway_backend_requests_total{backend="127.0.0.1:8001",outcome="ok"} 120.0',
        'kiln_gateway_backend_requests_total{backend="127.0.0.1:8001",outcome="failed"} 3.0',
        'kiln_gateway_backend_requests_total{backend="127.0.0.1:9001",outcome="ok"} 117.0',
        'kiln_gateway_backend_outstanding{backend="127.0.0.1:9001"} 0.0',
    ])
    assert backend_ok_counts(text) == {"127.0.0.1:8001": 120.0, "127.0.0.1:9001": 117.0}
    assert backend_ok_counts("") == {}


class FakeTriton:
    def __init__(self, repositories, ports: Ports, workdir: Path):
        self.ports, self.workdir = ports, workdir
        self.server_id = f"kiln-fake-{ports.grpc}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"


def test_the_second_gateway_is_configured_like_the_stacks_but_over_its_first_triton_only(tmp_path):
    from kiln.bench_gateway import gateway_options

    stack = Stack(tmp_path / "repo", tmp_path / "srv", replicas=2, triton_class=FakeTriton,
                  gateway=gateway_options(tmp_path / "gw.log"), gateway_class=lambda o, c, w: c)
    single = one_backend_gateway(stack, tmp_path / "gw-1.log")
    pooled = stack.gateway  # the config the stack built (gateway_class returns it)
    assert pooled.triton_grpc == stack.backends[0].grpc_url and pooled.triton_replicas == [stack.backends[1].grpc_url]
    assert single.config.triton_grpc == stack.backends[0].grpc_url and single.config.triton_replicas == []
    assert single.config.triton_ids == [stack.backends[0].server_id]
    assert single.config.repositories == pooled.repositories == [tmp_path / "repo"]
    assert single.config.port not in (0, pooled.port)
    assert single.env == {single.config.keys_env: ""}  # open, as the bench's other gateway
    assert single.log_file == tmp_path / "gw-1.log"


def test_task_kind_benches_embeddings_and_chat_and_refuses_a_classifier(tmp_path):
    assert task_kind(load_spec("minilm")) == "embedding"
    assert task_kind(load_spec("smollm2")) == "chat"
    classifier = parse_spec({"name": "cls", "task": "text-classification",
                             "source": {"kind": "folder", "path": str(tmp_path)}, "workdir": str(tmp_path)})
    with pytest.raises(ValueError, match="embeddings or chat"):
        task_kind(classifier)


def test_kiln_bench_runs_the_replica_bench_only_from_two_replicas_and_refuses_a_classifier(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import kiln.bench
    import kiln.bench_replicas
    import kiln.cli

    calls: list[tuple] = []
    monkeypatch.setattr(kiln.cli, "ensure_export", lambda spec: calls.append(("export", spec.name)))
    monkeypatch.setattr(kiln.bench, "run_bench", lambda spec, console: calls.append(("bench", spec.name)))
    monkeypatch.setattr(kiln.bench_replicas, "run_replica_bench",
                        lambda spec, console, replicas: calls.append(("replicas", spec.name, replicas)))
    runner = CliRunner()
    assert runner.invoke(kiln.cli.app, ["bench", "minilm", "--replicas", "3"]).exit_code == 0
    assert runner.invoke(kiln.cli.app, ["bench", "minilm"]).exit_code == 0
    assert calls == [("export", "minilm"), ("replicas", "minilm", 3), ("export", "minilm"), ("bench", "minilm")]
    assert runner.invoke(kiln.cli.app, ["bench", "minilm", "--replicas", "0"]).exit_code == 2

    calls.clear()
    cls = tmp_path / "cls.yaml"
    cls.write_text(f"name: cls\ntask: text-classification\nsource: {{kind: folder, path: {tmp_path}}}\n")
    result = runner.invoke(kiln.cli.app, ["bench", str(cls), "--replicas", "2"])
    assert result.exit_code == 2 and calls == []  # refused before anything is exported
