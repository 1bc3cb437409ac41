"""`kiln bench SPEC --replicas N`: what routing over N Tritons costs, and what it buys.

Two gateways, the same code, run side by side on the same machine: one over the first Triton
only, one over all N (``kiln.gateway.pool``, what ``kiln serve --replicas N`` runs). Both
Tritons serve the same repository. Comparing the two gateways (not the gateway with Triton)
isolates the pool: its choice of a backend, its bookkeeping and the other replica's share of
the CPUs.

- routing overhead: the same single-sentence embeddings (chat: the time to first token of a
  short greedy stream) through each gateway in turn, the order swapped every other round so
  neither path always goes second; "added p50" is the N-backend p50 minus the 1-backend p50,
  and the target is judged on the paired figure: the median over rounds of (N-backend time
  minus 1-backend time in the same round), with a bootstrap 95% interval, so drift between
  rounds cancels. Target: <= 1 ms (the issue's bar), printed PASS / MISS, never raised.
- the pool's own cost, in process: ``BackendPool.embed`` over N backends that answer at once,
  against awaiting one such backend bare (the pick, the bookkeeping, the circuit): what routing
  costs in CPU, free of the network and of the other Triton's share of the cores.
- throughput: closed loops of the fault suite's light aiohttp client (``kiln.faults``; the
  openai package would spend the CPU the servers need) through each gateway, runs interleaved:
  embeddings requests/s from 16 clients, chat completion tokens/s from ``max_concurrent``
  clients, each counted over what completed within the run's window. On a machine of 2 cores both Tritons share them, so no gain is expected there: the
  ratio is reported as measured.

The 2-backend gateway's ``/metrics`` is read at the end, so the result shows that requests
really reached every Triton. Everything goes to WORKDIR/NAME/bench-replicas.json, beside
bench.json, with the machine's CPU facts.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from kiln.bench import Target, print_targets
from kiln.bench_gateway import (
    HttpConnection,
    OverheadRow,
    gateway_options,
    overhead_rows,
    overhead_table,
)
from kiln.faults import Chatter, Embedder, Outcome, closed_loop
from kiln.gateway.runner import GatewayProcess
from kiln.loadgen import percentile_ms
from kiln.stack import Stack
from kiln_core.machine import flags_line, machine_info
from kiln_core.manifest import tool_versions
from kiln_core.spec import DeploymentSpec, Task

REPLICAS_FILE = "bench-replicas.json"
MAX_ROUTING_ADDED_P50_MS = 1.0  # the bar: the pool adds at most this to the 1-backend gateway's p50
EMBED_CLIENTS = 16
CHAT_MAX_TOKENS = 32  # each chat request of the throughput loop
TTFT_MAX_TOKENS = 4  # the short stream of the chat routing rounds
BACKEND_COUNTER = "kiln_gateway_backend_requests_total"


def path_name(backends: int) -> str:
    """The row label of the gateway over `backends` Tritons."""
    return f"gateway -> {backends} Triton{'s' if backends > 1 else ''}"


def task_kind(spec: DeploymentSpec) -> str:
    """"embedding" or "chat": the requests this bench sends; a classifier has no OpenAI route to bench."""
    if spec.task is Task.feature_extraction:
        return "embedding"
    if spec.task is Task.text_generation:
        return "chat"
    raise ValueError(f"kiln bench --replicas measures embeddings or chat; {spec.name} is {spec.task.value}")


# ----------------------------------------------------------------------------- results (pure)
@dataclass(frozen=True)
class ThroughputRow:
    path: str
    backends: int  # Tritons behind the gateway
    clients: int  # closed-loop clients
    runs: int
    requests: int  # answered 200, all runs (those after the window too)
    errors: int  # any other answer (shed, failed, cut), all runs
    per_s: float  # median over runs, within each run's window: requests/s (embeddings) or completion tokens/s (chat)
    unit: str  # "req/s" | "tok/s"
    p50_ms: float | None  # latency of the 200s, all runs pooled
    p95_ms: float | None
    x_one_backend: float | None = None  # per_s / the 1-backend row's
    per_s_runs: tuple[float, ...] = ()


def window_rate(outcomes: Sequence[Outcome], seconds: float, per_token: bool) -> float:
    """Answers (or their completion tokens) per second that completed within `seconds` of the
    first request: a closed loop's steady rate. Dividing by the span to the last answer
    instead would charge a path for its slowest final request (the maximum over all clients
    of their last one), which says more about its tail than its throughput."""
    if seconds <= 0:
        raise ValueError(f"the window must be positive, got {seconds}")
    if not outcomes:
        return 0.0
    end = min(o.started for o in outcomes) + seconds
    done = [o for o in outcomes if o.status == 200 and o.ended <= end]
    return (sum(o.tokens for o in done) if per_token else len(done)) / seconds


def throughput_row(backends: int, clients: int, runs: Sequence[Sequence[Outcome]], seconds: float, per_token: bool
                   ) -> ThroughputRow:
    """A row from the outcomes of each closed-loop run (of `seconds`) through one gateway."""
    if not runs or not any(runs):
        raise ValueError("no runs: nothing was timed")
    rates = tuple(window_rate(r, seconds, per_token) for r in runs)
    outcomes = [o for r in runs for o in r]
    ok = [o.seconds for o in outcomes if o.status == 200]
    return ThroughputRow(path_name(backends), backends, clients, len(runs), len(ok), len(outcomes) - len(ok),
                         float(np.median(rates)), "tok/s" if per_token else "req/s", percentile_ms(ok, 50),
                         percentile_ms(ok, 95), None, rates)


def with_ratios(rows: Sequence[ThroughputRow]) -> list[ThroughputRow]:
    """Each row's throughput over the 1-backend row's (None without one, or when it did nothing)."""
    one = next((r.per_s for r in rows if r.backends == 1), None)
    return [replace(r, x_one_backend=None if not one else r.per_s / one) for r in rows]


@dataclass(frozen=True)
class PairedDifference:
    """Median over rounds of (path time - baseline time in the same round), in ms, with a
    bootstrap 95% interval of that median."""

    median_ms: float
    low_ms: float
    high_ms: float
    rounds: int


def paired_difference(path_s: Sequence[float], baseline_s: Sequence[float], resamples: int = 2000,
                      seed: int = 0) -> PairedDifference:
    d = (np.asarray(path_s, dtype=float) - np.asarray(baseline_s, dtype=float)) * 1e3
    if d.size == 0 or len(path_s) != len(baseline_s):
        raise ValueError(f"paired rounds: need equal, non-zero counts (got {len(path_s)} and {len(baseline_s)})")
    rng = np.random.default_rng(seed)
    medians = np.median(d[rng.integers(0, d.size, size=(resamples, d.size))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return PairedDifference(float(np.median(d)), float(low), float(high), int(d.size))


def routing_target(paired: PairedDifference | None, backends: int, kind: str) -> Target:
    """The issue's target on the pool's added p50, as the paired median (N/A when not measured)."""
    what = "single-sentence embeddings" if kind == "embedding" else "time to first token of a short chat stream"
    return Target(f"routing over {backends} Tritons adds <= {MAX_ROUTING_ADDED_P50_MS:g} ms p50 to {what} "
                  "(paired median against the same gateway over one)",
                  None if paired is None else paired.median_ms, MAX_ROUTING_ADDED_P50_MS, at_most=True, unit="ms")


class _InstantBackend:
    """A backend that answers at once: what is left to time is the caller's own work."""

    def __init__(self, url: str):
        self.url, self.up = url, True
        self.vectors = np.zeros((1, 4), dtype=np.float32)

    async def embed(self, model: str, texts: list[str], max_batch: int, request_id: str = "") -> np.ndarray:
        return self.vectors


