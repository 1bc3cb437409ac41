"""`kiln deploy SPEC --target k8s|kserve`: the typer command (registered in kiln/cli.py).

Reads only the spec; exit 2 for a bad spec or option, 1 if a built manifest fails its schema
(a bug in kiln, not in the input). The kubernetes client and the schemas load on the first
call, not when the CLI starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from kiln_core.spec import SpecError, load_spec

console = Console(stderr=True)
screen = Console()


def deploy(
    spec: str = typer.Argument("minilm", help="spec YAML file, or a packaged spec name"),
    target: str = typer.Option("k8s", "--target", help="k8s (plain Kubernetes) | kserve (InferenceService + gateway)"),
    replicas: int = typer.Option(2, min=1, help="gateway replicas (they share rate limits through Redis)"),
    image: Optional[str] = typer.Option(None, help="Triton image; default kiln-triton-<name>:latest, the "
                                                   "repository baked in (kiln-triton:25.07 with --model-store)"),
    gateway_image: str = typer.Option("kiln-gateway:latest", help="an image with kiln installed"),
    model_store: Optional[str] = typer.Option(None, help="s3://bucket/prefix holding the repository: an init "
                                                         "container fetches it instead of baking it into the image"),
    max_triton_replicas: int = typer.Option(4, min=1, help="the queue-time autoscaler's ceiling"),
    queue_target_ms: float = typer.Option(50.0, help="average queue time per request above which Triton scales out"),
    out: Optional[Path] = typer.Option(None, "--out", help="default: build/<name>/deploy"),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="override the spec's workdir"),
):
    """Kubernetes or KServe manifests for the spec, built from typed objects and validated
    offline (Kubernetes' and KServe's schemas), with Prometheus, adapter and Grafana configs."""
    from kiln.deploy.k8s import DeployError, DeployOptions
    from kiln.deploy.validate import KUBERNETES_VERSIONS, ManifestError
    from kiln.deploy.writer import TARGETS, describe, write_deploy

    if target not in TARGETS:
        console.print(f"[red]--target {target!r}[/]: choose one of {', '.join(TARGETS)}")
        raise typer.Exit(2)
    try:
        s = load_spec(spec, workdir=str(workdir) if workdir else None)
        opts = DeployOptions(replicas=replicas, image=image, gateway_image=gateway_image, model_store=model_store,
                             max_triton_replicas=max_triton_replicas, queue_target_ms=queue_target_ms)
    except SpecError as err:
        console.print(f"[red]spec error[/] {err}")
        raise typer.Exit(2)
    except DeployError as err:
        console.print(f"[red]deploy option error[/] {err}")
        raise typer.Exit(2)
    try:
        files = write_deploy(s, target, opts, out)
    except ManifestError as err:
        console.print(f"[red]a generated manifest failed validation[/] (a kiln bug): {err}")
        raise typer.Exit(1)
    table = Table(title=f"kiln deploy {s.name} --target {target}",
                  caption=f"validated offline: Kubernetes {' and '.join(KUBERNETES_VERSIONS)} schemas (strict)"
                          f"{', KServe CRD schemas' if target == 'kserve' else ''}; nothing was applied to a cluster")
    table.add_column("file", overflow="fold")
    table.add_column("holds")
    for path in files:
        table.add_row(str(path), describe(path))
    screen.print(table)
    folder = files[0].parent
    if opts.model_store:
        console.print(f"[bold cyan]deploy[/] upload the repository: aws s3 sync {s.repository_dir} {opts.model_store}")
    else:
        console.print(f"[bold cyan]deploy[/] build the image: docker build -t {opts.triton_base_image} triton/ && "
                      f"docker build -t {opts.triton_image(s)} -f {folder.parent / 'Dockerfile'} {s.repository_dir}")
    console.print(f"[bold cyan]deploy[/] then: kubectl apply -f {folder}/  (README: Secrets, adapter, KServe)")
