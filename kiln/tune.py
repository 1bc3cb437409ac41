"""`kiln tune SPEC --slo FILE`: the serving settings that carry the most load within an SLO on
this machine, found by measuring them (Triton's Model Analyzer, for kiln's deployments and
with kiln's own load tests).

What is searched (``search_space``), each value measured on a Triton of its own:

- encoders: dynamic batching (max batch size with its preferred sizes, the queue delay) and
  encoder instances x ONNX Runtime threads (never more threads in all than cores);
- chat models: the sequences sharing one decode step (``generation.max_concurrent``) and the
  ONNX Runtime threads.

How (``plan``, Model Analyzer's quick search in small): the spec as it is first, then each
other value of one setting at a time, then the best value of every setting that beat the
spec, together. Every candidate gets the SLO file's capacity search (loadtest/: the offered
rate steps up until p95, the error ratio or the server falls behind). A candidate meets the
SLO when the load test's own verdict at its highest sustained step passes; the best is the
one with the highest sustained QPS (chat: completion tokens/s). Candidates that would not
finish within the time budget are listed as not run.

Served without Triton's response cache (the load test repeats its texts: a cache would
measure itself), on free ports, so a running ``kiln serve`` is not disturbed.

Written to ``<root>/tune/``: the best spec (``tuned.yaml``, the input spec's file with the
winning settings and the SLO as its load test, so ``kiln loadtest tuned.yaml`` checks it
again), ``tune.json`` with every candidate's steps, ``tune.png`` (p95 against QPS per
candidate) and ``tune.html`` (the table and the plot). Exit 1 with the table when no candidate
meets the SLO.
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import yaml
from rich.console import Console
from rich.table import Table

from kiln_core.machine import flags_line, machine_info
from kiln_core.spec import (
    DeploymentSpec,
    LoadShape,
    LoadTest,
    Task,
    merge_overrides,
    parse_spec,
)

TUNE_DIR = "tune"
TUNED_SPEC = "tuned.yaml"
BASELINE = "spec as given"
WARMUP_S = 2.0  # seconds of load at the first step's rate before each candidate's search, not counted


@dataclass(frozen=True)
class Candidate:
    """Spec settings to try: nested overrides of the spec's fields (``{"batching": {...}}``)."""

    name: str
    overrides: dict = field(default_factory=dict)
    setting: str | None = None  # the search_space key it varies (None: the baseline or a combination)

    def apply(self, spec: DeploymentSpec) -> DeploymentSpec:
        return parse_spec(merge_overrides(spec.model_dump(mode="json"), self.overrides), origin=f"candidate {self.name}")


@dataclass
class Result:
    """One candidate's measurement (``run`` is None when it was not run: the budget)."""

    candidate: Candidate
    run: dict | None = None  # the load test's summary.json
    seconds: float = 0.0
    error: str | None = None  # it could not be served (Triton failed to load it)

    @property
    def meets(self) -> bool:
        return self.run is not None and self.run.get("verdict") == "PASS"

    @property
    def qps(self) -> float | None:
        return None if self.run is None else self.run["measured"]["qps"]

    @property
    def tokens_per_s(self) -> float | None:
        stream = None if self.run is None else self.run["measured"].get("stream")
        return None if stream is None else stream["output_tokens_per_s"]

    def score(self, chat: bool) -> float | None:
        """What "best" maximises, among the candidates that meet the SLO."""
        if not self.meets:
            return None
        return self.tokens_per_s if chat else self.qps


