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
from locust.stats import StatsCSV, StatsEntry, StatsError
from rich.console import Console
from rich.table import Table

from kiln_core.spec import LoadShape, Targets
from loadtest import gate
from loadtest.users import (
    EmbedUser,
    OpenAIChatUser,
    OpenAIEmbedUser,
    OpenLoopEmbedUser,
    OpenLoopOpenAIChatUser,
    OpenLoopOpenAIEmbedUser,
    OpenLoopStreamUser,
    StreamUser,
    close_clients,
    configure,
)

PERCENTILES = [0.5, 0.9, 0.95, 0.99]
# what protocol "openai" sends, by the spec's task (the gateway serves no other task)
OPENAI_TASKS = {"text-generation": "chat", "feature-extraction": "embeddings"}


@dataclass
class Endpoint:
    url: str  # host:port of Triton's gRPC or HTTP endpoint, or of the OpenAI gateway
    model: str
    output: str = "embedding"
    task: str = "feature-extraction"
    api_key: str = "none"  # protocol openai: the gateway's key (not written to the summary)


def streams(shape: LoadShape, ep: Endpoint) -> bool:
    """Whether each request is a token stream (gated on its first token)."""
    return shape.protocol == "stream" or (shape.protocol == "openai" and OPENAI_TASKS.get(ep.task) == "chat")


def _user_class(shape: LoadShape, ep: Endpoint, rate: float | None = None):
    open_loop = dict(rate=rate or shape.rate, max_in_flight=shape.max_in_flight, offered=0)
    if shape.protocol == "openai":
        what = OPENAI_TASKS.get(ep.task)
        if what is None:
            raise ValueError(f"protocol openai: the gateway serves no {ep.task} models (only {', '.join(OPENAI_TASKS)})")
        common = dict(host=ep.url, model=ep.model, api_key=ep.api_key, texts_per_request=shape.texts_per_request,
                      max_tokens=shape.max_tokens)
        closed, opened = ((OpenAIChatUser, OpenLoopOpenAIChatUser) if what == "chat"
                          else (OpenAIEmbedUser, OpenLoopOpenAIEmbedUser))
        return configure(closed, **common) if shape.kind == "users" else configure(opened, **common, **open_loop)
    common = dict(host=ep.url, model=ep.model, output=ep.output, protocol=shape.protocol,
                  texts_per_request=shape.texts_per_request)
    if shape.protocol == "stream":
        return (configure(StreamUser, **common, max_tokens=shape.max_tokens) if shape.kind == "users"
                else configure(OpenLoopStreamUser, **common, **open_loop, max_tokens=shape.max_tokens))
    if shape.kind == "users":
        return configure(EmbedUser, **common)
    return configure(OpenLoopEmbedUser, **common, **open_loop, concurrency=min(shape.max_in_flight, 64))


def _entry(env: Environment, name: str, method: str) -> StatsEntry:
    """A stats entry, or an empty one when nothing was reported under that name (not added
    to the report: `env.stats.get` would)."""
    return env.stats.entries.get((name, method)) or StatsEntry(env.stats, name, method)


def gated_entries(env: Environment, shape: LoadShape, ep: Endpoint) -> tuple[StatsEntry, StatsEntry]:
    """(requests, latency): whole requests count for throughput and errors; latency is the
    whole request, or the first token for streams. Never Locust's "Aggregated" row, which
    mixes stream timings (and tokens/s figures) into one distribution."""
    request = _entry(env, ep.model, shape.protocol)
    return request, (_entry(env, f"{ep.model} TTFT", shape.protocol) if streams(shape, ep) else request)