def pool_cost_us(backends: int, calls: int = 20000, repeats: int = 5) -> dict[str, float]:
    """Microseconds per request that ``BackendPool.embed`` over `backends` instant backends adds
    to awaiting one bare (best of `repeats` runs of `calls` each, so a busy moment drops out)."""
    from kiln.gateway.pool import BackendPool

    bare = _InstantBackend("bare")
    pool = BackendPool([_InstantBackend(f"b{i}") for i in range(backends)])

    async def timed(call) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                await call("m", ["hello"], 8)
            best = min(best, (time.perf_counter() - t0) / calls)
        return best * 1e6

    async def both() -> tuple[float, float]:
        return await timed(bare.embed), await timed(pool.embed)

    bare_us, pool_us = asyncio.run(both())
    return {"backends": backends, "bare_us": bare_us, "pool_us": pool_us, "added_us": pool_us - bare_us}


def routing_table(title: str, rows: Sequence[OverheadRow], paired: PairedDifference | None = None,
                  pool: dict[str, float] | None = None) -> Table:
    table = overhead_table(title, rows)
    lines = ["the same requests through both gateways, in turn (order swapped every other round); "
             "added = p50 minus the 1-Triton gateway's p50"]
    if paired is not None:
        lines.append(f"paired: median over {paired.rounds} rounds of (N - 1 Triton) {paired.median_ms:+.2f} ms, "
                     f"95% interval {paired.low_ms:+.2f} .. {paired.high_ms:+.2f} ms")
    if pool is not None:
        lines.append(f"the pool in process over {pool['backends']:.0f} instant backends: {pool['added_us']:+.1f} us a "
                     f"request (bare await {pool['bare_us']:.1f} us, pool {pool['pool_us']:.1f} us)")
    table.caption = "\n".join(lines)
    return table


