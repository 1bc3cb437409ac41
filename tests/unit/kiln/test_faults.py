"""The fault suite's judging, with made-up outcomes: what is a hard failure (exit 1), what
only a missed threshold (exit 1 with --strict), and what the table and the JSON say."""

from __future__ import annotations

import json

from rich.console import Console

from kiln.faults import (
    CaseResult,
    Outcome,
    Tally,
    crashed,
    exit_code,
    hostile_bodies,
    judge_capacity,
    judge_drain,
    judge_fuzz,
    judge_kill,
    judge_loop,
    judge_orphans,
    judge_overload,
    judge_port_held,
    not_run,
    report_json,
    summary_table,
)


def answers(status: int, n: int, seconds: float = 0.01, **kw) -> list[Outcome]:
    return [Outcome(status, seconds, **kw) for _ in range(n)]


def test_tally_counts_hangs_and_unclear_answers_apart_from_statuses():
    t = Tally.of([Outcome(200, 0.1), Outcome(400, 0.1), Outcome(503, 0.1, False), Outcome(None, 10, False),
                  Outcome(0, 0.1, False)])
    assert (t.requests, t.answered, t.ok, t.client_errors, t.server_errors, t.hangs, t.unclear) == (5, 3, 1, 1, 1, 1, 2)


def test_fuzz_passes_on_enveloped_4xx_fails_on_a_5xx_or_a_hang_and_misses_on_a_2xx():
    assert judge_fuzz(answers(400, 300), ready_after=True).verdict == "PASS"
    five = judge_fuzz(answers(400, 299) + answers(500, 1), ready_after=True)
    assert five.verdict == "FAIL" and "5xx" in five.hard[0]
    assert judge_fuzz(answers(400, 299) + [Outcome(None, 10.0, False)], ready_after=True).verdict == "FAIL"
    assert judge_fuzz(answers(400, 300), ready_after=False).verdict == "FAIL"
    accepted = judge_fuzz(answers(400, 299) + answers(200, 1), ready_after=True)
    assert accepted.verdict == "MISS" and not accepted.hard
    assert judge_fuzz(answers(400, 299) + answers(422, 1, clear=False), ready_after=True).verdict == "MISS"


def test_kill_needs_a_recovery_and_judges_only_what_was_sent_while_down():
    kill, back = 100.0, 110.0
    before = [Outcome(200, 1.0, started=90.0), Outcome(503, 15.0, started=99.0, retry_after=True)]  # in flight
    down = [Outcome(503, 0.002, started=101.0 + i, retry_after=True) for i in range(5)]
    after = [Outcome(200, 0.01, started=109.99)]  # the first answer again: it ends the outage, 110.0
    ok = judge_kill(before + down + after, kill, back, alive=True, ready_after=True, streams_mid_flight=4,
                    chat_after=True)
    assert ok.verdict == "PASS" and ok.recovery_s == 10.0 and ok.figures["refused_while_down"] == 5
    assert judge_kill(before + down, kill, None, True, False, 4, False).verdict == "FAIL"
    assert judge_kill(before + down + after, kill, back, False, True, 4, True).verdict == "FAIL"  # kiln serve died
    wrong = judge_kill(before + down + [Outcome(500, 0.01, started=102.0)] + after, kill, back, True, True, 4, True)
    assert wrong.verdict == "MISS" and "[500]" in wrong.misses[0]
    no_header = [Outcome(503, 0.01, started=103.0)]
    assert judge_kill(before + no_header + after, kill, back, True, True, 4, True).verdict == "MISS"
    cut = [Outcome(200, 2.0, clear=False, started=95.0)]  # a stream that stopped without an error
    assert judge_kill(cut + down + after, kill, back, True, True, 4, True).verdict == "MISS"
    assert judge_kill(before + down + [Outcome(None, 90.0, False, started=96.0)] + after, kill, back, True, True, 4,
                      True).verdict == "FAIL"


def test_loop_fault_must_fire_and_refusals_must_be_fast_503s():
    trigger = answers(200, 2) + answers(503, 1)
    refused = answers(503, 60, 0.004, retry_after=True)
    ok = judge_loop(trigger, refused, fault_fired=True, ready_false=True, alive=True)
    assert ok.verdict == "PASS" and ok.figures["answered_before_fault"] == 2
    assert judge_loop(answers(200, 12), [], fault_fired=False, ready_false=False, alive=True).verdict == "FAIL"
    assert judge_loop(trigger, refused, True, ready_false=False, alive=True).verdict == "MISS"
    slow = judge_loop(trigger, answers(503, 60, 0.2), True, True, True)
    assert slow.verdict == "MISS" and "p99 200 ms" in slow.misses[0]
    assert judge_loop(trigger, refused[:-1] + [Outcome(None, 10.0, False)], True, True, True).verdict == "FAIL"


