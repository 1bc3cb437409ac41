"""`kiln`: one CLI over the pipeline stages, all driven by one deployment spec.

    kiln export [SPEC]   checkpoint -> parity-gated ONNX variants + manifest
    kiln repo   [SPEC]   manifest -> Triton model repository
    kiln serve  [SPEC]   start Triton on the repository; Ctrl-C / SIGTERM stops it
    kiln bench  [SPEC]   PyTorch vs ONNX Runtime vs served, one table
    kiln demo   [SPEC]   all of the above on the packaged default, with real requests
    kiln engines [SPEC]  TensorRT engines (GPU machines only)

SPEC is a YAML file or a packaged spec name (default: minilm). Exit codes: 0 ok,
1 a gate or the server failed, 2 the spec or the command line is wrong.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from export.reuse import ensure_export
from kiln_core.card import RepositoryCard
from kiln_core.spec import DeploymentSpec, SpecError, load_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
console = Console(stderr=True)
out = Console()

SpecArg = typer.Argument("minilm", help="spec YAML file, or a packaged spec name")
WorkdirOpt = typer.Option(None, "--workdir", help="override the spec's workdir (artifacts go to WORKDIR/NAME)")


def _spec(path: str, workdir: Optional[Path], **overrides) -> DeploymentSpec:
    try:
        return load_spec(path, workdir=str(workdir) if workdir else None, **overrides)
    except SpecError as err:
        console.print(f"[red]spec error[/] {err}")
        raise typer.Exit(2)


def _ports(http: Optional[int], grpc: Optional[int], metrics: Optional[int]) -> dict | None:
    ports = {k: v for k, v in dict(http=http, grpc=grpc, metrics=metrics).items() if v is not None}
    return ports or None


@app.command()
def export(
    spec: str = SpecArg,
    workdir: Optional[Path] = WorkdirOpt,
    strict: bool = typer.Option(False, "--strict", help="exit 1 when any variant misses its gate, not only the served one"),
):
    """Export the checkpoint to ONNX, build precision variants, gate each on PyTorch parity.

    Exit 1 when the served variant (serve_precision; auto: no variant eligible) missed its
    gate; other variants that miss are marked failed in the table and manifest and never served."""
    from export.parity import ParityError
    from export.pipeline import run_export

    s = _spec(spec, workdir)
    try:
        run_export(s, console, strict=strict)
    except ParityError as err:
        console.print(f"[red]parity gate failed[/]: {err}")
        raise typer.Exit(1)


@app.command()
def repo(spec: str = SpecArg, workdir: Optional[Path] = WorkdirOpt):
    """Write the Triton model repository from the spec and the export manifest."""
    from model_repository.writer import write_repository

    s = _spec(spec, workdir)
    try:
        path = write_repository(s)
    except (FileNotFoundError, LookupError, ValueError) as err:
        console.print(f"[red]cannot write the repository[/]: {err}")
        raise typer.Exit(1)
    card = RepositoryCard.read(path)
    console.print(f"[bold cyan]repo[/] wrote {path} (public model: {s.name!r}, {card.precision}, {s.runtime.value})")
    if card.selection:
        console.print(f"[bold cyan]repo[/] serve_precision auto -> {card.selection['reason']}")


def _prepare(specs: list[DeploymentSpec]) -> tuple[list[Path], list[DeploymentSpec]]:
    """Each spec's gated export (reused when it matches), a freshly written repository, and
    the spec with serve_precision resolved ("auto" -> what the export picked)."""
    from export.parity import ParityError
    from kiln_core.manifest import ExportManifest
    from model_repository.writer import write_repository

    repos, resolved = [], []
    for s in specs:
        try:
            ensure_export(s)
            repos.append(write_repository(s))
            manifest = ExportManifest.read(s.export_dir)
            resolved.append(s.with_precision(manifest.served_precision(s.serve_precision)))
            if manifest.selection and s.serve_precision == "auto":
                console.print(f"[bold cyan]serve[/] {s.name}: serve_precision auto -> {manifest.selection.reason()}")
        except ParityError as err:
            console.print(f"[red]parity gate failed[/] ({s.name}): {err}")
            raise typer.Exit(1)
        except (FileNotFoundError, LookupError, ValueError) as err:
            console.print(f"[red]cannot write the repository[/] ({s.name}): {err}")
            raise typer.Exit(1)
    return repos, resolved


def _check_names(specs: list[DeploymentSpec]) -> None:
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        console.print(f"[red]two specs serve the same model name[/]: {names}")
        raise typer.Exit(2)


GatewayPortOpt = typer.Option(9000, "--gateway-port", help="port of the OpenAI-compatible gateway")
RpmOpt = typer.Option(None, help="default requests per minute per key")
TpmOpt = typer.Option(None, help="default tokens per minute per key")
KeysFileOpt = typer.Option(None, "--keys-file", help="YAML list of API keys (see README); also env KILN_API_KEYS")


@app.command()
def serve(
    specs: list[str] = typer.Argument(None, help="one or more specs served together (default: minilm)"),
    workdir: Optional[Path] = WorkdirOpt,
    http_port: Optional[int] = typer.Option(None, help="default 8000"),
    grpc_port: Optional[int] = typer.Option(None, help="default 8001"),
    metrics_port: Optional[int] = typer.Option(None, help="default 8002"),
    gateway_port: int = GatewayPortOpt,
    gateway_host: str = typer.Option("127.0.0.1", help="address the gateway listens on"),
    no_gateway: bool = typer.Option(False, "--no-gateway", help="Triton only"),
    keys_file: Optional[Path] = KeysFileOpt,
    rpm: Optional[int] = RpmOpt,
    tpm: Optional[int] = TpmOpt,
):
    """Start Triton on the specs' repositories and the OpenAI gateway in front; Ctrl-C stops both."""
    from kiln.server import ServerError, TritonServer

    loaded = [_spec(x, workdir, ports=_ports(http_port, grpc_port, metrics_port)) for x in (specs or ["minilm"])]
    _check_names(loaded)
    repos, loaded = _prepare(loaded)
    first = loaded[0]
    server_dir = first.server_dir if len(loaded) == 1 else first.workdir / "serve"
    server = TritonServer(repos, first.ports, workdir=server_dir)
    gw_server = None
    if not no_gateway:
        from kiln.gateway.config import GatewayConfig, GatewayError, Limits
        from kiln.gateway.runner import uvicorn_server

        try:
            cfg = GatewayConfig(host=gateway_host, port=gateway_port, triton_grpc=server.grpc_url, repositories=repos,
                                keys_file=keys_file, limits=Limits(rpm=rpm, tpm=tpm))
            gw_server = uvicorn_server(cfg)  # fails here, before Triton starts, on a bad key file
        except (GatewayError, ValueError) as err:
            console.print(f"[red]gateway config error[/]: {err}")
            raise typer.Exit(2)
    stop = threading.Event()

    def on_signal(*_):
        stop.set()
        if gw_server is not None:
            gw_server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        console.print(f"[bold cyan]serve[/] starting Triton on {', '.join(map(str, repos))} (log: {server.log_file})")
        server.start()
    except ServerError as err:
        console.print(f"[red]Triton failed to start[/]: {err}")
        raise typer.Exit(1)
    lines = [f"[green]ready[/]  Triton HTTP http://{server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}"]
    for s in loaded:
        lines.append(f"       model {s.name!r} ({s.task.value}): POST http://{server.http_url}/v2/models/{s.name}/infer")
    if gw_server is not None:
        lines.append(f"       OpenAI API http://{gateway_host}:{gateway_port}/v1  (chat/completions, completions, "
                     f"embeddings, models; /health /ready /metrics)")
    console.print("\n".join(lines) + "\n       Ctrl-C stops everything")

    def watch_triton():  # Triton dying on its own takes the gateway down with it
        while not stop.is_set() and server.process.poll() is None:
            stop.wait(0.5)
        if gw_server is not None:
            gw_server.should_exit = True

    watcher = threading.Thread(target=watch_triton, daemon=True)
    watcher.start()
    if gw_server is not None:
        gw_server.install_signal_handlers = lambda: None  # ours above stop both
        gw_server.run()
    else:
        while not stop.is_set() and server.process.poll() is None:
            stop.wait(0.5)
    died = server.process.poll() is not None and not stop.is_set()
    stop.set()
    code = server.stop()
    if died:
        console.print(f"[red]Triton exited on its own[/] (code {code}); see {server.log_file}")
        raise typer.Exit(1)
    console.print(f"[bold cyan]serve[/] {'gateway and ' if gw_server else ''}Triton stopped (exit {code})")


