"""kiln.tune without a server: what is searched, the order and the budget, the combination of
winners, which candidate is best, the table, the plot and the spec written. Measurements are
made up (a `measure` that returns summaries shaped as the load test writes them)."""

from __future__ import annotations

import yaml
from rich.console import Console

from kiln.tune import (
    BASELINE,
    Candidate,
    Result,
    best,
    combined,
    html_report,
    plan,
    plot,
    search_space,
    single_changes,
    table,
    tuned_spec_text,
)
from kiln_core.spec import LoadTest, parse_spec

ENCODER = {"name": "enc", "source": {"kind": "folder", "path": "/ckpt"}, "precisions": ["fp32"],
           "batching": {"max_batch_size": 64, "preferred_batch_sizes": [8, 16, 32], "max_queue_delay_us": 2000},
           "instances": {"intra_op_threads": 2}}
CHAT = {"name": "lm", "source": {"kind": "folder", "path": "/ckpt"}, "task": "text-generation",
        "precisions": ["fp32"], "generation": {"max_concurrent": 8}}
SLO = LoadTest.model_validate({"targets": {"p50_ms": 100, "p95_ms": 200, "p99_ms": None, "min_qps": 5}})


def run(qps: float, p95: float = 50.0, verdict: str = "PASS", tokens: float | None = None) -> dict:
    """A load test's summary, as loadtest.gate.summary writes it for a capacity search."""
    stream = None if tokens is None else {"output_tokens_per_s": tokens}
    return {"verdict": verdict, "capacity_qps": qps if verdict == "PASS" else None,
            "measured": {"qps": qps, "p50_ms": p95 / 2, "p95_ms": p95, "p99_ms": p95 * 1.5, "error_ratio": 0.0,
                         "stream": stream},
            "steps": [{"offered_rps": qps / 2, "qps": qps / 2, "p95_ms": p95 / 2, "error_ratio": 0.0, "sustained": True},
                      {"offered_rps": qps, "qps": qps, "p95_ms": p95, "error_ratio": 0.0, "sustained": verdict == "PASS"}]}


def test_encoders_search_batching_delay_and_instances_within_the_cores_with_the_spec_first():
    space = search_space(parse_spec(ENCODER), cores=2)
    assert space["max_batch_size"] == [
        {"batching": {"max_batch_size": 64, "preferred_batch_sizes": [8, 16, 32]}},
        {"batching": {"max_batch_size": 16, "preferred_batch_sizes": [8, 16]}}]
    assert [v["batching"]["max_queue_delay_us"] for v in space["queue_delay"]] == [2000, 0, 8000]
    pairs = [(v["instances"]["encoder"], v["instances"]["intra_op_threads"]) for v in space["instances"]]
    assert pairs == [(1, 2), (2, 1)]  # (1, cores) is the spec's own; never more threads than cores
    assert all(parse_spec({**ENCODER, **v}) for vs in space.values() for v in vs)  # each one a valid spec


def test_chat_models_search_concurrent_sequences_and_threads():
    space = search_space(parse_spec(CHAT), cores=4)
    assert [v["generation"]["max_concurrent"] for v in space["max_concurrent"]] == [8, 4, 16]
    assert [v["instances"]["intra_op_threads"] for v in space["threads"]] == [4, 1]


def test_single_changes_start_with_the_spec_as_given_and_vary_one_setting_each():
    cands = single_changes(search_space(parse_spec(ENCODER), cores=2))
    assert cands[0].name == BASELINE and cands[0].overrides == {}
    assert [c.setting for c in cands[1:]] == ["max_batch_size", "queue_delay", "queue_delay", "instances"]
    assert cands[2].name == "max_queue_delay_us=0"
    spec = cands[2].apply(parse_spec(ENCODER))
    assert spec.batching.max_queue_delay_us == 0 and spec.batching.max_batch_size == 64  # the rest kept


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_plan_adds_the_winners_together_and_measures_that_last():
    space = search_space(parse_spec(ENCODER), cores=2)
    scores = {BASELINE: 100, "max_batch_size=16, preferred_batch_sizes=8,16": 90, "max_queue_delay_us=0": 120,
              "max_queue_delay_us=8000": 110, "encoder=2, intra_op_threads=1": 130}
    seen = []

    def measure(c: Candidate) -> Result:
        seen.append(c)
        return Result(c, run(scores.get(c.name, 150)))

    results = plan(space, measure, budget_s=1e9, chat=False, clock=Clock())
    assert [r.candidate.name for r in results][:5] == list(scores)
    last = results[-1].candidate
    assert last.overrides == {"batching": {"max_queue_delay_us": 0}, "instances": {"encoder": 2, "intra_op_threads": 1}}
    assert best(results, chat=False) is results[-1]