def search_space(spec: DeploymentSpec, cores: int) -> dict[str, list[dict]]:
    """Setting -> the values tried (each a nested override; the spec's own value first)."""
    threads = spec.instances.intra_op_threads or cores
    if spec.task is Task.text_generation:
        base = spec.generation.max_concurrent
        return {
            "max_concurrent": [{"generation": {"max_concurrent": n}}
                               for n in _unique([base, max(1, base // 2), min(256, base * 2)])],
            "threads": [{"instances": {"intra_op_threads": t}} for t in _unique([threads, 1, cores])],
        }
    b = spec.batching
    small = max(1, b.max_batch_size // 4)
    return {
        "max_batch_size": [
            {"batching": {"max_batch_size": b.max_batch_size, "preferred_batch_sizes": b.preferred_batch_sizes}},
            {"batching": {"max_batch_size": small,
                          "preferred_batch_sizes": [p for p in b.preferred_batch_sizes if p <= small] or [small]}},
        ] if small < b.max_batch_size else [],
        "queue_delay": [{"batching": {"max_queue_delay_us": d}}
                        for d in _unique([b.max_queue_delay_us, 0, max(4 * b.max_queue_delay_us, 1000)])],
        "instances": [{"instances": {"encoder": n, "intra_op_threads": t}}
                      for n, t in _unique([(spec.instances.encoder, threads), (1, cores), (cores, 1),
                                           *([(2, cores // 2)] if cores >= 4 else [])])
                      if n * t <= max(cores, spec.instances.encoder * threads)],
    }


def _unique(values: Sequence) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def describe(overrides: dict) -> str:
    """'max_batch_size=16, max_queue_delay_us=0': the leaf settings an override changes."""
    parts = []
    for section, values in overrides.items():
        for key, value in values.items():
            parts.append(f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}")
    return ", ".join(parts)


def single_changes(space: dict[str, list[dict]]) -> list[Candidate]:
    """The baseline, then every setting's other values one at a time."""
    out = [Candidate(BASELINE)]
    for setting, values in space.items():
        for value in values[1:]:
            out.append(Candidate(describe(value), value, setting))
    return out


def combined(space: dict[str, list[dict]], results: Sequence[Result], chat: bool) -> Candidate | None:
    """Each setting's best value (among its single changes and the baseline), together; None
    when fewer than two settings improved on the baseline (nothing new to try)."""
    base = next((r.score(chat) for r in results if r.candidate.name == BASELINE), None)
    if base is None:
        base = 0.0  # the spec as given missed the SLO: any candidate that met it improved on it
    winners: dict = {}
    improved = 0
    for setting in space:
        scored = [(r.score(chat), r.candidate) for r in results
                  if r.candidate.setting == setting and r.score(chat) is not None]
        if not scored:
            continue
        score, cand = max(scored, key=lambda sc: sc[0])
        if score > base:
            improved += 1
            winners = merge_overrides(winners, cand.overrides)
    if improved < 2:
        return None
    return Candidate(describe(winners), winners, None)


def best(results: Sequence[Result], chat: bool) -> Result | None:
    """The highest score among those that met the SLO (ties: the lower p95, then the earlier)."""
    met = [r for r in results if r.score(chat) is not None]
    if not met:
        return None
    return max(met, key=lambda r: (r.score(chat), -(r.run["measured"]["p95_ms"] or 0.0)))


def plan(space: dict[str, list[dict]], measure: Callable[[Candidate], Result], budget_s: float, chat: bool,
         clock: Callable[[], float] = time.monotonic, max_candidates: int = 16,
         say: Callable[[str], None] = lambda _: None) -> list[Result]:
    """Measure the baseline, the single changes, then their combination, within `budget_s`:
    a candidate is started only when the slowest one so far would still finish in time (the
    baseline always runs). Returns every candidate, run or not, in order."""
    start = clock()
    results: list[Result] = []
    queue = single_changes(space)[:max_candidates]
    slowest = 0.0
    phase_two_done = False
    while queue:
        cand = queue.pop(0)
        left = budget_s - (clock() - start)
        if results and slowest > left:
            results.append(Result(cand))
            say(f"skipping {cand.name}: {left:.0f} s of the budget left, a candidate has taken {slowest:.0f} s")
            continue
        say(f"candidate {len(results) + 1}: {cand.name}")
        t0 = clock()
        result = measure(cand)
        result.seconds = clock() - t0
        slowest = max(slowest, result.seconds)
        results.append(result)
        if not queue and not phase_two_done:
            phase_two_done = True
            extra = combined(space, results, chat)
            if extra is not None and len(results) < max_candidates and all(r.candidate.overrides != extra.overrides
                                                                             for r in results):
                queue.append(extra)
    return results


# ----------------------------------------------------------------------------- measuring on a real Triton
def capacity_shape(slo: LoadTest, spec: DeploymentSpec) -> LoadShape:
    """The SLO file's shape as a capacity search (chat: over token streams)."""
    update: dict = {"kind": "capacity"}
    if spec.task is Task.text_generation and slo.shape.protocol not in ("stream", "openai"):
        update["protocol"] = "stream"
    if spec.task is not Task.text_generation and slo.shape.protocol == "stream":
        update["protocol"] = "grpc"
    return slo.shape.model_copy(update=update)


def measure_on_triton(spec: DeploymentSpec, manifest, slo: LoadTest, root: Path, console: Console,
                      triton_timeout: float = 180.0) -> Callable[[Candidate], Result]:
    """A `measure` for `plan`: the candidate's repository written under ``root/<n>/``, served by a
    Triton of its own (no response cache), and the capacity search run on it."""
    from kiln.server import ServerError
    from kiln.stack import Stack
    from kiln_runtime.contract import EMBEDDING, SCORES
    from loadtest.runner import Endpoint, run_loadtest, run_once
    from model_repository.writer import write_repository

    shape = capacity_shape(slo, spec)
    output = SCORES if spec.task is Task.text_classification else EMBEDDING
    counter = [0]

    def measure(cand: Candidate) -> Result:
        counter[0] += 1
        folder = root / f"{counter[0]:02d}"
        cspec = cand.apply(spec)
        repo = write_repository(cspec, manifest, out=folder / "model_repository")
        try:
            with Stack(repo, folder / "server", cache_mb=0, triton_timeout=triton_timeout) as stack:
                url = stack.triton.grpc_url if shape.protocol == "grpc" else stack.triton.http_url  # stream: HTTP SSE
                ep = Endpoint(url, cspec.name, output, task=cspec.task.value)
                # first runs are slow (ONNX Runtime's first calls, Python's imports): not part of any step
                run_once(shape, ep, slo.targets, console, run_time=WARMUP_S, rate=shape.start_rate, label="warm-up")
                run = run_loadtest(shape, slo.targets, ep, folder / "loadtest", console)
        except ServerError as err:
            console.print(f"[red]candidate {cand.name}: Triton failed to serve it[/]: {err}")
            return Result(cand, error=str(err))
        return Result(cand, run)

    return measure


# ----------------------------------------------------------------------------- reporting
def _steps(r: Result) -> list[dict]:
    return [] if r.run is None else r.run.get("steps", [])


def table(results: Sequence[Result], chat: bool, winner: Result | None, slo: LoadTest) -> Table:
    t = slo.targets
    targets = ", ".join(f"{k} <= {v:g} ms" for k, v in (("p50", t.p50_ms), ("p95", t.p95_ms), ("p99", t.p99_ms)) if v)
    title = (f"kiln tune: {len(results)} candidates (SLO {targets}"
             f"{f', >= {t.min_qps:g} QPS' if t.min_qps else ''}, errors <= {t.max_error_ratio:.0%})\n{flags_line()}")
    tab = Table(title=title)
    for col in ("#", "candidate", "sustained req/s", *(["tokens/s"] if chat else []), "QPS", "p50 ms", "p95 ms",
                "p99 ms", "errors", "SLO", "s"):
        tab.add_column(col, justify="left" if col == "candidate" else "right")
    for i, r in enumerate(results, 1):
        name = ("[bold]* [/]" if r is winner else "") + r.candidate.name
        if r.run is None:
            tab.add_row(str(i), name, *["-"] * (7 if chat else 6), "[red]could not serve[/]" if r.error
                        else "[dim]not run (budget)[/]", "-")
            continue
        m = r.run["measured"]
        tab.add_row(str(i), name, sustained(r),
                    *([f"{r.tokens_per_s:.1f}" if r.tokens_per_s is not None else "-"] if chat else []),
                    f"{m['qps']:.1f}", _ms(m["p50_ms"]), _ms(m["p95_ms"]), _ms(m["p99_ms"]),
                    f"{m['error_ratio']:.1%}", "[green]meets[/]" if r.meets else "[red]misses[/]", f"{r.seconds:.0f}")
    return tab


def sustained(r: Result) -> str:
    """The highest sustained offered rate; '>= x' when the search ended on a sustained step
    (the server had more to give: raise the shape's max_steps or start_rate to find it)."""
    cap = None if r.run is None else r.run.get("capacity_qps")
    if not cap:
        return "-"
    steps = _steps(r)
    return f"{'>=' if steps and steps[-1]['sustained'] else ''}{cap:.1f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def plot(results: Sequence[Result], slo: LoadTest, path: Path, chat: bool) -> Path:
    """p95 (TTFT for chat) against the QPS each capacity step achieved, one line per candidate,
    the SLO's p95 as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for i, r in enumerate(results, 1):
        steps = [s for s in _steps(r) if s["p95_ms"] is not None]
        if not steps:
            continue
        ax.plot([s["qps"] for s in steps], [s["p95_ms"] for s in steps], marker="o", label=f"{i}. {r.candidate.name}")
        for s in steps:
            if not s["sustained"]:
                ax.plot(s["qps"], s["p95_ms"], marker="x", color="red", markersize=9)
    if slo.targets.p95_ms:
        ax.axhline(slo.targets.p95_ms, linestyle="--", color="grey", label=f"SLO p95 {slo.targets.p95_ms:g} ms")
    ax.set_xlabel("achieved QPS (streams/s)" if chat else "achieved QPS")
    ax.set_ylabel("TTFT p95 (ms)" if chat else "p95 latency (ms)")
    ax.set_yscale("log")
    ax.set_title("kiln tune: p95 vs QPS per candidate (x: step not sustained)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def html_report(results: Sequence[Result], chat: bool, winner: Result | None, png: Path, out: Path, meta: dict) -> Path:
    rows = []
    for i, r in enumerate(results, 1):
        m = None if r.run is None else r.run["measured"]
        cells = [str(i), html.escape(r.candidate.name)]
        if m is None:
            cells += ["-"] * (5 if chat else 4) + ["could not serve" if r.error else "not run (budget)"]
        else:
            cells += [html.escape(sustained(r)), *([f"{r.tokens_per_s or 0:.1f}"] if chat else []),
                      f"{m['qps']:.1f}", _ms(m["p95_ms"]), f"{m['error_ratio']:.1%}", "meets" if r.meets else "misses"]
        style = ' style="font-weight:bold;background:#e8f5e9"' if r is winner else ""
        rows.append(f"<tr{style}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = ["#", "candidate", "sustained req/s", *(["tokens/s"] if chat else []), "QPS", "p95 ms", "errors", "SLO"]
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    verdict = (f"best: {html.escape(winner.candidate.name)}" if winner else "no candidate met the SLO")
    out.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>kiln tune</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        f"<h1>kiln tune: {html.escape(meta['model'])}</h1><p>{verdict}</p>"
        f"<p>{html.escape(meta['machine'])}; {html.escape(meta['when'])}</p>"
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"
        f"<p><img alt='p95 vs QPS' src='data:image/png;base64,{image}'></p></body></html>\n")
    return out


def tuned_spec_text(spec_file: Path | None, spec: DeploymentSpec, winner: Candidate, slo: LoadTest,
                    workdir: str | None, summary_line: str) -> str:
    """The input spec's own YAML with the winning settings and the SLO as its load test (the
    spec in full when it came from no file)."""
    data = (yaml.safe_load(spec_file.read_text()) if spec_file is not None else None) or spec.model_dump(mode="json")
    data = merge_overrides(data, winner.overrides)
    data["loadtest"] = slo.model_dump(mode="json")
    if workdir is not None:
        data["workdir"] = workdir
    parse_spec(data, origin="the tuned spec")  # what is written must load
    header = (f"# written by `kiln tune` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC ({flags_line()})\n"
              f"# {summary_line}\n")
    return header + yaml.safe_dump(data, sort_keys=False)


@dataclass
class TuneOutcome:
    results: list[Result]
    winner: Result | None
    tuned: Path | None  # the spec written (None: nothing met the SLO)
    folder: Path

    @property
    def exit_code(self) -> int:
        return 0 if self.winner is not None else 1


def run_tune(spec: DeploymentSpec, spec_file: Path | None, slo: LoadTest, console: Console, budget_s: float = 600.0,
             out: Path | None = None, workdir: str | None = None, max_candidates: int = 16,
             measure: Callable[[Candidate], Result] | None = None) -> TuneOutcome:
    """Search, report, and write the best spec (see the module's doc)."""
    from export.reuse import ensure_export

    chat = spec.task is Task.text_generation
    folder = spec.root / TUNE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    manifest = ensure_export(spec, console)
    served = spec.with_precision(manifest.served_precision(spec.serve_precision))  # what each candidate serves
    space = search_space(served, machine_info()["cores"])
    measure = measure or measure_on_triton(served, manifest, slo, folder, console)
    n = len(single_changes(space))
    console.print(f"[bold cyan]tune[/] {spec.name}: {n} candidates first ({', '.join(k for k, v in space.items() if v)}), "
                  f"budget {budget_s:.0f} s, SLO from the load test's capacity search")
    results = plan(space, measure, budget_s, chat, max_candidates=max_candidates,
                   say=lambda msg: console.print(f"[bold cyan]tune[/] {msg}"))
    winner = best(results, chat)
    console.print(table(results, chat, winner, slo))
    if any(sustained(r).startswith(">=") for r in results):
        console.print("  >=: the capacity search ended before that candidate fell behind (raise the SLO file's "
                      "shape.max_steps, step_factor or start_rate to tell such candidates apart)")
    png = plot(results, slo, folder / "tune.png", chat)
    meta = {"model": spec.name, "machine": flags_line(), "when": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"}
    report = html_report(results, chat, winner, png, folder / "tune.html", meta)
    record = {
        **meta, "machine_info": machine_info(), "budget_s": budget_s, "slo": slo.model_dump(mode="json"),
        "search_space": space, "best": winner.candidate.name if winner else None,
        "candidates": [{"name": r.candidate.name, "overrides": r.candidate.overrides, "seconds": r.seconds,
                        "meets": r.meets, "error": r.error, "run": r.run} for r in results],
    }
    (folder / "tune.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    tuned = None
    if winner is None:
        console.print("[red]no candidate met the SLO[/]: the table above says by how much each missed "
                      f"(reports: {report})")
    else:
        what = (f"{winner.tokens_per_s:.1f} completion tokens/s" if chat else f"{winner.qps:.1f} QPS")
        line = f"best of {sum(r.run is not None for r in results)} candidates: {winner.candidate.name} ({what} within the SLO)"
        tuned = out or folder / TUNED_SPEC
        tuned.parent.mkdir(parents=True, exist_ok=True)
        tuned.write_text(tuned_spec_text(spec_file, spec, winner.candidate, slo, workdir, line))
        console.print(f"[green]{line}[/]\n  spec: {tuned}\n  report: {report} (plot {png})")
    return TuneOutcome(results, winner, tuned, folder)