def spread(status: int, n: int, seconds: float, over_s: float, **kw) -> list[Outcome]:
    """n answers taking `seconds` each, sent evenly over `over_s`."""
    return [Outcome(status, seconds, started=i * over_s / n, **kw) for i in range(n)]


def test_capacity_is_successes_over_the_span_of_the_run():
    result = judge_capacity(spread(200, 1000, 0.05, 9.95), clients=16)
    assert result.verdict == "PASS" and abs(result.figures["capacity_rps"] - 100.0) < 0.5
    assert judge_capacity(answers(503, 10), clients=16).verdict == "FAIL"


def test_chat_is_judged_in_completion_tokens_against_its_queues_bound():
    base = spread(200, 400, 0.05, 10.0, tokens=16)
    capacity = judge_capacity(base, clients=4, per_token=True, what="chat ")
    assert capacity.case == "chat capacity (4 clients)" and abs(capacity.figures["capacity_tok_s"] - 640) < 5
    # half the requests refused, the other half whole: goodput held in tokens per second
    held = spread(200, 400, 0.2, 10.0, tokens=16) + spread(503, 400, 0.003, 10.0, retry_after=True)
    ok = judge_overload("chat", held, 640.0, True, True, per_token=True, accepted_p99_ms=300.0)
    assert ok.verdict == "PASS" and abs(ok.figures["goodput_ratio"] - 1.0) < 0.05, ok.misses
    short = spread(200, 400, 0.2, 10.0, tokens=4) + spread(503, 400, 0.003, 10.0)  # answered, but cut to 4 tokens
    assert any("tok/s" in m for m in judge_overload("chat", short, 640.0, True, True, per_token=True).misses)
    slow = judge_overload("chat", spread(200, 400, 0.5, 10.0, tokens=16), 640.0, True, True, per_token=True,
                          accepted_p99_ms=300.0)
    assert any("accepted p99 500 ms > 300 ms" in m for m in slow.misses)


def test_a_drain_needs_whole_streams_503s_meanwhile_and_a_clean_exit():
    whole, refused = answers(200, 4), answers(503, 5, retry_after=True)
    assert judge_drain(whole, refused, 0, alive_after=False).verdict == "PASS"
    cut = judge_drain(answers(200, 3) + [Outcome(200, 1.0, clear=False)], refused, 0, False)
    assert cut.verdict == "FAIL" and "1 of 4 streams" in cut.hard[0]
    assert judge_drain(whole, refused, 1, False).verdict == "FAIL"  # a non-zero exit
    assert judge_drain(whole, refused, None, True).verdict == "FAIL"  # still running
    served = judge_drain(whole, answers(200, 2), 0, False)  # new work accepted while draining
    assert served.verdict == "MISS" and "something other than 503" in served.misses[0]
    assert judge_drain(whole, [], 0, False).verdict == "MISS"  # the refusals went untested


def test_a_triton_restart_during_a_case_that_never_kills_it_is_a_crash():
    results = [judge_capacity(spread(200, 100, 0.05, 1.0), clients=16)]
    assert crashed(results, 0, 0) == results and crashed(results, None, 1) == results
    hit = crashed(results, 0, 1)
    assert hit[0].verdict == "FAIL" and "restarted it 1 time" in hit[0].hard[0]


def test_overload_thresholds_are_misses_and_only_a_crash_or_hang_fails():
    held = spread(200, 950, 0.5, 9.5) + spread(503, 950, 0.003, 9.5, retry_after=True)
    ok = judge_overload("open", held, capacity_rps=100.0, alive=True, ready_after=True, offered_rps=200.0)
    assert ok.verdict == "PASS", ok.misses
    assert abs(ok.figures["goodput_ratio"] - 0.95) < 0.01 and ok.figures["rejected"] == 950
    assert "client_lag_max_ms" not in ok.figures
    lagged = judge_overload("open", held, 100.0, True, True, client_lag_ms=1260.0)
    assert lagged.figures["client_lag_max_ms"] == 1260.0 and lagged.verdict == "PASS"  # shown, not judged

    collapsed = spread(200, 400, 0.5, 9.5) + spread(503, 1500, 0.003, 9.5)
    low = judge_overload("open", collapsed, 100.0, True, True)
    assert low.verdict == "MISS" and any("goodput" in m for m in low.misses)
    slow_no = judge_overload("open", spread(200, 950, 0.5, 9.5) + spread(503, 100, 0.3, 9.5), 100.0, True, True)
    assert any("rejections p99 300 ms" in m for m in slow_no.misses)
    queued = judge_overload("open", spread(200, 950, 3.0, 7.0), 100.0, True, True)
    assert any("accepted p99 3000 ms" in m for m in queued.misses)

    assert judge_overload("open", held, 100.0, alive=False, ready_after=True).verdict == "FAIL"
    assert judge_overload("open", held, 100.0, alive=True, ready_after=False).verdict == "FAIL"
    assert judge_overload("open", held + [Outcome(None, 40.0, False)], 100.0, True, True).verdict == "FAIL"


