"""Writes one target's manifests into ``<root>/<target>/`` (root: ``build/<name>/deploy``),
one numbered YAML file per object so ``kubectl apply -f <root>/<target>/`` creates them in
order, plus what both targets share beside them: ``prometheus.yml``, the Prometheus adapter's
Helm values, ``grafana-dashboard.json`` and the Dockerfile that bakes the repository into
the Triton image.

Every manifest is validated (``validate.py``) before any file is touched: a manifest the
schema refuses leaves the previous files as they were. The target's folder is this writer's
own: its old YAML files are removed, so an object dropped from a later version cannot
linger and be applied.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from kiln.deploy.k8s import MODELS_DIR, DeployOptions, build_k8s, to_dict
from kiln.deploy.kserve import build_kserve
from kiln.deploy.observability import (
    adapter_values,
    grafana_dashboard,
    prometheus_config,
)
from kiln.deploy.validate import validate
from kiln_core.spec import DeploymentSpec

TARGETS = {"k8s": build_k8s, "kserve": build_kserve}
PROMETHEUS, ADAPTER, DASHBOARD = "prometheus.yml", "prometheus-adapter-values.yaml", "grafana-dashboard.json"
DOCKERFILE = "Dockerfile"


def manifests(spec: DeploymentSpec, target: str, opts: DeployOptions) -> list[dict]:
    """The target's objects as dicts, in apply order (not yet validated)."""
    if target not in TARGETS:
        raise ValueError(f"target {target!r}: choose one of {', '.join(TARGETS)}")
    return [obj.manifest() if hasattr(obj, "manifest") else to_dict(obj) for obj in TARGETS[target](spec, opts)]


def file_name(index: int, doc: dict) -> str:
    return f"{index:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"


def dockerfile(opts: DeployOptions) -> str:
    """The repository image: triton/Dockerfile's image with the repository at /models, the
    path its CMD and these manifests serve."""
    return (f"# kiln deploy: the Triton image (triton/Dockerfile) with one model repository baked in.\n"
            f"# Build context: the repository folder (build/<name>/model_repository).\n"
            f"ARG BASE={opts.triton_base_image}\n"
            f"FROM ${{BASE}}\n"
            f"COPY . {MODELS_DIR}/\n")


def write_deploy(spec: DeploymentSpec, target: str, opts: DeployOptions, out: Path | None = None) -> list[Path]:
    """Validate, then write; returns every file written, the target's manifests first."""
    docs = manifests(spec, target, opts)
    for doc in docs:
        validate(doc)
    root = Path(out) if out is not None else spec.root / "deploy"
    folder = root / target
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.yaml"):
        old.unlink()
    written = []
    for i, doc in enumerate(docs):
        path = folder / file_name(i, doc)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        written.append(path)
    shared = {
        PROMETHEUS: yaml.safe_dump(prometheus_config(), sort_keys=False),
        ADAPTER: yaml.safe_dump(adapter_values(), sort_keys=False),
        DASHBOARD: json.dumps(grafana_dashboard(spec), indent=2) + "\n",
        DOCKERFILE: dockerfile(opts),
        # BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile: no bytecode in the image
        f"{DOCKERFILE}.dockerignore": "**/__pycache__\n",
    }
    for name, text in shared.items():
        path = root / name
        path.write_text(text)
        written.append(path)
    return written


def describe(path: Path) -> str:
    """What a written file holds, for the command's table."""
    if path.suffix == ".yaml" and path.name != ADAPTER:
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and "kind" in doc:
            return f"{doc['kind']} {doc['metadata']['name']} ({doc['apiVersion']})"
    return {
        PROMETHEUS: "Prometheus scrape config (pods of Triton and the gateway)",
        ADAPTER: "prometheus-adapter Helm values: the queue-time rule the autoscaler reads",
        DASHBOARD: "Grafana dashboard (gateway and Triton)",
        DOCKERFILE: "bakes the model repository into the Triton image",
        f"{DOCKERFILE}.dockerignore": "keeps __pycache__ out of that image",
    }.get(path.name, "")
