"""What the OpenAI-compatible gateway adds on top of Triton, measured on the same requests.

Each round sends the same request once per path, in turn (so drift and noise hit every
path alike): direct Triton gRPC (tritonclient), the gateway over a kept-alive HTTP
connection (raw JSON, what curl or any lean client sends), and the gateway through the
official `openai` client. The target is on the added median latency for single-sentence
embeddings: p50(gateway) - p50(direct gRPC) <= 2 ms. For generation the same is done for
the time to first token of a streamed answer.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from kiln.gateway.config import GatewayConfig
from kiln.stack import GatewayOptions, Stack

MAX_ADDED_P50_MS = 2.0


@dataclass(frozen=True)
class OverheadRow:
    path: str
    batch: int
    requests: int
    p50_ms: float
    p95_ms: float
    added_p50_ms: float | None  # p50 minus the direct gRPC p50 of the same requests
    note: str = ""


def overhead_rows(latencies: dict[str, list[float]], baseline: str, batch: int, notes: dict[str, str] | None = None
                  ) -> list[OverheadRow]:
    """Rows from per-path latencies (seconds); the baseline path's p50 is subtracted."""
    base = float(np.median(latencies[baseline])) * 1e3
    rows = []
    for path, lat in latencies.items():
        p50, p95 = (float(x) for x in np.percentile(np.asarray(lat) * 1e3, [50, 95]))
        rows.append(OverheadRow(path, batch, len(lat), p50, p95, None if path == baseline else p50 - base,
                                (notes or {}).get(path, "")))
    return rows


def interleaved(calls: dict[str, Callable[[int], object]], rounds: int, warmup: int = 10) -> dict[str, list[float]]:
    """Time each call once per round, in turn; call(i) gets the round number."""
    for i in range(warmup):
        for call in calls.values():
            call(i)
    out: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call(i)
            out[name].append(time.perf_counter() - t0)
    return out


class HttpConnection:
    """A kept-alive HTTP/1.1 connection posting JSON."""

    def __init__(self, url: str, key: str = "none"):
        host, _, port = url.removeprefix("http://").partition(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=300)
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}

    def post(self, path: str, body: dict) -> bytes:
        self.conn.request("POST", path, json.dumps(body), self.headers)
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"gateway answered {r.status}: {data[:300]!r}")
        return data

    def first_event(self, path: str, body: dict) -> None:
        """Send a streamed request; return at the first content chunk, then drain it."""
        self.conn.request("POST", path, json.dumps(body), self.headers)
        r = self.conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"gateway answered {r.status}: {r.read()[:300]!r}")
        return r

    def close(self) -> None:
        self.conn.close()


