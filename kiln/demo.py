"""`kiln demo`: the served models answering real requests, what `make demo` shows a person.

Triton's own protocols first (a similarity matrix of served embeddings, labels, a chat answer
streamed token by token), then the same models through the OpenAI-compatible gateway, driven
with the curl commands a user would type. `specs` arrive exported, with their repositories
written and serve_precision resolved (the CLI's `_prepare`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from kiln.gateway.auth import new_key
from kiln.gateway.config import GatewayConfig
from kiln.processes import free_port
from kiln.server import TritonServer
from kiln.stack import GatewayOptions, Stack
from kiln_core.spec import DeploymentSpec
from kiln_runtime.contract import EMBEDDING, LABEL, SCORES, TEXT, TEXT_OUTPUT

DEMO_SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar on stage.",
    "The stock market fell sharply today.",
    "Share prices dropped after the announcement.",
    "我喜欢弹吉他。",
]
# A question SmolLM2-135M answers right in fp32, in kiln's 4-bit variant and in llama.cpp on the
# same GGUF ("The capital of Japan is Tokyo."). The France question is a near tie for its first
# token in fp32 (logits 25.33 "The" vs 25.24 "L"): 4-bit activations tip it, in llama.cpp too.
DEMO_QUESTION = "What is the capital of Japan?"


def run_demo(specs: list[DeploymentSpec], repos: list[Path], console: Console, out: Console,
             gateway: bool = True) -> None:
    """Start Triton on free ports with every repository, show each model, then (with
    `gateway`) the gateway part; everything started is stopped. Raises ServerError when
    Triton does not come up."""
    first = specs[0]
    stack = Stack(repos, first.server_dir if len(specs) == 1 else first.workdir / "demo")
    ports = stack.triton.ports
    console.print(f"[bold cyan]demo[/] starting Triton (HTTP {ports.http}, gRPC {ports.grpc}) with "
                  f"{', '.join(s.name for s in specs)}")
    with stack:
        for s in specs:
            _demo_direct(stack.triton, s, console, out)
        if gateway:
            _demo_gateway(stack, specs, console, out)
    console.print("[bold cyan]demo[/] Triton shut down")


def _demo_direct(server: TritonServer, s: DeploymentSpec, console: Console, out: Console) -> None:
    """Triton's own protocols: a similarity matrix, labels, or a streamed chat answer."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as client:  # closed here, not at exit
        _demo_direct_with(client, server, s, console, out)


def _demo_direct_with(client, server: TritonServer, s: DeploymentSpec, console: Console, out: Console) -> None:
    import tritonclient.http as httpclient

    meta = client.get_model_metadata(s.name, as_json=True)
    console.print(f"[bold cyan]demo[/] serving {meta['name']}: inputs {[(i['name'], i['datatype'], i['shape']) for i in meta['inputs']]}")
    if s.task.value == "text-generation":
        _demo_chat(server, s, out)
        return
    if s.task.value != "feature-extraction":
        _demo_classify(server, s, DEMO_SENTENCES, out)
        return
    emb, latencies = None, []
    for _ in range(20):
        t0 = time.perf_counter()
        emb = embed_grpc(client, s.name, DEMO_SENTENCES)
        latencies.append((time.perf_counter() - t0) * 1000)
    one = []
    for text in DEMO_SENTENCES * 4:
        t0 = time.perf_counter()
        embed_grpc(client, s.name, [text])
        one.append((time.perf_counter() - t0) * 1000)
    with httpclient.InferenceServerClient(server.http_url) as http:
        via_http = embed_http(http, s.name, DEMO_SENTENCES)
    agree = float(np.min((via_http * emb).sum(-1)))
    out.print(similarity_table(DEMO_SENTENCES, emb @ emb.T))
    out.print(
        f"embedding dim {emb.shape[1]} ({s.serve_precision.value}, {s.runtime.value}); "
        f"gRPC batch of {len(DEMO_SENTENCES)}: p50 {np.median(latencies):.1f} ms; "
        f"single sentence: p50 {np.median(one):.1f} ms; HTTP vs gRPC cosine >= {agree:.6f}"
    )


def _curl(url: str, path: str, body: dict, stream: bool = False) -> list[str]:
    return ["curl", "-sS", *(["-N"] if stream else []), f"{url}{path}", "-H", "Authorization: Bearer $KILN_API_KEY",
            "-H", "Content-Type: application/json", "-d", json.dumps(body, ensure_ascii=False)]


def _show(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) if not c.startswith("Authorization") else f'"{c}"' for c in cmd)


