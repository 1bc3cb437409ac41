"""`kiln`: one CLI over the pipeline stages, all driven by one deployment spec.

    kiln export [SPEC]   checkpoint -> parity-gated ONNX variants + manifest
    kiln repo   [SPEC]   manifest -> Triton model repository
    kiln serve  [SPEC]   start Triton on the repository; Ctrl-C / SIGTERM stops it
    kiln bench  [SPEC]   PyTorch vs ONNX Runtime vs served, one table
    kiln demo   [SPEC]   all of the above on the packaged default, with real requests
    kiln engines [SPEC]  TensorRT engines (GPU machines only)
    kiln tune   [SPEC] --slo FILE  the batching / instance settings with the most load within an SLO

SPEC is a YAML file or a packaged spec name (default: minilm). Exit codes: 0 ok,
1 a gate or the server failed, 2 the spec or the command line is wrong.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from export.reuse import ensure_export
from kiln.deploy.command import deploy
from kiln.gateway.config import KEYS_ENV
from kiln_core.card import RepositoryCard
from kiln_core.spec import DeploymentSpec, SpecError, load_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
app.command()(deploy)
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
KeysFileOpt = typer.Option(None, "--keys-file", help=f"YAML list of API keys (see README); also env {KEYS_ENV}")
AllowUnauthenticatedOpt = typer.Option(False, "--allow-unauthenticated",
                                       help="serve a non-loopback address without API keys (anyone who can reach it)")
_REDIS_HELP = "redis://host:port/db keeping the per-key limits, shared by every gateway that names it"
RedisUrlOpt = typer.Option(None, "--redis-url", help=_REDIS_HELP)
FailClosedOpt = typer.Option(False, "--limits-fail-closed",
                             help="Redis unreachable: refuse with 503 (default: serve without limits, say so in /ready)")


def _auth_option(allow_unauthenticated: bool | None) -> dict:
    """GatewayConfig's allow_unauthenticated, where this version of the config has it (None: the config file's)."""
    from kiln.gateway.config import GatewayConfig

    return {"allow_unauthenticated": allow_unauthenticated} if "allow_unauthenticated" in GatewayConfig.model_fields else {}


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
    allow_unauthenticated: bool = AllowUnauthenticatedOpt,
    max_restarts: int = typer.Option(5, min=0, help="restart Triton when it dies, at most this often in 5 minutes "
                                                    "(waiting 1, 2, 4 ... 30 s); 0: exit 1 when it dies"),
    drain_timeout: float = typer.Option(30.0, min=0, help="on Ctrl-C / SIGTERM: seconds in-flight requests may "
                                                          "finish (new ones get 503) before Triton stops"),
    gateway_workers: int = typer.Option(1, min=1, help="gateway processes sharing the gateway port (more than one "
                                                       "keeps the limits in Redis: --redis-url, else one is started)"),
    replicas: int = typer.Option(1, min=1, help="Tritons to start on these repositories (each on its own ports); "
                                                "the gateway routes by least outstanding requests and fails over"),
    redis: bool = typer.Option(False, "--redis", help="start a redis-server on a free loopback port and keep the "
                                                      "per-key limits there (what several gateways share)"),
    redis_url: Optional[str] = RedisUrlOpt,
    limits_fail_closed: bool = FailClosedOpt,
    cache_mb: Optional[int] = typer.Option(None, min=0, help="Triton's response cache in MiB (0: off); default: the "
                                                             "largest response_cache.size_mb of the served encoders"),
):
    """Start Triton on the specs' repositories and the OpenAI gateway in front; Triton is
    restarted when it dies; Ctrl-C / SIGTERM drains the gateway, then stops both."""
    from kiln.gateway.config import GatewayConfig, Limits
    from kiln.processes import PortBusy
    from kiln.server import ServerError
    from kiln.stack import GatewayOptions, Stack
    from kiln.supervisor import Backoff, GaveUp, Supervisor

    loaded = [_spec(x, workdir, ports=_ports(http_port, grpc_port, metrics_port)) for x in (specs or ["minilm"])]
    _check_names(loaded)
    repos, loaded = _prepare(loaded)
    first = loaded[0]
    server_dir = first.server_dir if len(loaded) == 1 else first.workdir / "serve"
    redis_server = None
    if (redis or gateway_workers > 1) and not no_gateway and redis_url is None:
        from kiln.redis_server import RedisServer, RedisServerError

        try:
            redis_server = RedisServer(workdir=server_dir / "redis").start()
        except RedisServerError as err:
            console.print(f"[red]redis-server failed to start[/]: {err}")
            raise typer.Exit(1)
        redis_url = redis_server.url
        console.print(f"[bold cyan]serve[/] per-key limits in redis-server at {redis_url}")
    try:  # the redis-server started here stops on every way out
        try:
            gateway = None if no_gateway else GatewayOptions(
                GatewayConfig(host=gateway_host, port=gateway_port, keys_file=keys_file, limits=Limits(rpm=rpm, tpm=tpm),
                              redis_url=redis_url, limits_fail_closed=limits_fail_closed, drain_timeout_s=drain_timeout,
                              **_auth_option(allow_unauthenticated)),
                in_process=gateway_workers == 1, workers=gateway_workers)
            stack = Stack(repos, server_dir, first.ports, gateway, replicas=replicas, cache_mb=cache_mb)  # builds the gateway: a bad key file fails before Triton starts
        except ValueError as err:  # GatewayError, or a limit pydantic refuses
            console.print(f"[red]gateway config error[/]: {err}")
            raise typer.Exit(2)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        triton = stack.triton
        console.print(f"[bold cyan]serve[/] starting Triton on {', '.join(map(str, repos))} (log: {triton.log_file})")
        try:
            stack.start()
        except PortBusy as err:  # never start beside, or answer through, another server
            console.print(f"[red]cannot serve[/]: {err}")
            raise typer.Exit(2)
        except ServerError as err:
            console.print(f"[red]Triton failed to start[/]: {err}")
            raise typer.Exit(1)
        except RuntimeError as err:
            console.print(f"[red]the gateway failed to start[/]: {err}")
            raise typer.Exit(1)
        lines = [f"[green]ready[/]  Triton HTTP http://{triton.http_url}  gRPC {triton.grpc_url}  metrics {triton.metrics_url}"]
        for s in loaded:
            lines.append(f"       model {s.name!r} ({s.task.value}): POST http://{triton.http_url}/v2/models/{s.name}/infer")
        for i, replica in enumerate(stack.backends[1:], 1):
            lines.append(f"       replica {i}: Triton HTTP http://{replica.http_url}  gRPC {replica.grpc_url}")
        if stack.gateway is not None:
            lines.append(f"       OpenAI API {stack.gateway_url}/v1  (chat/completions, completions, "
                         f"embeddings, models; /health /ready /metrics)")
        console.print("\n".join(lines) + "\n       Ctrl-C stops everything")
        supervisor = Supervisor(stack, Backoff(max_failures=max_restarts),
                                say=lambda msg: console.print(f"[yellow]supervisor[/] {msg}", highlight=False))
        failure = None
        try:
            supervisor.watch(stop)
            if not stop.is_set():
                failure = "the gateway stopped on its own (see above)"
        except GaveUp as err:
            failure = str(err) if max_restarts else f"Triton exited on its own ({triton.exit_report()})"
        finally:
            if stop.is_set() and stack.gateway is not None:
                console.print(f"[bold cyan]serve[/] draining the gateway (up to {drain_timeout:.0f}s), then stopping Triton")
            code = stack.stop()
        if failure:
            console.print(f"[red]{failure}[/]; see {triton.log_file}")
            raise typer.Exit(1)
        console.print(f"[bold cyan]serve[/] {'gateway and ' if stack.gateway else ''}Triton stopped (exit {code})")
    finally:
        if redis_server is not None:
            redis_server.stop()


@app.command()
def gateway(
    repository: list[Path] = typer.Option(None, "--repository", "-r", help="kiln model repository Triton serves (repeat)"),
    triton: list[str] = typer.Option(["127.0.0.1:8001"], help="Triton's gRPC host:port (repeat for replicas "
                                                                "serving the same repositories)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(9000, help="port to listen on"),
    keys_file: Optional[Path] = KeysFileOpt,
    rpm: Optional[int] = RpmOpt,
    tpm: Optional[int] = TpmOpt,
    max_body_bytes: Optional[int] = typer.Option(None, help="larger bodies get 413 (default 1 MiB)"),
    allow_unauthenticated: bool = AllowUnauthenticatedOpt,
    redis: Optional[str] = typer.Option(None, "--redis", help=_REDIS_HELP),
    limits_fail_closed: bool = FailClosedOpt,
    drain_timeout: Optional[float] = typer.Option(None, min=0, help="on SIGTERM: seconds in-flight requests may "
                                                                    "finish, new ones getting 503 (default 30)"),
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
                              triton_grpc=triton[0], triton_replicas=triton[1:] or None, host=host, port=port,
                              keys_file=str(keys_file) if keys_file else None, max_body_bytes=max_body_bytes,
                              limits=limits or None, redis_url=redis, limits_fail_closed=limits_fail_closed or None,
                              drain_timeout_s=drain_timeout,
                              **_auth_option(allow_unauthenticated or None))
        if not cfg.repositories:
            raise GatewayError("no model repository: pass --repository (a folder written by `kiln repo`)")
        server = uvicorn_server(cfg)
    except (GatewayError, ValidationError, OSError) as err:
        console.print(f"[red]gateway config error[/]: {err}")
        raise typer.Exit(2)
    server.run()


def _server_dirs(s: DeploymentSpec, server_dirs: Optional[list[Path]]) -> list[Path]:
    """Where `kiln serve` keeps its Triton for this spec: the folders named, else alone or with
    other specs (WORKDIR/serve)."""
    return list(server_dirs) if server_dirs else [s.server_dir, s.workdir / "serve"]


ServerDirOpt = typer.Option(None, "--server-dir", help="the running `kiln serve`'s server folder (default: the "
                                                       "spec's, else WORKDIR/serve); repeat to name several, each "
                                                       "of which must have its Triton running")


def _version_switch(verb: str, spec: str, workdir: Optional[Path], server_dirs: Optional[list[Path]], run) -> None:
    """`kiln reload` / `kiln rollback`: ``run(spec, tritons, say)`` on every Triton the running
    `kiln serve` has for the spec (with --server-dir: every Triton of every folder named); a
    refusal exits 1 saying why (the serving version stays)."""
    from kiln.reload import ReloadError, running_tritons

    s = _spec(spec, workdir)
    try:
        result = run(s, running_tritons(_server_dirs(s, server_dirs), every=bool(server_dirs)),
                     lambda msg: console.print(f"[bold cyan]{verb}[/] {msg}", highlight=False))
    except ReloadError as err:
        console.print(f"[red]{verb} refused[/]: {err}")
        raise typer.Exit(1)
    smoke = f"; {result.smoke_summary}" if result.smoke_summary else ""
    if result.canary:
        out.print(result.canary)
    out.print(f"{result.model}: version {result.from_version} -> {result.to_version} ({result.precision}) in "
              f"{result.seconds:.1f}s{smoke}")


@app.command()
def reload(spec: str = SpecArg, workdir: Optional[Path] = WorkdirOpt,
           server_dir: Optional[list[Path]] = ServerDirOpt,
           canary: Optional[float] = typer.Option(None, "--canary", min=1.0, max=99.0, help="percent of the traffic "
                                                  "through the gateway sent to the new version first; promoted or "
                                                  "rolled back by its error rate, p95 and agreement (kiln/canary.py)"),
           canary_requests: int = typer.Option(200, min=1, help="--canary: judge once it answered this many ..."),
           canary_seconds: float = typer.Option(60.0, min=1.0, help="--canary: ... or after this long")):
    """A new version of a served model with no dropped request: export and gate the spec
    anew, load it beside the serving version, smoke-test it (optionally give it a canary
    share of the traffic first), switch, unload the old one."""
    from kiln.canary import CanaryPlan, gateways_in
    from kiln.reload import reload_version

    plan = None if canary is None else CanaryPlan(canary / 100.0, canary_requests, canary_seconds)

    def run(s, tritons, say):
        gateways = gateways_in(_server_dirs(s, server_dir)) if plan is not None else []
        return reload_version(s, tritons, say=say, canary=plan, gateways=gateways)

    _version_switch("reload", spec, workdir, server_dir, run)


@app.command()
def rollback(spec: str = SpecArg, workdir: Optional[Path] = WorkdirOpt,
             server_dir: Optional[list[Path]] = ServerDirOpt):
    """Back to the version served before the last `kiln reload` (still on disk), the same way."""
    from kiln.reload import rollback_version

    _version_switch("rollback", spec, workdir, server_dir,
                    lambda s, tritons, say: rollback_version(s.repository_dir, tritons, say=say))


@app.command()
def keygen(name: str = typer.Option("user", help="the key's name in the keys file")):
    """Print a new API key and the keys-file entry that stores only its SHA-256."""
    from kiln.gateway.auth import digest, new_key

    key = new_key()
    out.print(f"key (give it to the client, it is not stored): {key}")
    out.print(f"keys-file entry:\n- name: {name}\n  sha256: {digest(key)}")


@app.command()
def bench(
    spec: str = SpecArg,
    workdir: Optional[Path] = WorkdirOpt,
    replicas: int = typer.Option(1, min=1, help="N >= 2: instead, throughput through a gateway over 1 Triton and "
                                                "over N, and the routing overhead (kiln/bench_replicas.py)"),
    cache: bool = typer.Option(False, "--cache", help="instead, embeddings throughput and latency with Triton's "
                                                      "response cache on and off (kiln/bench_cache.py)"),
    repeats: float = typer.Option(0.3, min=0.0, max=0.99, help="--cache: the share of requests that repeat an "
                                                                "earlier text"),
):
    """PyTorch eager vs in-process ONNX Runtime vs served Triton, batch 1 and 32: one table
    (--replicas N: a gateway over 1 Triton vs over N, throughput and routing overhead;
    --cache: the response cache on vs off with a share of repeated requests)."""
    from kiln.bench import run_bench

    s = _spec(spec, workdir)
    if cache:
        from kiln.bench_cache import run_cache_bench

        if s.task.value != "feature-extraction":
            console.print(f"[red]bench error[/] --cache measures embeddings; {s.name} is {s.task.value}")
            raise typer.Exit(2)
        ensure_export(s)
        try:
            run_cache_bench(s, out, repeat_ratio=repeats)
        except ValueError as err:
            console.print(f"[red]bench error[/] {err}")
            raise typer.Exit(2)
        return
    if replicas >= 2:
        from kiln.bench_replicas import run_replica_bench, task_kind

        try:
            task_kind(s)
        except ValueError as err:
            console.print(f"[red]bench error[/] {err}")
            raise typer.Exit(2)
        ensure_export(s)
        run_replica_bench(s, out, replicas=replicas)
        return
    ensure_export(s)
    if s.task.value == "text-generation":
        from kiln.bench_lm import run_lm_bench

        run_lm_bench(s, out)
        return
    run_bench(s, out)


@app.command()
def engines(spec: str = SpecArg, workdir: Optional[Path] = WorkdirOpt):
    """Build TensorRT engines from the exported variants (needs a GPU and TensorRT)."""
    from export.tensorrt import (
        EngineError,
        TensorRTUnavailable,
        build_engine,
        engine_precisions,
    )
    from kiln_core.manifest import ExportManifest

    s = _spec(spec, workdir)
    wanted, skipped = engine_precisions(s)
    for precision, why in skipped.items():
        console.print(f"[yellow]engines[/] skipping {precision}: {why}")
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

    from kiln.server import ServerError
    from kiln.stack import GatewayOptions, Stack
    from kiln_runtime.contract import EMBEDDING, SCORES
    from loadtest.runner import OPENAI_TASKS, Endpoint, run_loadtest

    via_gateway = s.loadtest.shape.protocol == "openai"
    if via_gateway and s.task.value not in OPENAI_TASKS:
        console.print(f"[red]--protocol openai[/]: the gateway serves no {s.task.value} models "
                      f"(only {', '.join(OPENAI_TASKS)}); use grpc or http")
        raise typer.Exit(2)
    output = SCORES if s.task.value == "text-classification" else EMBEDDING
    reports = out_dir or s.loadtest_dir
    stack = None
    try:
        if url is None:
            from model_repository.writer import write_repository

            ensure_export(s)
            stack = Stack(write_repository(s), s.server_dir)
            console.print(f"[bold cyan]load[/] starting Triton for {s.name}")
            stack.start()
            url = stack.triton.grpc_url if s.loadtest.shape.protocol == "grpc" else stack.triton.http_url
            if via_gateway:
                # the gateway started here accepts exactly the key the users send ("none": no keys)
                options = GatewayOptions(keys="" if api_key == "none" else api_key, log_file=reports / "gateway.log")
                console.print(f"[bold cyan]load[/] starting the OpenAI gateway for {s.name} (log {options.log_file})")
                try:
                    gateway = stack.start_gateway(options)
                except RuntimeError as err:  # exited, or never answered /health or /ready
                    console.print(f"[red]the gateway failed to start[/]: {err}")
                    raise typer.Exit(1)
                url = f"{gateway.config.host}:{gateway.config.port}"
        ep = Endpoint(url, s.name, output, task=s.task.value, api_key=api_key)
        summary = run_loadtest(s.loadtest.shape, s.loadtest.targets, ep, reports, console)
    except ServerError as err:
        console.print(f"[red]Triton failed to start[/]: {err}")
        raise typer.Exit(1)
    finally:
        if stack is not None:
            stack.stop()
    raise typer.Exit(summary["exit_code"])


@app.command()
def tune(
    spec: str = SpecArg,
    slo: Path = typer.Option(..., "--slo", help="YAML with a `loadtest:` mapping: the targets to meet, and the "
                                                "capacity search's shape (start_rate, step_factor, step_time_s, ...)"),
    workdir: Optional[Path] = WorkdirOpt,
    budget: float = typer.Option(600.0, min=1.0, help="seconds: no candidate is started that would not end within it"),
    out_file: Optional[Path] = typer.Option(None, "--out", help="where the best spec goes (default <workdir>/<name>/tune/tuned.yaml)"),
    max_candidates: int = typer.Option(16, min=1, help="candidates at most, the spec as given first"),
):
    """Search batching, queue delay, instances and threads (chat: concurrent sequences) for the
    highest load that meets the SLO; write the best as a spec. Exit 1 when none meets it."""
    from gevent import monkey

    monkey.patch_all()  # before any socket is made: the load tests run Locust on gevent
    import yaml

    from kiln.tune import run_tune
    from kiln_core.spec import merge_overrides, parse_spec, spec_file

    s = _spec(spec, workdir)
    try:
        raw = (yaml.safe_load(slo.read_text()) or {}).get("loadtest", {})
        # laid over the spec's own load test, as `kiln loadtest --slo` does
        data = s.model_dump(mode="json")
        target = parse_spec(merge_overrides(data, {"loadtest": raw}), origin=f"--slo {slo}").loadtest
    except (OSError, yaml.YAMLError, AttributeError, SpecError) as err:
        console.print(f"[red]cannot use --slo {slo}[/]: {err}")
        raise typer.Exit(2)
    wide = console if console.is_terminal else Console(stderr=True, width=180)  # a log has no width: keep rows whole
    outcome = run_tune(s, spec_file(spec), target, wide, budget_s=budget,
                       out=out_file, workdir=str(workdir) if workdir else None, max_candidates=max_candidates)
    raise typer.Exit(outcome.exit_code)


@app.command()
def demo(
    specs: list[str] = typer.Argument(None, help="one or more specs, served together (default: minilm)"),
    workdir: Optional[Path] = WorkdirOpt,
    no_gateway: bool = typer.Option(False, "--no-gateway", help="skip the OpenAI gateway part"),
):
    """Export, write the repositories, start Triton, send real requests (similarity matrix,
    streamed chat answer), then the same through the OpenAI-compatible gateway with curl."""
    from kiln.demo import run_demo
    from kiln.server import ServerError

    loaded = [_spec(x, workdir) for x in (specs or ["minilm"])]
    _check_names(loaded)
    repos, loaded = _prepare(loaded)
    try:
        run_demo(loaded, repos, console, out, gateway=not no_gateway)
    except ServerError as err:
        console.print(f"[red]Triton failed to start[/]: {err}")
        raise typer.Exit(1)


@app.command()
def faults(
    workdir: Path = typer.Option(Path("build/faults"), "--workdir", help="tiny models, exports, logs and faults.json"),
    strict: bool = typer.Option(False, "--strict", help="exit 1 when a threshold is missed too, not only on a hard "
                                                       "failure (a 5xx on fuzz, a hang, no recovery, a crash)"),
):
    """The fault suite on tiny models: hostile bodies, overload, Triton killed, the generation
    loop killed; one table (and WORKDIR/faults.json). Exit 1 on a hard failure."""
    from kiln.faults import run_faults

    # a log or CI has no terminal width: keep the table's figures on one line each
    wide = out if out.is_terminal else Console(width=180)
    raise typer.Exit(run_faults(workdir, wide, strict=strict).exit_code)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
