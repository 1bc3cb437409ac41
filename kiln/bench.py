"""`kiln bench`: one run that times every way this machine can embed the spec's texts.

Paths, each text in -> pooled output out (tokenization included everywhere):

- PyTorch eager: the transformers model, fp32, ``torch.no_grad``, pooled as the spec says
- ONNX Runtime in-process: the manifest's fp32 and int8 graphs (and the served precision),
  CPU provider, ``intra_op_threads`` from the spec, the exported fast tokenizer
- served: the spec's ensemble over Triton gRPC, at batch 1, batch 32, and batch 1 from
  several concurrent clients (where Triton's dynamic batcher has something to merge)

Each path is warmed up, then timed for at most ``repeats`` requests or ``seconds``
(at least ``MIN_REQUESTS``). Rows carry sentences/s and p50/p95 latency per request;
two targets compare the served path with in-process ONNX Runtime and with PyTorch.
A missed target is reported, never raised: the caller decides what it means.
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

from export.manifest import ExportManifest, tool_versions
from kiln.server import TritonServer, free_ports
from kiln.spec import DeploymentSpec, Precision, Task

BENCH_FILE = "bench.json"
BATCHES = (1, 32)
MIN_REQUESTS = 3
PYTORCH, ONNXRUNTIME, SERVED = "pytorch", "onnxruntime", "triton"
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
    x_pytorch: float | None = None  # throughput / PyTorch eager at the same batch
    served_over_inprocess: float | None = None  # served / in-process ORT, serve precision, same batch


@dataclass(frozen=True)
class Target:
    description: str
    value: float | None  # the measured ratio; None when a row it needs is missing
    threshold: float

    @property
    def passed(self) -> bool | None:
        return None if self.value is None else self.value >= self.threshold

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "MISS", None: "N/A"}[self.passed]


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


def _ratio(num: float, den: float | None) -> float | None:
    return None if den is None or den <= 0 else num / den


def add_ratios(rows: Sequence[BenchRow], serve_precision: str) -> list[BenchRow]:
    """Fill `x_pytorch` (every row) and `served_over_inprocess` (served rows), same batch."""
    pytorch = {r.batch: r.sentences_per_s for r in rows if r.kind == PYTORCH}
    inproc = {r.batch: r.sentences_per_s for r in rows if r.kind == ONNXRUNTIME and r.precision == serve_precision}
    out = []
    for r in rows:
        served = _ratio(r.sentences_per_s, inproc.get(r.batch)) if r.kind == SERVED else None
        out.append(replace(r, x_pytorch=_ratio(r.sentences_per_s, pytorch.get(r.batch)), served_over_inprocess=served))
    return out


def _find(rows: Sequence[BenchRow], kind: str, batch: int, precision: str | None = None) -> BenchRow | None:
    for r in rows:
        if r.kind == kind and r.batch == batch and r.concurrency == 1 and (precision is None or r.precision == precision):
            return r
    return None


def evaluate_targets(
    rows: Sequence[BenchRow],
    serve_precision: str,
    batch: int = 32,
    min_served_over_inprocess: float = 0.7,
    min_x_pytorch: float = 8.0,
) -> dict[str, Target]:
    """The two targets, on single-client rows at `batch` (a missing row gives N/A)."""
    served = _find(rows, SERVED, batch, serve_precision)
    inproc = _find(rows, ONNXRUNTIME, batch, serve_precision)
    pytorch = _find(rows, PYTORCH, batch)
    s = served.sentences_per_s if served else None
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


def _measure(
    path: str, kind: str, precision: str, call, pool, batch: int, repeats: int, seconds: float, warmup: int
) -> BenchRow:
    reqs = request_batches(pool, batch, max(1, len(pool) // batch))
    for texts in reqs[:1] * warmup:
        call(texts)
    latencies, wall = _time_loop(call, reqs, repeats, seconds)
    return make_row(path, kind, precision, batch, latencies, wall)


# ----------------------------------------------------------------------------- the paths
def _pytorch_call(spec: DeploymentSpec):
    import torch

    from export.onnx_export import load_encoder
    from kiln.sources import checkpoint_dir
    from model_repository.python_models.kiln_runtime import softmax

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
    import onnxruntime as ort

    from model_repository.python_models.kiln_runtime import load_tokenizer, pool, softmax, tokenize

    tok = load_tokenizer(str(spec.export_dir / manifest.tokenizer_dir / "tokenizer.json"), manifest.max_length)
    names = [t.name for t in manifest.inputs]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    threads = spec.instances.intra_op_threads or 0
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(
        str(spec.export_dir / manifest.variants[precision].file), so, providers=["CPUExecutionProvider"]
    )

    def call(texts: list[str]) -> np.ndarray:
        feeds = tokenize(tok, texts, names)
        out = sess.run(None, feeds)[0]
        if spec.task is Task.text_classification:
            return softmax(out)
        return pool(out, feeds["attention_mask"], manifest.pooling, manifest.normalize)

    return call


def _output_name(spec: DeploymentSpec) -> str:
    from model_repository import configs as C

    return C.SCORES if spec.task is Task.text_classification else C.EMBEDDING


def _grpc_call(spec: DeploymentSpec, url: str):
    """One gRPC client (one per thread): texts -> the ensemble's output array."""
    import tritonclient.grpc as grpcclient

    from model_repository import configs as C

    client = grpcclient.InferenceServerClient(url)
    wanted = [grpcclient.InferRequestedOutput(_output_name(spec))]

    def call(texts: list[str]) -> np.ndarray:
        data = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
        inp = grpcclient.InferInput(C.TEXT, list(data.shape), "BYTES")
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
def run_bench(
    spec: DeploymentSpec,
    console: Console | None = None,
    server: TritonServer | None = None,
    sentences: int = 32,
    repeats: int = 200,
    seconds: float = 4.0,
    batches: Sequence[int] = BATCHES,
    concurrency: int = 8,
    warmup: int = 3,
    gateway: bool = True,
) -> BenchResult:
    """Time PyTorch eager, in-process ONNX Runtime and the served ensemble; print, save, return.

    sentences: size of the sentence pool (export/data/calibration.txt lines, cycled);
    repeats / seconds: per row, stop after this many timed requests or this long
    (at least MIN_REQUESTS either way); concurrency: clients for the concurrent batch-1
    served row (0 skips it); gateway: also time the OpenAI gateway against direct gRPC
    on the same requests (kiln/bench_gateway.py). With no `server`, the repository is written and a Triton
    is started on free ports, and always stopped.
    """
    from export.variants import calibration_texts
    from model_repository.writer import write_repository

    console = console or Console(stderr=True)
    manifest = ExportManifest.read(spec.export_dir)
    spec = spec.with_precision(manifest.served_precision(spec.serve_precision))
    serve = spec.serve_precision.value
    pool = sentence_pool(calibration_texts(), sentences)
    threads = spec.instances.intra_op_threads or 0
    rows: list[BenchRow] = []
    outputs: dict[str, np.ndarray] = {}  # the largest batch's output per path, for a sanity check

    def step(msg: str) -> None:
        console.print(f"[bold cyan]bench[/] {msg}")

    def timed(path: str, kind: str, precision: str, call) -> None:
        for b in batches:
            step(f"{path}, batch {b}")
            rows.append(_measure(path, kind, precision, call, pool, b, repeats, seconds, warmup if b == 1 else 1))
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

    own = server is None
    if own:
        step(f"writing {spec.repository_dir} and starting Triton")
        write_repository(spec, manifest)
        server = TritonServer(spec.repository_dir, free_ports(), workdir=spec.server_dir)
        server.start()
    try:
        served_path = f"Triton gRPC {serve} ensemble"
        call, client = _grpc_call(spec, server.grpc_url)
        try:
            timed(served_path, SERVED, serve, call)
        finally:
            client.close()
        if concurrency > 0:
            step(f"{served_path}, batch 1, {concurrency} concurrent clients")
            latencies, wall = _concurrent(spec, server.grpc_url, pool, concurrency, repeats, seconds)
            rows.append(make_row(f"{served_path}, {concurrency} clients", SERVED, serve, 1, latencies, wall, concurrency))
        if gateway and spec.task is Task.feature_extraction:
            from kiln.bench_gateway import run_gateway_bench

            gateway_result = run_gateway_bench(server, server.repositories, spec.name, console, "embedding", pool,
                                               spec.root / "bench-gateway.log", rounds=repeats)
    finally:
        if own:
            server.stop()

    rows = add_ratios(rows, serve)
    targets = evaluate_targets(rows, serve, batch=max(batches))
    checks = {}
    if f"{ONNXRUNTIME}:{serve}" in outputs and f"{SERVED}:{serve}" in outputs:
        checks["served_vs_inprocess_min_cosine"] = _min_cosine(outputs[f"{SERVED}:{serve}"], outputs[f"{ONNXRUNTIME}:{serve}"])
    if f"{PYTORCH}:fp32" in outputs and f"{SERVED}:{serve}" in outputs:
        checks["served_vs_pytorch_min_cosine"] = _min_cosine(outputs[f"{SERVED}:{serve}"], outputs[f"{PYTORCH}:fp32"])

    load = {"before": load_before, "after": os.getloadavg()[0]}
    console.print(bench_table(spec, rows))
    if load_before > 0.5 * (os.cpu_count() or 1):
        console.print(
            f"  [yellow]note[/]: the machine was busy before the bench began (1-minute load {load_before:.1f} "
            f"on {os.cpu_count()} cores): figures are noisy, ratios less so"
        )
    for t in targets.values():
        colour = {"PASS": "green", "MISS": "red", "N/A": "yellow"}[t.verdict]
        figure = "not measured" if t.value is None else f"{t.value:.2f}x"
        console.print(f"  target: {t.description}: {figure} [{colour}]{t.verdict}[/]")
    for k, v in checks.items():
        console.print(f"  check: {k.replace('_', ' ')} = {v:.6f}")
    out = write_results(spec, rows, targets, checks, dict(repeats=repeats, seconds=seconds, sentences=sentences, concurrency=concurrency), load,
                        gateway_result)
    step(f"done in {time.perf_counter() - t0:.0f}s -> {out}")
    return BenchResult(rows, targets)


def bench_table(spec: DeploymentSpec, rows: Sequence[BenchRow]) -> Table:
    table = Table(
        title=f"kiln bench: {spec.name} on {os.cpu_count()} CPU cores",
        caption=f"served precision {spec.serve_precision.value}; ratios compare the same batch size",
    )
    for col in ("path", "batch", "requests", "sentences/s", "p50 ms", "p95 ms", "x PyTorch", "served / in-process"):
        table.add_column(col, justify="left" if col == "path" else "right")

    def fmt(x: float | None) -> str:
        return "" if x is None else f"{x:.2f}"

    for r in rows:
        table.add_row(
            r.path,
            str(r.batch),
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
        "serve_precision": spec.serve_precision.value,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), "load_1min": load},
        "settings": {**settings, "intra_op_threads": spec.instances.intra_op_threads},
        "tools": tool_versions("torch", "transformers", "onnxruntime", "tokenizers", "tritonclient", "nvidia-pytriton"),
        "rows": [asdict(r) for r in rows],
        "targets": {k: {"description": t.description, "value": t.value, "threshold": t.threshold, "passed": t.passed} for k, t in targets.items()},
        "checks": checks,
        "gateway": gateway,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