def _demo_gateway(stack: Stack, specs: list[DeploymentSpec], console: Console, out: Console) -> None:
    """The OpenAI-compatible gateway in front of the same Triton, driven with curl; stopped
    before Triton."""
    if shutil.which("curl") is None:
        console.print("[yellow]demo[/] curl is not installed: skipping the gateway part")
        return
    key = new_key()
    options = GatewayOptions(config=GatewayConfig(port=free_port()), keys=key,
                             log_file=specs[0].workdir / "demo-gateway.log")
    console.print(f"[bold cyan]demo[/] starting the OpenAI-compatible gateway on {options.config.host}:"
                  f"{options.config.port} (one API key)")
    gw = stack.start_gateway(options)
    env = {**os.environ, "KILN_API_KEY": key}

    def run(cmd: list[str]) -> str:
        out.print(f"[dim]$ {_show(cmd)}[/]")
        real = [c.replace("$KILN_API_KEY", key) for c in cmd]
        return subprocess.run(real, capture_output=True, text=True, env=env, timeout=600).stdout

    for s in specs:
        if s.task.value == "feature-extraction":
            texts = DEMO_SENTENCES[:2]
            body = json.loads(run(_curl(gw.url, "/v1/embeddings", {"model": s.name, "input": texts})))
            vecs = np.array([d["embedding"] for d in body["data"]])
            head = ", ".join(f"{x:.4f}" for x in vecs[0][:4])
            out.print(f"  -> {len(vecs)} embeddings of {vecs.shape[1]} floats, first [{head}, ...]; "
                      f"usage {body['usage']}; cosine(0, 1) = {float(vecs[0] @ vecs[1]):.3f}")
        elif s.task.value == "text-generation":
            cmd = _curl(gw.url, "/v1/chat/completions", {
                "model": s.name, "messages": [{"role": "user", "content": DEMO_QUESTION}], "max_tokens": 64,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}, stream=True)
            out.print(f"[dim]$ {_show(cmd)}[/]")
            real = [c.replace("$KILN_API_KEY", key) for c in cmd]
            t0, first, usage = time.perf_counter(), None, None
            out.print("[bold]assistant[/] (via the gateway, streamed): ", end="")
            with subprocess.Popen(real, stdout=subprocess.PIPE, text=True, env=env) as proc:
                for line in proc.stdout:
                    if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices", []):
                        text = choice["delta"].get("content") or ""
                        if text:
                            first = first or time.perf_counter()
                            out.print(text, end="")
            out.print(f"\n[dim]usage {usage}; time to first token {((first or t0) - t0) * 1000:.0f} ms "
                      "(curl start included)[/]")
    status, ready = gw.get("/ready")
    out.print(f"[dim]$ curl {gw.url}/ready -> {status} {json.dumps(ready)}[/]")
    stack.stop_gateway()
    console.print("[bold cyan]demo[/] gateway stopped")


def _demo_chat(server: TritonServer, s: DeploymentSpec, out: Console) -> None:
    """Stream a chat answer through Triton's generate_stream, token by token."""
    body = json.dumps({"messages": json.dumps([{"role": "user", "content": DEMO_QUESTION}]), "max_tokens": 64,
                       "stream": True}).encode()
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/{s.name}/generate_stream", body,
                                 {"Content-Type": "application/json"})
    out.print(f"[bold]user[/]: {DEMO_QUESTION}\n[bold]assistant[/] (streamed): ", end="")
    t0, first, last = time.perf_counter(), None, {}
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data:"):
                last = json.loads(line[5:])
                first = first or time.perf_counter()
                out.print(last.get(TEXT_OUTPUT, ""), end="")
    total = time.perf_counter() - t0
    n = int(last.get("completion_tokens", 0))
    out.print(
        f"\n[dim]{n} tokens, finish {last.get('finish_reason')!r}; time to first token "
        f"{((first or t0) - t0) * 1000:.0f} ms; {max(n - 1, 0) / max(total - ((first or t0) - t0), 1e-9):.1f} tokens/s "
        f"({s.serve_precision.value}, one stream)[/]"
    )


def _demo_classify(server: TritonServer, s: DeploymentSpec, texts: list[str], out: Console) -> None:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        res = client.infer(s.name, [_text_input(grpcclient, texts)])
    for text, label, scores in zip(texts, res.as_numpy(LABEL).reshape(-1), res.as_numpy(SCORES)):
        out.print(f"{label.decode():>12}  {scores.max():.3f}  {text}")


def _text_input(module, texts: list[str]):
    arr = np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1)
    inp = module.InferInput(TEXT, list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return inp


def embed_grpc(client, model: str, texts: list[str]):
    import tritonclient.grpc as grpcclient

    return client.infer(model, [_text_input(grpcclient, texts)]).as_numpy(EMBEDDING)


def embed_http(client, model: str, texts: list[str]):
    import tritonclient.http as httpclient

    return client.infer(model, [_text_input(httpclient, texts)]).as_numpy(EMBEDDING)


def similarity_table(texts: list[str], sim) -> Table:
    table = Table(title="cosine similarity (served embeddings)")
    table.add_column("")
    for i in range(len(texts)):
        table.add_column(f"[{i}]", justify="right")
    for i, text in enumerate(texts):
        cells = []
        for j in range(len(texts)):
            v = float(sim[i, j])
            style = "bold green" if i != j and v > 0.5 else ("dim" if i == j else "")
            cells.append(f"[{style}]{v:.2f}[/]" if style else f"{v:.2f}")
        table.add_row(f"[{i}] {text}", *cells)
    return table
