"""Run a headless Locust test against a Triton deployment and gate it on the spec's SLOs.

Locust is used as a library (Environment + LocalRunner): one process, bounded run time,
progress every few seconds, then Locust's CSV and HTML reports plus one JSON summary.
The verdict is set on `environment.process_exit_code` by a `quitting` listener, as a
locustfile would; the CLI exits with it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import gevent
from locust.env import Environment
from locust.html import get_html_report
from locust.stats import StatsCSV
from rich.console import Console
from rich.table import Table

from kiln.spec import LoadShape, Targets
from loadtest import gate
from loadtest.users import EmbedUser, OpenLoopEmbedUser, StreamUser, configure

PERCENTILES = [0.5, 0.9, 0.95, 0.99]


@dataclass
class Endpoint:
    url: str  # host:port of Triton's gRPC or HTTP endpoint
    model: str
    output: str = "embedding"


def _user_class(shape: LoadShape, ep: Endpoint, rate: float | None = None):
    common = dict(host=ep.url, model=ep.model, output=ep.output, protocol=shape.protocol,
                  texts_per_request=shape.texts_per_request)
    if shape.protocol == "stream":
        return configure(StreamUser, **common)
    if shape.kind == "users":
        return configure(EmbedUser, **common)
    return configure(OpenLoopEmbedUser, **common, rate=rate or shape.rate, max_in_flight=shape.max_in_flight,
                     concurrency=min(shape.max_in_flight, 64), offered=0)


def measured_from(env: Environment, duration: float, offered: int | None = None) -> gate.Measured:
    total = env.stats.total
    errors = {f"{e.name}: {e.error}": e.occurrences for e in env.stats.errors.values()}
    has = total.num_requests - total.num_failures > 0

    def pct(q):
        return float(total.get_response_time_percentile(q)) if has else None

    return gate.Measured(
        requests=total.num_requests,
        failures=total.num_failures,
        rejections=gate.count_rejections(errors),
        duration_s=duration,
        p50_ms=pct(0.5),
        p90_ms=pct(0.9),
        p95_ms=pct(0.95),
        p99_ms=pct(0.99),
        offered_rps=offered / duration if offered is not None and duration > 0 else None,
        errors=errors,
    )


def run_once(shape: LoadShape, ep: Endpoint, targets: Targets, console: Console, run_time: float | None = None,
             rate: float | None = None, label: str = "load") -> tuple[Environment, gate.Measured]:
    user = _user_class(shape, ep, rate)
    env = Environment(user_classes=[user], host=ep.url, stop_timeout=15)
    runner = env.create_local_runner()
    run_time = run_time or shape.run_time_s
    users = 1 if shape.kind != "users" else shape.users
    start = time.perf_counter()
    runner.start(users, spawn_rate=shape.spawn_rate if shape.kind == "users" else 1)

    def progress():
        while True:
            gevent.sleep(5)
            s = env.stats.total
            p95 = s.get_current_response_time_percentile(0.95) or 0
            console.print(
                f"[bold cyan]{label}[/] {time.perf_counter() - start:5.0f}s  requests {s.num_requests}  "
                f"failures {s.num_failures}  now {s.current_rps:.1f} req/s  p95 {p95:.0f} ms"
            )

    ticker = gevent.spawn(progress)
    gevent.sleep(run_time)
    runner.quit()  # stops users; open-loop users wait for their in-flight requests
    ticker.kill()
    duration = time.perf_counter() - start
    offered = getattr(user, "offered", None) if shape.kind != "users" else None
    return env, measured_from(env, duration, offered)


def run_loadtest(shape: LoadShape, targets: Targets, ep: Endpoint, out_dir: Path, console: Console | None = None) -> dict:
    """Run the shape, write reports, return the JSON summary (with "exit_code")."""
    console = console or Console(stderr=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = None
    if shape.kind == "capacity":
        steps, env, m = _capacity_search(shape, ep, targets, console)
    else:
        what = f"{shape.users} users" if shape.kind == "users" else f"{shape.rate:g} req/s open loop"
        console.print(f"[bold cyan]load[/] {what} over {shape.protocol} for {shape.run_time_s:g}s against {ep.model} at {ep.url}")
        env, m = run_once(shape, ep, targets, console)
    checks = gate.evaluate(targets, m)

    @env.events.quitting.add_listener
    def _set_exit_code(environment, **_):
        environment.process_exit_code = 0 if gate.verdict(checks) else 1

    env.events.quitting.fire(environment=env, reverse=True)
    summary = gate.summary(targets, m, checks, shape.model_dump(), steps)
    summary["exit_code"] = env.process_exit_code
    summary["endpoint"] = {"url": ep.url, "model": ep.model}
    summary["entries"] = [
        {"type": e.method, "name": e.name, "requests": e.num_requests, "failures": e.num_failures,
         "median": e.median_response_time, "p95": e.get_response_time_percentile(0.95), "mean": e.avg_response_time}
        for e in env.stats.entries.values()
    ]
    _write_reports(env, out_dir, summary)
    console.print(report_table(summary))
    for c in checks:
        mark = "[green]PASS[/]" if c.passed else "[red]FAIL[/]"
        console.print(f"  {mark} {c.name}: {c.measured} (target {c.target}){'  ' + c.detail if c.detail else ''}")
    if steps is not None:
        cap = summary["capacity_qps"]
        console.print(f"  capacity: {'%.1f req/s' % cap if cap else 'no step met the targets'} (highest rate with p95 within target)")
    console.print(f"  verdict: {'[green]PASS[/]' if summary['verdict'] == 'PASS' else '[red]FAIL[/]'}  reports: {out_dir}")
    return summary


def _capacity_search(shape: LoadShape, ep: Endpoint, targets: Targets, console: Console):
    steps, rate, best = [], shape.start_rate, None
    for i in range(shape.max_steps):
        env, m = run_once(shape, ep, targets, console, run_time=shape.step_time_s, rate=rate, label=f"step {i + 1} @ {rate:.0f}/s")
        ok = gate.step_sustained(targets, m)
        steps.append(gate.CapacityStep(rate, m, ok))
        console.print(f"[bold cyan]capacity[/] offered {rate:.1f} req/s -> {m.qps:.1f} ok/s, p95 {m.p95_ms or float('nan'):.0f} ms, "
                      f"errors {m.error_ratio:.1%}: {'sustained' if ok else 'not sustained'}")
        if ok:
            best = (env, m)
        else:
            break
        rate *= shape.step_factor
    env, m = best or (env, m)
    return steps, env, m


def _write_reports(env: Environment, out_dir: Path, summary: dict) -> None:
    writer = StatsCSV(env, PERCENTILES)
    import csv

    for suffix, method in (("stats", writer.requests_csv), ("failures", writer.failures_csv), ("exceptions", writer.exceptions_csv)):
        with open(out_dir / f"locust_{suffix}.csv", "w", newline="") as f:
            method(csv.writer(f))
    (out_dir / "locust_report.html").write_text(get_html_report(env, show_download_link=False))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def report_table(summary: dict) -> Table:
    m = summary["measured"]
    t = Table(title=f"load test: {summary['endpoint']['model']} ({summary['shape']['kind']}, {summary['shape']['protocol']})")
    for col in ("requests", "failures", "rejected", "QPS", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "verdict"):
        t.add_column(col, justify="right")

    def ms(v):
        return "-" if v is None else f"{v:.0f}"

    t.add_row(
        str(m["requests"]), str(m["failures"]), str(m["rejections"]), f"{m['qps']:.1f}",
        ms(m["p50_ms"]), ms(m["p90_ms"]), ms(m["p95_ms"]), ms(m["p99_ms"]),
        "[green]PASS[/]" if summary["verdict"] == "PASS" else "[red]FAIL[/]",
    )
    return t
