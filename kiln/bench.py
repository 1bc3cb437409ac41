"""`kiln bench`: one run that times every way this machine can embed the spec's texts.

Paths, each text in -> pooled output out (tokenization included everywhere):

- PyTorch eager: the transformers model, fp32, ``torch.no_grad``, pooled as the spec says
- ONNX Runtime in-process: the manifest's fp32 and int8 graphs (and the served precision),
  CPU provider, ``intra_op_threads`` from the spec, the exported fast tokenizer
- served over the OpenAI API, through one load generator (kiln/loadgen.py, single-sentence
  requests from 1 and `concurrency` closed-loop clients): the kiln gateway in front of Triton,
  and the baseline a user would write instead, FastAPI + PyTorch (kiln/baselines/fastapi_torch.py)
- Triton gRPC direct (tritonclient): batch 1, 8, 32, and batch 1 from `concurrency` clients

Each path is warmed up, then every row is timed in `runs` runs (served rows interleaved:
run 1 of every server, then run 2, ...), each for at most ``repeats`` requests or
``seconds`` (at least ``MIN_REQUESTS``); a row is the median of its runs. Rows carry
sentences/s and p50/p95 latency per request. Targets compare the served paths with
in-process ONNX Runtime, PyTorch and the FastAPI server; a missed target is reported,
never raised: the caller decides what it means.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from kiln_core.machine import flags_line, machine_info
from kiln_core.manifest import ExportManifest, tool_versions
from kiln_core.spec import DeploymentSpec, Precision, Task

BENCH_FILE = "bench.json"
BATCHES = (1, 8, 32)
RUNS = 3
MIN_REQUESTS = 3
PYTORCH, ONNXRUNTIME, SERVED = "pytorch", "onnxruntime", "triton"
GATEWAY, FASTAPI = "gateway", "fastapi"  # served over the OpenAI API (kiln/loadgen.py)
KILN_SERVED = (SERVED, GATEWAY)  # rows that get a served / in-process ratio
# targets (reported, never asserted)
MAX_LATENCY_X_INPROCESS = 1.5  # gateway single-sentence p50 / in-process batch-1 p50 (served precision)
MIN_CONCURRENT_X_INPROCESS = 0.8  # gateway, N clients / in-process batch N (sentences/s)
MIN_CONCURRENT_X_FASTAPI = 3.0  # gateway, N clients / FastAPI + PyTorch, N clients
# precisions timed in-process besides the served one (fp16 is a GPU variant: not timed on CPU)
INPROCESS_PRECISIONS = (Precision.fp32, Precision.int8)


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class BenchRow:
    path: str  # what the table shows
    kind: str  # pytorch | onnxruntime | triton
    precision: str
    batch: int  # sentences per request
    concurrency: int  # clients sending at once
    requests: int  # timed requests (all clients together)
    sentences_per_s: float
    p50_ms: float  # latency per request
    p95_ms: float
    x_pytorch: float | None = None  # throughput / PyTorch eager, same sentences in flight (batch x clients)
    served_over_inprocess: float | None = None  # served / in-process ORT, serve precision, same sentences in flight
    runs: int = 1  # the figures are the median over this many runs
    sentences_per_s_runs: tuple[float, ...] = ()  # each run's figure


@dataclass(frozen=True)
class Target:
    description: str
    value: float | None  # the measured ratio (or figure); None when a row it needs is missing
    threshold: float
    at_most: bool = False  # passes when value <= threshold (a latency), else value >= threshold
    unit: str = "x"  # "x": a ratio of this run's figures; "ms": an absolute latency

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.threshold if self.at_most else self.value >= self.threshold

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "MISS", None: "N/A"}[self.passed]

    @property
    def figure(self) -> str:
        if self.value is None:
            return "not measured"
        return f"{self.value:.1f} ms" if self.unit == "ms" else f"{self.value:.2f}x"

    def as_dict(self) -> dict:
        return {"description": self.description, "value": self.value, "threshold": self.threshold,
                "at_most": self.at_most, "unit": self.unit, "passed": self.passed}


def print_targets(console: Console, targets: dict[str, Target]) -> None:
    for t in targets.values():
        colour = {"PASS": "green", "MISS": "red", "N/A": "yellow"}[t.verdict]
        console.print(f"  target: {t.description}: {t.figure} [{colour}]{t.verdict}[/]")


class BenchResult(NamedTuple):
    rows: list[BenchRow]
    targets: dict[str, Target]


# ----------------------------------------------------------------------------- pure helpers
def latency_percentiles(latencies_s: Sequence[float]) -> tuple[float, float]:
    """(p50, p95) in milliseconds; linear interpolation between order statistics."""
    if len(latencies_s) == 0:
        raise ValueError("no latencies: nothing was timed")
    p50, p95 = np.percentile(np.asarray(latencies_s, dtype=np.float64) * 1e3, [50, 95])
    return float(p50), float(p95)


def make_row(
    path: str, kind: str, precision: str, batch: int, latencies_s: Sequence[float], wall_s: float, concurrency: int = 1
) -> BenchRow:
    """A row from per-request latencies and the wall time they took (all clients together)."""
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive, got {wall_s}")
    p50, p95 = latency_percentiles(latencies_s)
    return BenchRow(
        path=path,
        kind=kind,
        precision=precision,
        batch=batch,
        concurrency=concurrency,
        requests=len(latencies_s),
        sentences_per_s=batch * len(latencies_s) / wall_s,
        p50_ms=p50,
        p95_ms=p95,
    )


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else num / den


def median_row(runs: Sequence[BenchRow]) -> BenchRow:
    """One row from several runs of the same path: median sentences/s, p50 and p95; requests summed."""
    if not runs:
        raise ValueError("no runs: nothing was timed")
    med = lambda f: float(np.median([getattr(r, f) for r in runs]))  # noqa: E731
    return replace(runs[0], requests=sum(r.requests for r in runs), sentences_per_s=med("sentences_per_s"),
                   p50_ms=med("p50_ms"), p95_ms=med("p95_ms"), runs=len(runs),
                   sentences_per_s_runs=tuple(r.sentences_per_s for r in runs))


def add_ratios(rows: Sequence[BenchRow], serve_precision: str) -> list[BenchRow]:
    """Fill `x_pytorch` (every row) and `served_over_inprocess` (kiln's served rows), comparing
    the same number of sentences in flight: a batch-b request, or b concurrent batch-1 clients."""
    pytorch = {r.batch: r.sentences_per_s for r in rows if r.kind == PYTORCH}
    inproc = {r.batch: r.sentences_per_s for r in rows if r.kind == ONNXRUNTIME and r.precision == serve_precision}
    out = []
    for r in rows:
        inflight = r.batch * r.concurrency
        served = _ratio(r.sentences_per_s, inproc.get(inflight)) if r.kind in KILN_SERVED else None
        out.append(replace(r, x_pytorch=_ratio(r.sentences_per_s, pytorch.get(inflight)), served_over_inprocess=served))
    return out


def _find(rows: Sequence[BenchRow], kind: str, batch: int, precision: str | None = None, concurrency: int = 1
          ) -> BenchRow | None:
    for r in rows:
        if (r.kind == kind and r.batch == batch and r.concurrency == concurrency
                and (precision is None or r.precision == precision)):
            return r
    return None


def evaluate_targets(
    rows: Sequence[BenchRow],
    serve_precision: str,
    batch: int = 32,
    min_served_over_inprocess: float = 0.7,
    min_x_pytorch: float = 8.0,
    concurrency: int = 8,
) -> dict[str, Target]:
    """The targets (a missing row gives N/A): Triton gRPC at `batch` against in-process ONNX
    Runtime and PyTorch; the gateway's single-sentence latency against in-process batch 1; the
    gateway under `concurrency` single-sentence clients against in-process batch `concurrency`
    and against the FastAPI + PyTorch server under the same load."""
    served = _find(rows, SERVED, batch, serve_precision)
    inproc = _find(rows, ONNXRUNTIME, batch, serve_precision)
    pytorch = _find(rows, PYTORCH, batch)
    s = served.sentences_per_s if served else None
    gw1 = _find(rows, GATEWAY, 1, serve_precision)
    gwn = _find(rows, GATEWAY, 1, serve_precision, concurrency)
    inproc1 = _find(rows, ONNXRUNTIME, 1, serve_precision)
    inproc_n = _find(rows, ONNXRUNTIME, concurrency, serve_precision)
    fastapi_n = _find(rows, FASTAPI, 1, concurrency=concurrency)
    sps = lambda r: r.sentences_per_s if r else None  # noqa: E731
    return {
        "served_vs_inprocess": Target(
            f"served {serve_precision} batch {batch} >= {min_served_over_inprocess:g} x in-process "
            f"ONNX Runtime {serve_precision} batch {batch}",
            None if s is None else _ratio(s, inproc.sentences_per_s if inproc else None),
            min_served_over_inprocess,
        ),
        "served_vs_pytorch": Target(
            f"served {serve_precision} batch {batch} >= {min_x_pytorch:g} x PyTorch eager fp32 batch {batch}",
            None if s is None else _ratio(s, pytorch.sentences_per_s if pytorch else None),
            min_x_pytorch,
        ),
        "gateway_latency_vs_inprocess": Target(
            f"gateway single-sentence p50 <= {MAX_LATENCY_X_INPROCESS:g}x in-process ONNX Runtime {serve_precision} "
            "batch-1 p50",
            _ratio(gw1.p50_ms if gw1 else None, inproc1.p50_ms if inproc1 else None), MAX_LATENCY_X_INPROCESS,
            at_most=True),
        "gateway_concurrent_vs_inprocess": Target(
            f"gateway, {concurrency} single-sentence clients >= {MIN_CONCURRENT_X_INPROCESS:g}x in-process "
            f"ONNX Runtime {serve_precision} batch {concurrency}",
            _ratio(sps(gwn), sps(inproc_n)), MIN_CONCURRENT_X_INPROCESS),
        "gateway_concurrent_vs_fastapi": Target(
            f"gateway, {concurrency} single-sentence clients >= {MIN_CONCURRENT_X_FASTAPI:g}x FastAPI + PyTorch, "
            f"{concurrency} clients",
            _ratio(sps(gwn), sps(fastapi_n)), MIN_CONCURRENT_X_FASTAPI),
    }


def sentence_pool(texts: Sequence[str], n: int) -> list[str]:
    """`n` sentences, cycling through `texts`."""
    if not texts:
        raise ValueError("no sentences to benchmark with")
    return [texts[i % len(texts)] for i in range(n)]


def request_batches(pool: Sequence[str], batch: int, count: int) -> list[list[str]]:
    """`count` requests of `batch` sentences each, walking round the pool."""
    return [[pool[(i * batch + j) % len(pool)] for j in range(batch)] for i in range(count)]


# ----------------------------------------------------------------------------- timing
def _time_loop(call: Callable[[list[str]], object], requests: list[list[str]], repeats: int, seconds: float) -> tuple[list[float], float]:
    """Sequential timed calls until `repeats` or `seconds` (after at least MIN_REQUESTS)."""
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + seconds
    i = 0
    while len(latencies) < repeats and (len(latencies) < MIN_REQUESTS or time.perf_counter() < deadline):
        texts = requests[i % len(requests)]
        t0 = time.perf_counter()
        call(texts)
        latencies.append(time.perf_counter() - t0)
        i += 1
    return latencies, time.perf_counter() - start


def _one_run(path: str, kind: str, precision: str, call, requests: list[list[str]], batch: int, repeats: int,
             seconds: float) -> BenchRow:
    latencies, wall = _time_loop(call, requests, repeats, seconds)
    return make_row(path, kind, precision, batch, latencies, wall)


# ----------------------------------------------------------------------------- the paths
def _pytorch_call(spec: DeploymentSpec):
    import torch

    from export.onnx_export import load_encoder
    from kiln_core.sources import checkpoint_dir
    from kiln_runtime.encoder import softmax

    loaded = load_encoder(spec, checkpoint_dir(spec))

    def call(texts: list[str]) -> np.ndarray:
        enc = loaded.tokenizer(texts, padding=True, truncation=True, max_length=spec.max_length, return_tensors="pt")
        feeds = {n: enc[n] for n in loaded.input_names}
        with torch.no_grad():
            out = getattr(loaded.model(**feeds), loaded.output_name)
            if spec.task is Task.text_classification:
                return softmax(out.numpy())
            # pooled in torch, as sentence-transformers does it
            mask = feeds["attention_mask"].unsqueeze(-1).to(out.dtype)
            if spec.pooling.value == "mean":
                pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            else:
                pooled = out[:, 0]
            if spec.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.numpy()

    return call


def _ort_call(spec: DeploymentSpec, manifest: ExportManifest, precision: str):
    from kiln_runtime.encoder import pool, softmax
    from kiln_runtime.ort import open_session
    from kiln_runtime.text import load_tokenizer, tokenize

    tok = load_tokenizer(str(spec.export_dir / manifest.tokenizer_dir / "tokenizer.json"), manifest.max_length)
    names = [t.name for t in manifest.inputs]
    sess = open_session(str(spec.export_dir / manifest.variants[precision].file), spec.instances.intra_op_threads or 0)

    def call(texts: list[str]) -> np.ndarray:
        feeds = tokenize(tok, texts, names)
        out = sess.run(None, feeds)[0]
        if spec.task is Task.text_classification:
            return softmax(out)
        return pool(out, feeds["attention_mask"], manifest.pooling, manifest.normalize)

    return call


def _output_name(spec: DeploymentSpec) -> str:
    from kiln_runtime.contract import EMBEDDING, SCORES

    return SCORES if spec.task is Task.text_classification else EMBEDDING


def _grpc_call(spec: DeploymentSpec, url: str):
    """One gRPC client (one per thread): texts -> the ensemble's output array."""
    import tritonclient.grpc as grpcclient

    from kiln_runtime.contract import TEXT

    client = grpcclient.InferenceServerClient(url)
    wanted = [grpcclient.InferRequestedOutput(_output_name(spec))]

    def call(texts: list[str]) -> np.ndarray:
        data = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
        inp = grpcclient.InferInput(TEXT, list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        result = client.infer(spec.name, [inp], outputs=wanted)
        return result.as_numpy(_output_name(spec))

    return call, client


def _concurrent(
    spec: DeploymentSpec, url: str, pool: list[str], clients: int, repeats: int, seconds: float
) -> tuple[list[float], float]:
    """`clients` threads, each its own gRPC client, sending batch-1 requests until the
    deadline or `repeats` requests each."""
    calls = [_grpc_call(spec, url) for _ in range(clients)]
    per_client = max(MIN_REQUESTS, repeats)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    bounds: dict[str, float] = {}
    # the clock starts when the last client has warmed its connection
    barrier = threading.Barrier(clients + 1, action=lambda: bounds.__setitem__("start", time.perf_counter()))

    def worker(k: int) -> None:
        call = calls[k][0]
        try:
            call([pool[k % len(pool)]])  # warm this connection
            barrier.wait()
            deadline = bounds["start"] + seconds
            i = k
            while len(latencies[k]) < per_client and (len(latencies[k]) < MIN_REQUESTS or time.perf_counter() < deadline):
                t0 = time.perf_counter()
                call([pool[i % len(pool)]])
                latencies[k].append(time.perf_counter() - t0)
                i += clients
        except Exception as err:  # surfaced after join: a failed request is not a result
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass  # a worker failed while warming up: its error is raised below
    start = bounds.get("start", time.perf_counter())
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for _, client in calls:
        client.close()
    if errors:  # the first real failure, not the broken barrier it caused in other clients
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return [x for per in latencies for x in per], wall


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).reshape(len(a), -1), b.astype(np.float64).reshape(len(b), -1)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return float(cos.min())


# ----------------------------------------------------------------------------- the bench
def _embed_row(path: str, kind: str, precision: str, run) -> BenchRow:
    """A single-sentence row from one load-generator run (kiln/loadgen.py EmbedRun)."""
    return BenchRow(path, kind, precision, 1, run.clients, run.requests, run.sentences_per_s, run.p50_ms, run.p95_ms)


def run_bench(
    spec: DeploymentSpec,
    console: Console | None = None,
    sentences: int = 32,
    repeats: int = 200,
    seconds: float = 1.5,
    batches: Sequence[int] = BATCHES,
    concurrency: int = 8,
    warmup: int = 3,
    gateway: bool = True,
    runs: int = RUNS,
    fastapi: bool = True,
) -> BenchResult:
    """Time PyTorch eager, in-process ONNX Runtime, the served paths and the FastAPI + PyTorch
    baseline; print, save, return.

    sentences: size of the sentence pool (export/data/calibration.txt lines, cycled);
    repeats / seconds: per run, stop after this many timed requests or this long (at least
    MIN_REQUESTS either way); runs: runs per row (the row is their median); concurrency:
    clients for the concurrent single-sentence rows (0 skips them); gateway: the OpenAI
    gateway rows and its overhead against direct gRPC (kiln/bench_gateway.py); fastapi: the
    FastAPI + PyTorch baseline rows. The repository is written and Triton (and the gateway) are
    started on free ports (kiln.stack); everything started here is always stopped.
    """
    from contextlib import ExitStack

    from export.variants import calibration_texts
    from kiln.loadgen import embed_load
    from kiln.stack import Stack
    from model_repository.writer import write_repository

    console = console or Console(stderr=True)
    manifest = ExportManifest.read(spec.export_dir)
    spec = spec.with_precision(manifest.served_precision(spec.serve_precision))
    serve = spec.serve_precision.value
    pool = sentence_pool(calibration_texts(), sentences)
    threads = spec.instances.intra_op_threads or 0
    rows: list[BenchRow] = []
    outputs: dict[str, np.ndarray] = {}  # the largest batch's output per path, for a sanity check
    embeddings = spec.task is Task.feature_extraction  # the OpenAI rows need an embedding model

    def step(msg: str) -> None:
        console.print(f"[bold cyan]bench[/] {msg}")

    def timed(path: str, kind: str, precision: str, call) -> None:
        """Every batch of one path, `runs` times, interleaved across batches."""
        reqs = {b: request_batches(pool, b, max(1, len(pool) // b)) for b in batches}
        for b in batches:
            for texts in reqs[b][:1] * (warmup if b == 1 else 1):
                call(texts)
        per_run: dict[int, list[BenchRow]] = {b: [] for b in batches}
        step(f"{path}: batch {', '.join(map(str, batches))}, {runs} runs")
        for _ in range(runs):
            for b in batches:
                per_run[b].append(_one_run(path, kind, precision, call, reqs[b], b, repeats, seconds))
        rows.extend(median_row(per_run[b]) for b in batches)
        outputs[f"{kind}:{precision}"] = call(request_batches(pool, max(batches), 1)[0])

    t0 = time.perf_counter()
    gateway_result: dict | None = None
    load_before = os.getloadavg()[0]
    step("loading the PyTorch model")
    torch_call = _pytorch_call(spec)
    timed("PyTorch eager fp32", PYTORCH, "fp32", torch_call)
    del torch_call

    precisions = [p.value for p in INPROCESS_PRECISIONS if p.value in manifest.variants]
    if serve not in precisions and serve in manifest.variants:
        precisions.append(serve)
    for p in precisions:
        timed(f"ONNX Runtime {p} (in-process, {threads or 'auto'} threads)", ONNXRUNTIME, p, _ort_call(spec, manifest, p))

    with ExitStack() as cleanup:
        step(f"writing {spec.repository_dir} and starting Triton")
        write_repository(spec, manifest)
        # the model's own speed: the bench repeats its texts, which the response cache would answer
        stack = cleanup.enter_context(Stack(spec.repository_dir, spec.server_dir, cache_mb=0))
        server = stack.triton
        served_path = f"Triton gRPC {serve} {spec.serving} (direct)"
        call, client = _grpc_call(spec, server.grpc_url)
        cleanup.callback(client.close)
        timed(served_path, SERVED, serve, call)

        # single-sentence load, the same for every server: name -> one run -> a row
        load: dict[str, Callable[[], BenchRow]] = {}
        clients = [1, concurrency] if concurrency > 1 else [1]
        if concurrency > 0:
            load[f"{served_path}, {concurrency} clients"] = lambda: make_row(
                f"{served_path}, {concurrency} clients", SERVED, serve, 1,
                *_concurrent(spec, server.grpc_url, pool, concurrency, repeats, seconds), concurrency)
        if gateway and embeddings:
            from kiln.bench_gateway import gateway_options

            step("starting the OpenAI gateway")
            gw = stack.start_gateway(gateway_options(spec.root / "bench-gateway.log"))
            embed_load(gw.url, spec.name, pool, max(clients), 1.0, repeats)  # warm-up, not kept
            for n in clients:
                name = f"kiln gateway -> Triton {serve}, OpenAI API, {n} client{'s' if n > 1 else ''}"
                load[name] = lambda n=n, name=name: _embed_row(name, GATEWAY, serve,
                                                               embed_load(gw.url, spec.name, pool, n, seconds, repeats))
        if fastapi and embeddings:
            from kiln.baselines.process import fastapi_process
            from kiln_core.sources import checkpoint_dir

            step("starting the FastAPI + PyTorch baseline server")
            fa = cleanup.enter_context(fastapi_process(checkpoint_dir(spec), spec.name, spec.root / "bench-fastapi.log",
                                                     spec.max_length))
            # warm-up, not kept: PyTorch's first calls at each new shape are several times slower
            embed_load(fa.url, spec.name, pool, max(clients), 1.0, repeats)
            for n in clients:
                name = f"FastAPI + PyTorch fp32 (sync endpoint), {n} client{'s' if n > 1 else ''}"
                load[name] = lambda n=n, name=name: _embed_row(name, FASTAPI, "fp32",
                                                               embed_load(fa.url, spec.name, pool, n, seconds, repeats))
        if load:
            step(f"single-sentence load, {runs} runs interleaved: " + "; ".join(load))
            per_run: dict[str, list[BenchRow]] = {k: [] for k in load}
            for _ in range(runs):
                for name, measure in load.items():
                    per_run[name].append(measure())
            rows.extend(median_row(v) for v in per_run.values())
        if gateway and embeddings:
            from kiln.bench_gateway import run_gateway_bench

            gateway_result = run_gateway_bench(stack, spec.name, console, "embedding", pool, rounds=repeats)

    rows = add_ratios(rows, serve)
    targets = evaluate_targets(rows, serve, batch=max(batches), concurrency=concurrency)
    checks = {}
    if f"{ONNXRUNTIME}:{serve}" in outputs and f"{SERVED}:{serve}" in outputs:
        checks["served_vs_inprocess_min_cosine"] = _min_cosine(outputs[f"{SERVED}:{serve}"], outputs[f"{ONNXRUNTIME}:{serve}"])
    if f"{PYTORCH}:fp32" in outputs and f"{SERVED}:{serve}" in outputs:
        checks["served_vs_pytorch_min_cosine"] = _min_cosine(outputs[f"{SERVED}:{serve}"], outputs[f"{PYTORCH}:fp32"])

    load_1min = {"before": load_before, "after": os.getloadavg()[0]}
    console.print(bench_table(spec, rows))
    if load_before > 0.5 * (os.cpu_count() or 1):
        console.print(
            f"  [yellow]note[/]: the machine was busy before the bench began (1-minute load {load_before:.1f} "
            f"on {os.cpu_count()} cores): figures are noisy, ratios less so"
        )
    from kiln.loadgen import NOISY_SPREAD, spread

    noisy = [f"{r.path} (batch {r.batch}, {r.concurrency} clients) x{spread(r.sentences_per_s_runs):.1f}" for r in rows
             if (spread(r.sentences_per_s_runs) or 1.0) > NOISY_SPREAD]
    if noisy:
        console.print(f"  [yellow]note[/]: runs disagree (max/min sentences/s > {NOISY_SPREAD:g}): " + "; ".join(noisy))
    print_targets(console, targets)
    for k, v in checks.items():
        console.print(f"  check: {k.replace('_', ' ')} = {v:.6f}")
    settings = dict(repeats=repeats, seconds=seconds, sentences=sentences, concurrency=concurrency, runs=runs,
                    batches=list(batches))
    out = write_results(spec, rows, targets, checks, settings, load_1min, gateway_result)
    step(f"done in {time.perf_counter() - t0:.0f}s -> {out}")
    return BenchResult(rows, targets)


def bench_table(spec: DeploymentSpec, rows: Sequence[BenchRow]) -> Table:
    runs = max((r.runs for r in rows), default=1)
    table = Table(
        title=f"kiln bench: {spec.name} on {os.cpu_count()} CPU cores",
        caption=f"{flags_line()}\nserved precision {spec.serve_precision.value}; median of {runs} runs per row; "
                "ratios compare the same sentences in flight (batch x clients)",
    )
    for col in ("path", "batch", "clients", "requests", "sentences/s", "p50 ms", "p95 ms", "x PyTorch",
                "served / in-process"):
        table.add_column(col, justify="left" if col == "path" else "right")

    def fmt(x: float | None) -> str:
        return "" if x is None else f"{x:.2f}"

    for r in rows:
        table.add_row(
            r.path,
            str(r.batch),
            str(r.concurrency),
            str(r.requests),
            f"{r.sentences_per_s:.1f}",
            f"{r.p50_ms:.1f}",
            f"{r.p95_ms:.1f}",
            fmt(r.x_pytorch),
            fmt(r.served_over_inprocess),
        )
    return table


def write_results(
    spec: DeploymentSpec,
    rows: Sequence[BenchRow],
    targets: dict[str, Target],
    checks: dict[str, float],
    settings: dict,
    load: dict[str, float] | None = None,
    gateway: dict | None = None,
) -> Path:
    spec.root.mkdir(parents=True, exist_ok=True)
    path = spec.root / BENCH_FILE
    doc = {
        "name": spec.name,
        "serve_precision": getattr(spec.serve_precision, "value", spec.serve_precision),  # "auto" resolved by run_bench
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "flags_line": flags_line(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_1min": load},
        "settings": {**settings, "intra_op_threads": spec.instances.intra_op_threads},
        "tools": tool_versions("torch", "transformers", "onnxruntime", "tokenizers", "tritonclient", "nvidia-pytriton"),
        "rows": [asdict(r) for r in rows],
        "targets": {k: t.as_dict() for k, t in targets.items()},
        "checks": checks,
        "gateway": gateway,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