def test_exit_code_is_1_on_a_hard_failure_and_on_a_miss_only_when_strict():
    passed = CaseResult("fuzz", Tally.of(answers(400, 3)))
    missed = CaseResult("overload", Tally(), misses=("goodput 0.5x",))
    assert exit_code([passed, missed]) == 0
    assert exit_code([passed, missed], strict=True) == 1
    assert exit_code([passed, not_run("kill Triton", "kiln serve did not start")]) == 1
    assert exit_code([passed], strict=True) == 0


def test_table_and_json_show_every_case_its_verdict_and_the_strict_rule():
    results = [judge_fuzz(answers(400, 300), True),
               judge_overload("overload open loop 2x", spread(200, 400, 0.5, 9.5), 100.0, True, True),
               not_run("kill generation loop", "no server")]
    console = Console(width=250, record=True)
    console.print(summary_table(results, wall_s=200.0))
    text = console.export_text()
    for expected in ("fuzz", "PASS", "overload open loop 2x", "MISS", "kill generation loop", "FAIL",
                     "exit 1 with --strict", "goodput 0.401x", "accepted p99 500 ms"):
        assert expected in text, expected
    data = json.loads(json.dumps(report_json(results, 200.0, strict=False)))
    assert data["exit_code"] == 1 and [c["verdict"] for c in data["cases"]] == ["PASS", "MISS", "FAIL"]
    assert data["cases"][0]["tally"]["client_errors"] == 300


def test_hostile_bodies_are_many_cover_all_three_routes_and_follow_the_models():
    bodies = hostile_bodies("chat-x", "emb-y", context=512, max_body=1 << 20)
    assert len(bodies) >= 300
    assert {r for r, _ in bodies} == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
    assert any(b'"max_tokens": 512}' in b for _, b in bodies)  # the whole context: never fits a prompt
    assert any(len(b) > 1 << 20 for _, b in bodies)  # over the body limit: 413
    assert all(b'"model": "lm"' not in b for _, b in bodies)


def test_an_overload_clients_deadline_outlasts_the_models_own_queue_bound():
    from kiln.faults import queue_deadline_s

    assert queue_deadline_s(40.0, 23_000) == 40.0  # int4 on a fast CPU: the case deadline suffices
    assert abs(queue_deadline_s(40.0, 54_000) - 86.0) < 1e-9  # fp32 on AVX2: 1.5x the bound and 5 s


def test_children_left_after_kill_9_of_serve_are_a_hard_failure():
    clean = judge_orphans(processes=5, listening=5, gone_s=1.2, left=[], deadline_s=15)
    assert clean.verdict == "PASS" and clean.recovery_s == 1.2 and clean.figures["children"] == 4
    slow = judge_orphans(processes=5, listening=5, gone_s=8.0, left=[], deadline_s=15)
    assert slow.verdict == "MISS"
    orphan = judge_orphans(processes=5, listening=5, gone_s=None, left=["tritonserver (pid 7)"], deadline_s=15)
    assert orphan.verdict == "FAIL" and "tritonserver (pid 7)" in orphan.hard[0]
    assert judge_orphans(processes=1, listening=1, gone_s=0.1, left=[], deadline_s=15).verdict == "FAIL"


def test_serving_beside_a_stranger_on_its_port_is_a_hard_failure():
    assert judge_port_held(2, True, False, 3.1, 60).verdict == "PASS"
    assert judge_port_held(None, False, False, None, 60).hard[0].endswith("(no refusal)")
    assert judge_port_held(1, True, False, 3.0, 60).verdict == "FAIL"  # a crash is not a refusal
    assert judge_port_held(2, False, False, 3.0, 60).verdict == "FAIL"  # a refusal that does not say why
    assert "said ready" in judge_port_held(2, True, True, 3.0, 60).hard[0]