def throughput_note(cores: int) -> str:
    return (f"every Triton shares this machine's {cores} CPU cores (and the clients run here too): "
            + ("on 2 cores no gain is expected; " if cores <= 2 else "")
            + "the ratio is what routing over the replicas gives on this machine, as measured")


def throughput_table(title: str, rows: Sequence[ThroughputRow], cores: int) -> Table:
    table = Table(title=title, caption=f"{flags_line()}\n{throughput_note(cores)}")
    for col in ("path", "clients", "runs", "answered", "errors", "throughput", "p50 ms", "p95 ms", "x 1 Triton"):
        table.add_column(col, justify="left" if col == "path" else "right")

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    for r in rows:
        table.add_row(r.path, str(r.clients), str(r.runs), str(r.requests), str(r.errors), f"{r.per_s:.1f} {r.unit}",
                      ms(r.p50_ms), ms(r.p95_ms), "" if r.x_one_backend is None else f"{r.x_one_backend:.2f}x")
    return table


def backend_ok_counts(metrics_text: str) -> dict[str, float]:
    """Requests each backend answered, from a gateway's /metrics (the pool's counter, outcome ok)."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith(BACKEND_COUNTER + "{") and 'outcome="ok"' in line:
            backend = line.split('backend="', 1)[1].split('"', 1)[0]
            out[backend] = float(line.rsplit(" ", 1)[1])
    return out


# ----------------------------------------------------------------------------- timing
def alternating(calls: dict[str, Callable[[int], float]], rounds: int, warmup: int = 10) -> dict[str, list[float]]:
    """Each call once per round, in turn, the order reversed every other round (so neither
    path always runs right after the other); each call returns the seconds it measured."""
    names = list(calls)
    for i in range(warmup):
        for name in names:
            calls[name](i)
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            out[name].append(calls[name](i))
    return out


def elapsed(call: Callable[[int], object]) -> Callable[[int], float]:
    """`call` timed: its wall time in seconds."""
    def timed(i: int) -> float:
        t0 = time.perf_counter()
        call(i)
        return time.perf_counter() - t0
    return timed


def ttft_s(conn: HttpConnection, model: str, prompt: str, max_tokens: int) -> float:
    """Seconds to the first content chunk of a streamed greedy chat answer (read to its end)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first = None
    for line in conn.first_event("/v1/chat/completions", body):
        if first is None and line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
            first = time.perf_counter()
    return (first or time.perf_counter()) - t0


def routing_overhead(urls: dict[int, str], model: str, kind: str, texts: Sequence[str], rounds: int
                     ) -> tuple[list[OverheadRow], PairedDifference]:
    """The same requests through each gateway ({backends: url}, the 1-backend one first)."""
    conns = {n: HttpConnection(url) for n, url in urls.items()}
    try:
        if kind == "embedding":
            calls = {path_name(n): elapsed(lambda i, c=c: c.post("/v1/embeddings", {
                "model": model, "input": texts[i % len(texts)], "encoding_format": "float"})) for n, c in conns.items()}
            suffix = ""
        else:
            calls = {path_name(n): lambda i, c=c: ttft_s(c, model, texts[i % len(texts)], TTFT_MAX_TOKENS)
                     for n, c in conns.items()}
            suffix = ", TTFT"
        latencies = alternating(calls, rounds, warmup=20 if kind == "embedding" else 3)
    finally:
        for c in conns.values():
            c.close()
    rows = overhead_rows(latencies, path_name(min(urls)), 1)
    paired = paired_difference(latencies[path_name(max(urls))], latencies[path_name(min(urls))])
    return [replace(r, path=r.path + suffix) for r in rows], paired