@app.command()
def gateway(
    repository: list[Path] = typer.Option(None, "--repository", "-r", help="kiln model repository Triton serves (repeat)"),
    triton: str = typer.Option("127.0.0.1:8001", help="Triton's gRPC host:port"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(9000, help="port to listen on"),
    keys_file: Optional[Path] = KeysFileOpt,
    rpm: Optional[int] = RpmOpt,
    tpm: Optional[int] = TpmOpt,
    max_body_bytes: Optional[int] = typer.Option(None, help="larger bodies get 413 (default 1 MiB)"),
    config: Optional[Path] = typer.Option(None, help="YAML file with a `gateway:` mapping"),
    config_json: Optional[str] = typer.Option(None, hidden=True),
):
    """The OpenAI-compatible gateway alone, in front of a running Triton."""
    from pydantic import ValidationError

    from kiln.gateway.config import GatewayConfig, GatewayError, load_config
    from kiln.gateway.runner import uvicorn_server

    try:
        if config_json:
            cfg = GatewayConfig.model_validate_json(config_json)
        else:
            limits = {k: v for k, v in dict(rpm=rpm, tpm=tpm).items() if v is not None}
            cfg = load_config(config, repositories=[str(r) for r in repository] if repository else None,
                              triton_grpc=triton, host=host, port=port,
                              keys_file=str(keys_file) if keys_file else None, max_body_bytes=max_body_bytes,
                              limits=limits or None)
        if not cfg.repositories:
            raise GatewayError("no model repository: pass --repository (a folder written by `kiln repo`)")
        server = uvicorn_server(cfg)
    except (GatewayError, ValidationError, OSError) as err:
        console.print(f"[red]gateway config error[/]: {err}")
        raise typer.Exit(2)
    server.run()


@app.command()
def keygen(name: str = typer.Option("user", help="the key's name in the keys file")):
    """Print a new API key and the keys-file entry that stores only its SHA-256."""
    from kiln.gateway.auth import digest, new_key

    key = new_key()
    out.print(f"key (give it to the client, it is not stored): {key}")
    out.print(f"keys-file entry:\n- name: {name}\n  sha256: {digest(key)}")


@app.command()
def bench(spec: str = SpecArg, workdir: Optional[Path] = WorkdirOpt):
    """PyTorch eager vs in-process ONNX Runtime vs served Triton, batch 1 and 32: one table."""
    from kiln.bench import run_bench

    s = _spec(spec, workdir)
    ensure_export(s)
    if s.task.value == "text-generation":
        from kiln.bench_lm import run_lm_bench

        run_lm_bench(s, out)
        return
    run_bench(s, out)


@app.command()
def engines(spec: str = SpecArg, workdir: Optional[Path] = WorkdirOpt):
    """Build TensorRT engines from the exported variants (needs a GPU and TensorRT)."""
    from export.tensorrt import EngineError, TensorRTUnavailable, build_engine
    from kiln_core.manifest import ExportManifest

    s = _spec(spec, workdir)
    wanted = [p.value for p in s.precisions if p.value == "fp16" or (p.value == "int8" and s.int8_mode == "static")]
    if "int8" in [p.value for p in s.precisions] and s.int8_mode != "static":
        console.print("[yellow]engines[/] skipping int8: TensorRT needs a QDQ graph (spec int8_mode: static)")
    try:
        manifest = ExportManifest.read(s.export_dir)
        for precision in wanted:
            console.print(f"[bold cyan]engines[/] building {precision} engine")
            console.print(f"  -> {build_engine(s, manifest, precision)}")
    except TensorRTUnavailable as err:
        console.print(f"[red]TensorRT unavailable[/]: {err}")
        raise typer.Exit(1)
    except (EngineError, LookupError, FileNotFoundError) as err:
        console.print(f"[red]engine build failed[/]: {err}")
        raise typer.Exit(1)


@app.command()
def loadtest(
    spec: str = SpecArg,
    workdir: Optional[Path] = WorkdirOpt,
    url: Optional[str] = typer.Option(None, help="host:port of a running Triton (gRPC or HTTP per --protocol) or, "
                                                 "for --protocol openai, of a running gateway; default: start them from the spec"),
    shape: Optional[str] = typer.Option(None, help="users | rate | capacity (default: the spec's)"),
    protocol: Optional[str] = typer.Option(None, help="grpc | http | stream | openai (through the OpenAI gateway: "
                                                      "chat streams for text-generation, embeddings for feature-extraction)"),
    users: Optional[int] = typer.Option(None, help="concurrent users (shape users)"),
    rate: Optional[float] = typer.Option(None, help="requests/s (shape rate)"),
    run_time: Optional[float] = typer.Option(None, help="seconds of load"),
    slo: Optional[Path] = typer.Option(None, help="YAML with a `loadtest:` mapping (targets, shape) overriding the spec's"),
    out_dir: Optional[Path] = typer.Option(None, help="reports folder (default <workdir>/<name>/loadtest)"),
    api_key: str = typer.Option("none", envvar="KILN_API_KEY", help="--protocol openai: the gateway key sent "
                                "(the gateway started here accepts exactly it; \"none\": no keys)"),
):
    """Headless Locust load test; exits 1 when an SLO target is missed."""
    from gevent import monkey

    monkey.patch_all()  # before any socket is made: Locust runs on gevent
    import yaml

    overrides = {}
    if slo is not None:
        try:
            overrides = (yaml.safe_load(slo.read_text()) or {}).get("loadtest", {})
        except (OSError, yaml.YAMLError, AttributeError) as err:
            console.print(f"[red]cannot read --slo {slo}[/]: {err}")
            raise typer.Exit(2)
    shape_over = {k: v for k, v in dict(kind=shape, protocol=protocol, users=users, rate=rate, run_time_s=run_time).items() if v is not None}
    overrides = {**overrides, "shape": {**overrides.get("shape", {}), **shape_over}}
    s = _spec(spec, workdir, loadtest=overrides)

    from kiln.server import ServerError, TritonServer, free_port, free_ports
    from kiln_runtime.contract import EMBEDDING, SCORES
    from loadtest.runner import OPENAI_TASKS, Endpoint, run_loadtest

    via_gateway = s.loadtest.shape.protocol == "openai"
    if via_gateway and s.task.value not in OPENAI_TASKS:
        console.print(f"[red]--protocol openai[/]: the gateway serves no {s.task.value} models "
                      f"(only {', '.join(OPENAI_TASKS)}); use grpc or http")
        raise typer.Exit(2)
    output = SCORES if s.task.value == "text-classification" else EMBEDDING
    reports = out_dir or s.loadtest_dir
    server = gateway = None
    try:
        if url is None:
            from model_repository.writer import write_repository

            ensure_export(s)
            repo_dir = write_repository(s)
            server = TritonServer(s.repository_dir, free_ports(), workdir=s.server_dir)
            console.print(f"[bold cyan]load[/] starting Triton for {s.name}")
            server.start()
            url = server.grpc_url if s.loadtest.shape.protocol == "grpc" else server.http_url
            if via_gateway:
                from kiln.gateway.config import GatewayConfig
                from kiln.gateway.runner import GatewayProcess

                cfg = GatewayConfig(port=free_port(), triton_grpc=server.grpc_url, repositories=[repo_dir])
                # the gateway started here accepts exactly the key the users send ("none": no keys)
                gateway = GatewayProcess(cfg, log_file=reports / "gateway.log",
                                         env={cfg.keys_env: "" if api_key == "none" else api_key})
                console.print(f"[bold cyan]load[/] starting the OpenAI gateway for {s.name} (log {gateway.log_file})")
                try:
                    gateway.start()
                    gateway.wait_ready()
                except RuntimeError as err:  # exited, or never answered /health or /ready
                    console.print(f"[red]the gateway failed to start[/]: {err}")
                    raise typer.Exit(1)
                url = f"{cfg.host}:{cfg.port}"
        ep = Endpoint(url, s.name, output, task=s.task.value, api_key=api_key)
        summary = run_loadtest(s.loadtest.shape, s.loadtest.targets, ep, reports, console)
    except ServerError as err:
        console.print(f"[red]Triton failed to start[/]: {err}")
        raise typer.Exit(1)
    finally:
        if gateway is not None:
            gateway.stop()
        if server is not None:
            server.stop()
    raise typer.Exit(summary["exit_code"])


DEMO_SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar on stage.",
    "The stock market fell sharply today.",
    "Share prices dropped after the announcement.",
    "我喜欢弹吉他。",
]


