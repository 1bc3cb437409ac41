"""`kiln bench SPEC --cache`: what Triton's response cache buys an encoder when some requests
repeat earlier ones.

Two Tritons serve the same repository side by side, one with the response cache (as `kiln
serve` runs it) and one without (``cache_mb=0``), each behind its own gateway. Closed loops of
the fault suite's light aiohttp client send single-sentence embeddings through each in turn
(runs interleaved, the row is their median): each text is, with probability ``repeat_ratio``,
one sent earlier in the same run, else new (a base sentence with a number no run reuses). Both
paths get the same texts in the same order per run, so the only difference is the cache.

Reported: requests/s within the run's window, p50 / p95 latency of the answers, the cache's
hits and misses over the runs (from the cached gateway's /metrics: Triton's own counts) and
the ratio cache on / off. Everything goes to WORKDIR/NAME/bench-cache.json with the machine's
CPU facts.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
from rich.console import Console
from rich.table import Table

from kiln.bench_gateway import gateway_options
from kiln.bench_replicas import ModelEmbedder, window_rate
from kiln.faults import Outcome
from kiln.loadgen import percentile_ms
from kiln.stack import Stack
from kiln_core.machine import flags_line, machine_info
from kiln_core.spec import DeploymentSpec, Task

CACHE_FILE = "bench-cache.json"
ON, OFF = "cache on", "cache off"


def repeating_texts(base: Sequence[str], repeat_ratio: float, seed: int, tag: str = "") -> Iterator[str]:
    """An endless stream of texts: with probability `repeat_ratio` one already given (uniformly
    among them), else a new one (a base sentence numbered `tag`-n, unique in the stream)."""
    if not 0.0 <= repeat_ratio < 1.0 or not base:
        raise ValueError(f"repeat_ratio must be in [0, 1) and base texts given (got {repeat_ratio}, {len(base)})")
    rng = random.Random(seed)
    seen: list[str] = []
    while True:
        if seen and rng.random() < repeat_ratio:
            yield rng.choice(seen)
        else:
            text = f"{base[len(seen) % len(base)]} ({tag}{len(seen)})"
            seen.append(text)
            yield text


@dataclass(frozen=True)
class CacheRow:
    path: str  # ON | OFF
    clients: int
    runs: int
    requests: int  # answered 200, all runs
    errors: int
    per_s: float  # median over runs of requests/s within the window
    p50_ms: float | None
    p95_ms: float | None
    hits: int | None = None  # the response cache's, over all runs (None: no cache)
    misses: int | None = None
    x_off: float | None = None  # per_s / the OFF row's
    per_s_runs: tuple[float, ...] = ()


def cache_row(path: str, clients: int, runs: Sequence[Sequence[Outcome]], seconds: float,
              counts: tuple[int, int] | None = None) -> CacheRow:
    if not runs or not any(runs):
        raise ValueError("no runs: nothing was timed")
    rates = tuple(window_rate(r, seconds, per_token=False) for r in runs)
    outcomes = [o for r in runs for o in r]
    ok = [o.seconds for o in outcomes if o.status == 200]
    hits, misses = counts if counts is not None else (None, None)
    return CacheRow(path, clients, len(runs), len(ok), len(outcomes) - len(ok), float(np.median(rates)),
                    percentile_ms(ok, 50), percentile_ms(ok, 95), hits, misses, None, rates)


def with_ratio(rows: Sequence[CacheRow]) -> list[CacheRow]:
    off = next((r.per_s for r in rows if r.path == OFF), None)
    return [replace(r, x_off=None if not off else r.per_s / off) for r in rows]


def cache_table(title: str, rows: Sequence[CacheRow], repeat_ratio: float) -> Table:
    table = Table(title=title, caption=f"{flags_line()}\n{repeat_ratio:.0%} of the requests repeat an earlier text "
                                       "of the same run; both paths get the same texts in the same order")
    for col in ("path", "clients", "runs", "answered", "errors", "throughput", "p50 ms", "p95 ms", "hit rate",
                "x cache off"):
        table.add_column(col, justify="left" if col == "path" else "right")

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    for r in rows:
        looked = (r.hits or 0) + (r.misses or 0)
        rate = "-" if r.hits is None or not looked else f"{r.hits / looked:.0%}"
        table.add_row(r.path, str(r.clients), str(r.runs), str(r.requests), str(r.errors), f"{r.per_s:.1f} req/s",
                      ms(r.p50_ms), ms(r.p95_ms), rate, "" if r.x_off is None else f"{r.x_off:.2f}x")
    return table


def cache_counts(gateway_url: str, model: str) -> tuple[int, int]:
    """(hits, misses) from the gateway's /metrics (Triton's response-cache counts)."""
    with urllib.request.urlopen(gateway_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    got = {"hits": 0, "misses": 0}
    for line in text.splitlines():
        for kind in got:
            if line.startswith(f'kiln_gateway_response_cache_{kind}_total{{model="{model}"}}'):
                got[kind] = int(float(line.rsplit(" ", 1)[1]))
    return got["hits"], got["misses"]


async def _closed_loop(url: str, model: str, clients: int, seconds: float, texts: Iterator[str],
                       deadline_s: float = 30.0) -> list[Outcome]:
    """`clients` clients sending the next text of the shared stream as each answer arrives."""
    send = ModelEmbedder(url, clients, model)
    try:
        await asyncio.gather(*(send(f"warm-up {k}", deadline_s) for k in range(clients)))
        end = time.perf_counter() + seconds

        async def worker() -> list[Outcome]:
            out = []
            while time.perf_counter() < end:
                out.append(await send(next(texts), deadline_s))
            return out

        return [o for per in await asyncio.gather(*(worker() for _ in range(clients))) for o in per]
    finally:
        await send.close()


class CacheBenchResult(NamedTuple):
    rows: list[CacheRow]
    path: Path


def run_cache_bench(spec: DeploymentSpec, console: Console | None = None, repeat_ratio: float = 0.3,
                    clients: int = 8, seconds: float = 4.0, runs: int = 2) -> CacheBenchResult:
    """Serve the spec's repository twice (cache on, cache off), run the interleaved closed
    loops, print and save the table. The export must exist; the repository is written here."""
    from contextlib import ExitStack

    from export.variants import calibration_texts
    from kiln_core.card import RepositoryCard
    from kiln_core.manifest import ExportManifest
    from model_repository.writer import write_repository

    if spec.task is not Task.feature_extraction:
        raise ValueError(f"kiln bench --cache measures embeddings; {spec.name} is {spec.task.value}")
    console = console or Console(stderr=True)
    manifest = ExportManifest.read(spec.export_dir)
    spec = spec.with_precision(manifest.served_precision(spec.serve_precision))
    base = list(calibration_texts())
    t_start, load_before = time.perf_counter(), os.getloadavg()[0]

    def step(msg: str) -> None:
        console.print(f"[bold cyan]bench[/] {msg}")

    with ExitStack() as cleanup:
        repo = write_repository(spec, manifest)
        card = RepositoryCard.read(repo)
        if not card.response_cache_mb:
            raise ValueError(f"{spec.name}'s repository has no response cache (the spec turned it off, or the served "
                             f"{card.precision} variant is not batch-invariant): nothing to compare")
        step(f"two Tritons on {repo}: one with a {card.response_cache_mb} MiB response cache, one without")
        stacks = {
            ON: cleanup.enter_context(Stack(repo, spec.server_dir / "cache-on",
                                            gateway=gateway_options(spec.root / "bench-cache-on-gateway.log"))),
            OFF: cleanup.enter_context(Stack(repo, spec.server_dir / "cache-off", cache_mb=0,
                                             gateway=gateway_options(spec.root / "bench-cache-off-gateway.log"))),
        }
        outcomes: dict[str, list[list[Outcome]]] = {ON: [], OFF: []}
        before = cache_counts(stacks[ON].gateway_url, spec.name)
        step(f"{clients} closed-loop clients, {runs} runs of {seconds:g}s per path, interleaved; "
             f"{repeat_ratio:.0%} repeats")
        for r in range(runs):
            for path in ((ON, OFF) if r % 2 == 0 else (OFF, ON)):
                texts = repeating_texts(base, repeat_ratio, seed=r, tag=f"run{r}-")
                run = asyncio.run(_closed_loop(stacks[path].gateway_url, spec.name, clients, seconds, texts))
                outcomes[path].append(run)
                ok = sum(1 for o in run if o.status == 200)
                step(f"  {path}, run {r + 1}: {window_rate(run, seconds, False):.1f} req/s "
                     f"({ok} answered, {len(run) - ok} errors)")
        after = cache_counts(stacks[ON].gateway_url, spec.name)
    counts = (after[0] - before[0], after[1] - before[1])
    rows = with_ratio([cache_row(ON, clients, outcomes[ON], seconds, counts),
                       cache_row(OFF, clients, outcomes[OFF], seconds)])
    console.print(cache_table(f"response cache: {spec.name} ({card.precision}), single-sentence embeddings through "
                              f"the gateway", rows, repeat_ratio))
    if load_before > 0.5 * (os.cpu_count() or 1):
        console.print(f"  [yellow]note[/]: the machine was busy before the bench began (1-minute load "
                      f"{load_before:.1f}): figures are noisy, ratios less so")
    doc = {
        "name": spec.name, "serve_precision": card.precision, "response_cache_mb": card.response_cache_mb,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "flags_line": flags_line(), "cpus": os.cpu_count(),
                    "load_1min": {"before": load_before, "after": os.getloadavg()[0]}},
        "settings": {"repeat_ratio": repeat_ratio, "clients": clients, "seconds": seconds, "runs": runs},
        "rows": [asdict(r) for r in rows],
    }
    spec.root.mkdir(parents=True, exist_ok=True)
    out = spec.root / CACHE_FILE
    out.write_text(json.dumps(doc, indent=2) + "\n")
    step(f"done in {time.perf_counter() - t_start:.0f}s -> {out}")
    return CacheBenchResult(rows, out)