class ModelEmbedder(Embedder):
    def __init__(self, url: str, connections: int, model: str):
        super().__init__(url, connections)
        self.model = model

    def body(self, text: str) -> dict:
        return {**super().body(text), "model": self.model}


class ModelChatter(Chatter):
    def __init__(self, url: str, connections: int, max_tokens: int, model: str):
        super().__init__(url, connections, max_tokens)
        self.model = model

    def body(self, text: str) -> dict:
        return {**super().body(text), "model": self.model}


def closed_loop_run(url: str, model: str, kind: str, clients: int, seconds: float, max_tokens: int = CHAT_MAX_TOKENS
                    ) -> list[Outcome]:
    """One closed-loop run of `clients` through the gateway at `url` (one warm-up request each first)."""
    async def run() -> list[Outcome]:
        send = (ModelEmbedder(url, clients, model) if kind == "embedding"
                else ModelChatter(url, clients, max_tokens, model))
        try:
            return await closed_loop(send, clients, seconds, deadline_s=30.0 if kind == "embedding" else 300.0)
        finally:
            await send.close()

    return asyncio.run(run())


def one_backend_gateway(stack: Stack, log_file: Path) -> GatewayProcess:
    """A second gateway process, configured as the stack's own, but over its first Triton only."""
    from kiln.processes import free_port

    options = gateway_options(log_file)
    config = options.config.model_copy(update={"triton_grpc": stack.triton.grpc_url, "triton_replicas": [],
                                               "triton_ids": [stack.triton.server_id],
                                               "repositories": stack.repositories, "port": free_port()})
    return GatewayProcess(config, log_file=log_file, env={config.keys_env: options.keys or ""})


def metrics_text(gateway_url: str) -> str:
    with urllib.request.urlopen(gateway_url + "/metrics", timeout=10) as r:
        return r.read().decode()


# ----------------------------------------------------------------------------- the bench
class ReplicaBenchResult(NamedTuple):
    routing: list[OverheadRow]
    throughput: list[ThroughputRow]
    target: Target
    backends: list[str]  # the Tritons' gRPC addresses, the first one first
    backend_requests: dict[str, dict[str, float]]  # gateway path -> backend -> requests answered ok
    path: Path  # the JSON written
    paired: PairedDifference | None = None  # the routing target's figure
    pool: dict[str, float] | None = None  # the pool's own cost in process (pool_cost_us)