def embedding_overhead(grpc_url: str, gateway_url: str, model: str, pool: Sequence[str], rounds: int = 200,
                       batches: Sequence[int] = (1, 32)) -> list[OverheadRow]:
    import openai
    import tritonclient.grpc as grpcclient

    direct = grpcclient.InferenceServerClient(grpc_url)
    lean = HttpConnection(gateway_url)
    official = openai.OpenAI(base_url=gateway_url + "/v1", api_key="none", max_retries=0)

    def texts(i: int, b: int) -> list[str]:
        return [pool[(i * b + k) % len(pool)] for k in range(b)]

    rows: list[OverheadRow] = []
    try:
        for b in batches:
            fmt = "float" if b == 1 else "base64"  # curl's natural form; the official client's default

            def grpc_call(i, b=b):
                arr = np.array([t.encode() for t in texts(i, b)], dtype=object).reshape(-1, 1)
                inp = grpcclient.InferInput("text", list(arr.shape), "BYTES")
                inp.set_data_from_numpy(arr)
                return direct.infer(model, [inp]).as_numpy("embedding")

            calls = {
                "Triton gRPC (direct)": grpc_call,
                f"gateway, HTTP keep-alive ({fmt})": lambda i, b=b, fmt=fmt: lean.post(
                    "/v1/embeddings", {"model": model, "input": texts(i, b), "encoding_format": fmt}),
                "gateway, openai client (base64)": lambda i, b=b: official.embeddings.create(
                    model=model, input=texts(i, b)),
            }
            lat = interleaved(calls, rounds if b == 1 else max(rounds // 4, 20))
            rows += overhead_rows(lat, "Triton gRPC (direct)", b)
    finally:
        direct.close()
        lean.close()
        official.close()
    return rows


def generation_overhead(grpc_url: str, gateway_url: str, model: str, prompts: Sequence[str], rounds: int = 20,
                        max_tokens: int = 16) -> list[OverheadRow]:
    """Time to first token, direct gRPC stream vs the gateway's SSE (greedy, same prompts)."""
    import queue

    import tritonclient.grpc as grpcclient

    from kiln.gateway.backend import generation_inputs

    lean = HttpConnection(gateway_url)
    got: queue.Queue = queue.Queue()
    direct = grpcclient.InferenceServerClient(grpc_url)
    direct.start_stream(callback=lambda result, error: got.put((result, error)))

    def messages(i):
        return [{"role": "user", "content": prompts[i % len(prompts)]}]

    def grpc_ttft(i):
        inputs = generation_inputs({"messages": json.dumps(messages(i)), "max_tokens": max_tokens,
                                    "temperature": 0.0, "stream": True})
        t0 = time.perf_counter()
        direct.async_stream_infer(model, inputs)
        first, final = None, False
        while not final:
            result, error = got.get(timeout=300)
            if error is not None:
                raise RuntimeError(str(error))
            first = first or time.perf_counter()
            reason = result.as_numpy("finish_reason")
            final = reason is not None and reason.size and reason.reshape(-1)[0]
        return first - t0

    def gateway_ttft(i):
        body = {"model": model, "messages": messages(i), "max_tokens": max_tokens, "temperature": 0, "stream": True}
        t0 = time.perf_counter()
        r = lean.first_event("/v1/chat/completions", body)
        first = None
        for line in r:
            if first is None and line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                first = time.perf_counter()
        return (first or time.perf_counter()) - t0

    # TTFT, not the whole request: each call returns its own first-token time
    ttft: dict[str, list[float]] = {"Triton gRPC stream (direct)": [], "gateway SSE, HTTP keep-alive": []}
    try:
        for i in range(3):
            grpc_ttft(i), gateway_ttft(i)
        for i in range(rounds):
            ttft["Triton gRPC stream (direct)"].append(grpc_ttft(i))
            ttft["gateway SSE, HTTP keep-alive"].append(gateway_ttft(i))
    finally:
        direct.stop_stream()
        direct.close()
        lean.close()
    return [OverheadRow(r.path.replace("(direct)", "(direct), TTFT") if "direct" in r.path else r.path + ", TTFT",
                        r.batch, r.requests, r.p50_ms, r.p95_ms, r.added_p50_ms)
            for r in overhead_rows(ttft, "Triton gRPC stream (direct)", 1)]


def overhead_table(title: str, rows: Sequence[OverheadRow]) -> Table:
    table = Table(title=title, caption="same requests, interleaved; added = p50 minus direct gRPC p50")
    for col in ("path", "batch", "requests", "p50 ms", "p95 ms", "added p50 ms"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in rows:
        table.add_row(r.path, str(r.batch), str(r.requests), f"{r.p50_ms:.2f}", f"{r.p95_ms:.2f}",
                      "" if r.added_p50_ms is None else f"{r.added_p50_ms:+.2f}")
    return table


def target_row(rows: Sequence[OverheadRow], path_prefix: str = "gateway, HTTP keep-alive", batch: int = 1
               ) -> tuple[float | None, bool | None]:
    """(added p50 ms, passed) for the embeddings target; None when not measured."""
    for r in rows:
        if r.batch == batch and r.path.startswith(path_prefix):
            return r.added_p50_ms, r.added_p50_ms is not None and r.added_p50_ms <= MAX_ADDED_P50_MS
    return None, None


def gateway_options(log_file: Path) -> GatewayOptions:
    """The gateway a bench puts in front of its Triton: a child process, open (no keys), quiet."""
    return GatewayOptions(GatewayConfig(port=0, log_level="warning"), keys="", log_file=log_file)


def run_gateway_bench(stack: Stack, model: str, console: Console, kind: str, texts: Sequence[str],
                      rounds: int = 200) -> dict:
    """Measure the stack's gateway against direct gRPC to its Triton, print; the result goes
    to bench.json."""
    console.print(f"[bold cyan]bench[/] gateway overhead ({kind}) against direct gRPC")
    if kind == "embedding":
        rows = embedding_overhead(stack.triton.grpc_url, stack.gateway_url, model, texts, rounds)
    else:
        rows = generation_overhead(stack.triton.grpc_url, stack.gateway_url, model, texts, rounds=max(rounds // 10, 10))
    console.print(overhead_table(f"gateway overhead: {model}", rows))
    result = {"rows": [asdict(r) for r in rows]}
    if kind == "embedding":
        added, passed = target_row(rows)
        verdict = {True: "[green]PASS[/]", False: "[red]MISS[/]", None: "[yellow]N/A[/]"}[passed]
        figure = "not measured" if added is None else f"{added:+.2f} ms"
        console.print(f"  target: gateway adds <= {MAX_ADDED_P50_MS:g} ms p50 to single-sentence embeddings "
                      f"(HTTP keep-alive vs direct gRPC): {figure} {verdict}")
        result["target"] = {"description": f"added p50 <= {MAX_ADDED_P50_MS} ms, embeddings batch 1",
                            "value_ms": added, "threshold_ms": MAX_ADDED_P50_MS, "passed": passed}
    return result