def test_no_combination_when_fewer_than_two_settings_improved():
    space = search_space(parse_spec(ENCODER), cores=2)
    results = [Result(c, run(200 if c.name == "max_queue_delay_us=0" else 100)) for c in single_changes(space)]
    assert combined(space, results, chat=False) is None


def test_the_budget_stops_candidates_that_would_not_finish_and_lists_them_as_not_run():
    clock = Clock()

    def measure(c: Candidate) -> Result:
        clock.now += 30.0
        return Result(c, run(10))

    results = plan(search_space(parse_spec(ENCODER), cores=2), measure, budget_s=70, chat=False, clock=clock)
    assert [r.run is not None for r in results] == [True, True, False, False, False]
    assert all(r.seconds == 30.0 for r in results[:2])
    # the baseline runs whatever the budget
    assert plan(search_space(parse_spec(ENCODER), cores=2), measure, budget_s=1, chat=False, clock=clock)[0].run


def test_best_is_the_highest_that_meets_the_slo_and_none_when_nothing_meets():
    a, b, c = (Result(Candidate(n), r) for n, r in (("a", run(50)), ("b", run(90, verdict="FAIL")), ("c", run(70))))
    assert best([a, b, c], chat=False) is c
    assert best([b, Result(Candidate("d"))], chat=False) is None
    # chat: completion tokens/s, not requests/s
    x, y = Result(Candidate("x"), run(5, tokens=300)), Result(Candidate("y"), run(8, tokens=200))
    assert best([x, y], chat=True) is x


def test_the_table_marks_the_best_and_says_why_the_others_did_not_count(tmp_path):
    results = [Result(Candidate(BASELINE), run(50), seconds=12), Result(Candidate("q=0"), run(70), seconds=11),
               Result(Candidate("slow"), run(90, p95=900, verdict="FAIL")), Result(Candidate("late")),
               Result(Candidate("broken"), error="load failed")]
    console = Console(record=True, width=200)
    console.print(table(results, chat=False, winner=results[1], slo=SLO))
    text = console.export_text()
    late = next(line for line in text.splitlines() if "late" in line)
    assert late.split("│")[-3].strip() == "not run (budget)" and late.split("│")[-2].strip() == "-"  # under SLO, then s
    assert "* q=0" in text and "misses" in text and "not run (budget)" in text and "could not serve" in text
    assert "p95 <= 200 ms" in text and "cores" in text  # the SLO and the machine in the title
    png = plot(results, SLO, tmp_path / "tune.png", chat=False)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = html_report(results, False, results[1], png, tmp_path / "tune.html",
                       {"model": "enc", "machine": "cpu", "when": "now"}).read_text()
    assert "best: q=0" in page and "data:image/png;base64," in page and page.count("<tr") == 6


def test_the_tuned_spec_is_the_input_file_with_the_winning_settings_and_the_slo(tmp_path):
    src = tmp_path / "enc.yaml"
    src.write_text("# my spec\n" + yaml.safe_dump(ENCODER))
    winner = Candidate("w", {"batching": {"max_queue_delay_us": 0}, "instances": {"encoder": 2, "intra_op_threads": 1}})
    text = tuned_spec_text(src, parse_spec(ENCODER), winner, SLO, None, "best of 5")
    assert text.startswith("# written by `kiln tune`") and "# best of 5" in text
    spec = parse_spec(yaml.safe_load(text))
    assert spec.batching.max_queue_delay_us == 0 and spec.batching.max_batch_size == 64
    assert (spec.instances.encoder, spec.instances.intra_op_threads) == (2, 1)
    assert spec.loadtest.targets.p95_ms == 200 and spec.loadtest.targets.p99_ms is None
    assert yaml.safe_load(text)["source"] == ENCODER["source"]  # the rest as the user wrote it