def run_replica_bench(spec: DeploymentSpec, console: Console | None = None, replicas: int = 2,
                      rounds: int | None = None, seconds: float = 4.0, runs: int = 2, clients: int | None = None,
                      max_tokens: int = CHAT_MAX_TOKENS) -> ReplicaBenchResult:
    """Start `replicas` Tritons with a gateway over all of them and a second gateway over the
    first; measure the routing overhead and the throughput of each; print, save, return.

    rounds: routing rounds (default 200 embeddings, 20 chat); seconds x runs: each gateway's
    closed-loop time (runs interleaved, the row is their median); clients: closed-loop
    clients (default 16 for embeddings, the spec's max_concurrent for chat). The export must
    exist (``ensure_export``); the repository is written here, as ``kiln bench`` does.
    """
    from contextlib import ExitStack

    from kiln_core.manifest import ExportManifest
    from model_repository.writer import write_repository

    if replicas < 2:
        raise ValueError(f"the replica bench compares 1 Triton with N >= 2 (got replicas={replicas})")
    kind = task_kind(spec)
    console = console or Console(stderr=True)
    manifest = ExportManifest.read(spec.export_dir)
    spec = spec.with_precision(manifest.served_precision(spec.serve_precision))
    if kind == "embedding":
        from export.variants import calibration_texts

        texts: Sequence[str] = calibration_texts()
        rounds = rounds or 200
        clients = clients or EMBED_CLIENTS
    else:
        from kiln.bench_lm import PROMPTS

        texts = PROMPTS
        rounds = rounds or 20
        clients = clients or spec.generation.max_concurrent
    cores = os.cpu_count() or 1
    t_start, load_before = time.perf_counter(), os.getloadavg()[0]

    def step(msg: str) -> None:
        console.print(f"[bold cyan]bench[/] {msg}")

    with ExitStack() as cleanup:
        step(f"writing {spec.repository_dir}; starting {replicas} Tritons, a gateway over all of them and one over "
             "the first")
        write_repository(spec, manifest)
        stack = cleanup.enter_context(Stack(spec.repository_dir, spec.server_dir, replicas=replicas, cache_mb=0,
                                            gateway=gateway_options(spec.root / "bench-replicas-gateway.log")))
        single = cleanup.enter_context(one_backend_gateway(stack, spec.root / "bench-replicas-gateway-1.log"))
        single.wait_ready()
        urls = {1: single.url, replicas: stack.gateway_url}

        step(f"routing overhead: {rounds} rounds of {'single-sentence embeddings' if kind == 'embedding' else 'TTFT'}"
             f", {path_name(1)} vs {path_name(replicas)}")
        routing, paired = routing_overhead(urls, spec.name, kind, texts, rounds)

        per_token = kind == "chat"
        outcomes: dict[int, list[list[Outcome]]] = {n: [] for n in urls}
        step(f"throughput: {clients} closed-loop clients, {runs} runs of {seconds:g}s per gateway, interleaved")
        for r in range(runs):
            for n, url in urls.items():
                run = closed_loop_run(url, spec.name, kind, clients, seconds, max_tokens)
                outcomes[n].append(run)
                ok = sum(1 for o in run if o.status == 200)
                step(f"  {path_name(n)}, run {r + 1}: {window_rate(run, seconds, per_token):.1f} "
                     f"{'tok/s' if per_token else 'req/s'} ({ok} answered, {len(run) - ok} errors)")
        throughput = with_ratios([throughput_row(n, clients, outcomes[n], seconds, per_token) for n in urls])
        backend_requests = {path_name(n): backend_ok_counts(metrics_text(url)) for n, url in urls.items()}
        backends = [b.grpc_url for b in stack.backends]

    pool = pool_cost_us(replicas)
    target = routing_target(paired, replicas, kind)
    console.print(routing_table(f"routing overhead: {spec.name}, {replicas} Tritons vs 1", routing, paired, pool))
    print_targets(console, {"routing": target})
    console.print(throughput_table(
        f"throughput: {spec.name} ({'embeddings' if kind == 'embedding' else 'chat completion tokens'}), "
        f"{replicas} Tritons vs 1, {cores} CPU cores", throughput, cores))
    for name, per in backend_requests.items():
        console.print(f"  {name}: requests answered per Triton: "
                      + ", ".join(f"{url} {per.get(url, 0):.0f}" for url in backends))
    if load_before > 0.5 * cores:
        console.print(f"  [yellow]note[/]: the machine was busy before the bench began (1-minute load "
                      f"{load_before:.1f} on {cores} cores): figures are noisy, ratios less so")
    doc = {
        "name": spec.name, "task": spec.task.value, "serve_precision": spec.serve_precision.value,
        "replicas": replicas,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "flags_line": flags_line(), "cpus": cores, "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_1min": {"before": load_before, "after": os.getloadavg()[0]}},
        "settings": {"rounds": rounds, "seconds": seconds, "runs": runs, "clients": clients,
                     "max_tokens": max_tokens if kind == "chat" else None},
        "tools": tool_versions("onnxruntime", "tritonclient", "nvidia-pytriton", "aiohttp"),
        "routing": {"rows": [asdict(r) for r in routing], "paired": asdict(paired), "pool_in_process": pool,
                    "target": target.as_dict()},
        "throughput": {"rows": [asdict(r) for r in throughput], "note": throughput_note(cores)},
        "backends": backends,
        "backend_requests": backend_requests,
    }
    spec.root.mkdir(parents=True, exist_ok=True)
    out = spec.root / REPLICAS_FILE
    out.write_text(json.dumps(doc, indent=2) + "\n")
    step(f"done in {time.perf_counter() - t_start:.0f}s -> {out}")
    return ReplicaBenchResult(routing, throughput, target, backends, backend_requests, out, paired, pool)