@app.command()
def demo(
    specs: list[str] = typer.Argument(None, help="one or more specs, served together (default: minilm)"),
    workdir: Optional[Path] = WorkdirOpt,
    no_gateway: bool = typer.Option(False, "--no-gateway", help="skip the OpenAI gateway part"),
):
    """Export, write the repositories, start Triton, send real requests (similarity matrix,
    streamed chat answer), then the same through the OpenAI-compatible gateway with curl."""
    from kiln.server import ServerError, TritonServer, free_ports

    loaded = [_spec(x, workdir) for x in (specs or ["minilm"])]
    _check_names(loaded)
    repos, loaded = _prepare(loaded)
    ports = free_ports()
    first = loaded[0]
    server = TritonServer(repos, ports, workdir=first.server_dir if len(loaded) == 1 else first.workdir / "demo")
    console.print(f"[bold cyan]demo[/] starting Triton (HTTP {ports.http}, gRPC {ports.grpc}) with "
                  f"{', '.join(s.name for s in loaded)}")
    try:
        with server:
            for s in loaded:
                _demo_direct(server, s)
            if not no_gateway:
                _demo_gateway(server, loaded, repos)
    except ServerError as err:
        console.print(f"[red]Triton failed to start[/]: {err}")
        raise typer.Exit(1)
    console.print("[bold cyan]demo[/] Triton shut down")