def measured_from(env: Environment, shape: LoadShape, ep: Endpoint, duration: float,
                  offered: int | None = None) -> gate.Measured:
    request, latency = gated_entries(env, shape, ep)
    # repr, as Locust's own failure reports write them: the exception's type stays visible
    errors = {f"{e.name}: {StatsError.parse_error(e.error)}": e.occurrences for e in env.stats.errors.values()}
    ok = request.num_requests - request.num_failures

    def pct(entry: StatsEntry, q: float) -> float | None:
        return float(entry.get_response_time_percentile(q)) if ok > 0 and entry.num_requests > 0 else None

    stream = None
    if streams(shape, ep):
        itl = _entry(env, f"{ep.model} inter-token", shape.protocol)
        rate = _entry(env, f"{ep.model} tokens/s", shape.protocol)
        stream = gate.StreamFigures(
            inter_token_p50_ms=pct(itl, 0.5),
            inter_token_p95_ms=pct(itl, 0.95),
            tokens_per_s_p50=pct(rate, 0.5),
            tokens_per_s_mean=rate.avg_response_time if rate.num_requests else None,
            output_tokens_per_s=request.total_content_length / duration if duration > 0 else 0.0,
            request_p50_ms=pct(request, 0.5),
            request_p95_ms=pct(request, 0.95),
        )
    return gate.Measured(
        requests=request.num_requests,
        failures=request.num_failures,
        rejections=gate.count_rejections(errors),
        duration_s=duration,
        p50_ms=pct(latency, 0.5),
        p90_ms=pct(latency, 0.9),
        p95_ms=pct(latency, 0.95),
        p99_ms=pct(latency, 0.99),
        offered_rps=offered / duration if offered is not None and duration > 0 else None,
        errors=errors,
        latency_of="TTFT" if streams(shape, ep) else "latency",
        stream=stream,
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

    what = "TTFT p95" if streams(shape, ep) else "p95"

    def progress():
        while True:
            gevent.sleep(5)
            request, latency = gated_entries(env, shape, ep)
            p95 = latency.get_current_response_time_percentile(0.95) or 0
            console.print(
                f"[bold cyan]{label}[/] {time.perf_counter() - start:5.0f}s  requests {request.num_requests}  "
                f"failures {request.num_failures}  now {request.current_rps:.1f} req/s  {what} {p95:.0f} ms"
            )

    ticker = gevent.spawn(progress)
    try:
        gevent.sleep(run_time)
    finally:
        runner.quit()  # stops users; open-loop users wait for their in-flight requests
        ticker.kill()
        close_clients(env)  # every client closed here, none left to the garbage collector at exit
    duration = time.perf_counter() - start
    offered = getattr(user, "offered", None) if shape.kind != "users" else None
    return env, measured_from(env, shape, ep, duration, offered)


def run_loadtest(shape: LoadShape, targets: Targets, ep: Endpoint, out_dir: Path, console: Console | None = None) -> dict:
    """Run the shape, write reports, return the JSON summary (with "exit_code")."""
    console = console or Console(stderr=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = None
    if shape.kind == "capacity":
        steps, env, m = _capacity_search(shape, ep, targets, console)
    else:
        what = f"{shape.users} users" if shape.kind == "users" else f"{shape.rate:g} req/s open loop"
        via = f"openai ({OPENAI_TASKS.get(ep.task, ep.task)})" if shape.protocol == "openai" else shape.protocol
        console.print(f"[bold cyan]load[/] {what} over {via} for {shape.run_time_s:g}s against {ep.model} at {ep.url}")
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
    if m.stream is not None:
        console.print(stream_table(summary))
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
    lat = "TTFT " if m.get("latency_of") == "TTFT" else ""
    for col in ("requests", "failures", "rejected", "QPS", *(f"{lat}{q} ms" for q in ("p50", "p90", "p95", "p99")), "verdict"):
        t.add_column(col, justify="right")

    t.add_row(
        str(m["requests"]), str(m["failures"]), str(m["rejections"]), f"{m['qps']:.1f}",
        _ms(m["p50_ms"]), _ms(m["p90_ms"]), _ms(m["p95_ms"]), _ms(m["p99_ms"]),
        "[green]PASS[/]" if summary["verdict"] == "PASS" else "[red]FAIL[/]",
    )
    return t


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def stream_table(summary: dict) -> Table:
    """Streams: one row per figure a reader feels (the same entries are in summary.json)."""
    model, st = summary["endpoint"]["model"], summary["measured"]["stream"]
    entries = {e["name"]: e for e in summary["entries"]}
    t = Table(title=f"streams: {model} (output {st['output_tokens_per_s']:.1f} tokens/s over all streams)")
    for col in ("figure", "count", "p50", "p95", "mean"):
        t.add_column(col, justify="right")
    for label, name, fmt in (("TTFT ms", f"{model} TTFT", _ms), ("inter-token ms", f"{model} inter-token", "{:.1f}".format),
                             ("tokens/s per stream", f"{model} tokens/s", "{:.1f}".format),
                             ("whole stream ms", model, _ms)):
        e = entries.get(name)
        if e is None or not e["requests"]:
            t.add_row(label, "0", "-", "-", "-")
            continue
        t.add_row(label, str(e["requests"]), fmt(e["median"]), fmt(e["p95"]), fmt(e["mean"]))
    return t