def _demo_direct(server, s: DeploymentSpec) -> None:
    """Triton's own protocols: a similarity matrix, labels, or a streamed chat answer."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    meta = client.get_model_metadata(s.name, as_json=True)
    console.print(f"[bold cyan]demo[/] serving {meta['name']}: inputs {[(i['name'], i['datatype'], i['shape']) for i in meta['inputs']]}")
    if s.task.value == "text-generation":
        _demo_chat(server, s)
        return
    if s.task.value != "feature-extraction":
        _demo_classify(server, s, DEMO_SENTENCES)
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
    http = httpclient.InferenceServerClient(server.http_url)
    via_http = embed_http(http, s.name, DEMO_SENTENCES)
    agree = float(np.min((via_http * emb).sum(-1)))
    out.print(similarity_table(DEMO_SENTENCES, emb @ emb.T))
    out.print(
        f"embedding dim {emb.shape[1]} ({s.serve_precision.value}, {s.runtime.value}); "
        f"gRPC batch of {len(DEMO_SENTENCES)}: p50 {np.median(latencies):.1f} ms; "
        f"single sentence: p50 {np.median(one):.1f} ms; HTTP vs gRPC cosine >= {agree:.6f}"
    )


def _curl(url: str, path: str, body: dict, stream: bool = False) -> list[str]:
    import json

    return ["curl", "-sS", *(["-N"] if stream else []), f"{url}{path}", "-H", "Authorization: Bearer $KILN_API_KEY",
            "-H", "Content-Type: application/json", "-d", json.dumps(body, ensure_ascii=False)]


def _show(cmd: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) if not c.startswith("Authorization") else f'"{c}"' for c in cmd)


def _demo_gateway(server, specs: list[DeploymentSpec], repos: list[Path]) -> None:
    """The OpenAI-compatible gateway in front of the same Triton, driven with curl."""
    import json
    import os
    import shutil
    import subprocess

    import numpy as np

    from kiln.gateway.auth import new_key
    from kiln.gateway.config import GatewayConfig
    from kiln.gateway.runner import GatewayProcess
    from kiln.server import free_port

    if shutil.which("curl") is None:
        console.print("[yellow]demo[/] curl is not installed: skipping the gateway part")
        return
    key = new_key()
    cfg = GatewayConfig(port=free_port(), triton_grpc=server.grpc_url, repositories=repos)
    log = specs[0].workdir / "demo-gateway.log"
    console.print(f"[bold cyan]demo[/] starting the OpenAI-compatible gateway on {cfg.host}:{cfg.port} (one API key)")
    with GatewayProcess(cfg, log_file=log, env={"KILN_API_KEYS": key}) as gw:
        gw.wait_ready()
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
    console.print("[bold cyan]demo[/] gateway stopped")


# A question SmolLM2-135M answers right in fp32, in kiln's 4-bit variant and in llama.cpp on the
# same GGUF ("The capital of Japan is Tokyo."). The France question is a near tie for its first
# token in fp32 (logits 25.33 "The" vs 25.24 "L"): 4-bit activations tip it, in llama.cpp too.
DEMO_QUESTION = "What is the capital of Japan?"


def _demo_chat(server, s: DeploymentSpec) -> None:
    """Stream a chat answer through Triton's generate_stream, token by token."""
    import json
    import urllib.request

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
                out.print(last.get("text_output", ""), end="")
    total = time.perf_counter() - t0
    n = int(last.get("completion_tokens", 0))
    out.print(
        f"\n[dim]{n} tokens, finish {last.get('finish_reason')!r}; time to first token "
        f"{((first or t0) - t0) * 1000:.0f} ms; {max(n - 1, 0) / max(total - ((first or t0) - t0), 1e-9):.1f} tokens/s "
        f"({s.serve_precision.value}, one stream)[/]"
    )


def _demo_classify(server, s: DeploymentSpec, texts: list[str]) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = _text_input(grpcclient, texts)
    res = client.infer(s.name, [inp])
    for text, label, scores in zip(texts, res.as_numpy("label").reshape(-1), res.as_numpy("scores")):
        out.print(f"{label.decode():>12}  {scores.max():.3f}  {text}")


def _text_input(module, texts: list[str]):
    import numpy as np

    arr = np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1)
    inp = module.InferInput("text", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return inp


def embed_grpc(client, model: str, texts: list[str]):
    import tritonclient.grpc as grpcclient

    return client.infer(model, [_text_input(grpcclient, texts)]).as_numpy("embedding")


def embed_http(client, model: str, texts: list[str]):
    import tritonclient.http as httpclient

    return client.infer(model, [_text_input(httpclient, texts)]).as_numpy("embedding")


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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
