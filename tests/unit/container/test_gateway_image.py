"""kiln/gateway/Dockerfile, the gateway image the manifests run, checked statically (no
container engine here): it installs what a running gateway imports (a child process builds
the gateway app, Redis limits included, and reports its modules), each pin as pyproject.toml
has it, none of the export stack, and every package of the project is copied."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "kiln" / "gateway" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# loaded here but not needed: setuptools' distutils hook (a .pth file of any venv) and sniffio,
# which anyio imports only when it is there (it is not among anyio's requirements)
INCIDENTAL = {"setuptools", "sniffio"}
EXPORT_STACK = {"torch", "transformers", "onnxruntime", "onnx", "optimum", "accelerate", "locust", "kubernetes"}

GATEWAY_MODULES = r"""
import json, sys, tempfile
from pathlib import Path
import kiln.cli  # the image's entry point: `kiln gateway`
from kiln.gateway.app import build_app
from kiln.gateway.config import GatewayConfig
from kiln_core.card import RepositoryCard

folder = Path(tempfile.mkdtemp())
RepositoryCard(public_model="lm", task="text-generation", models=["lm"], runtime="python-ort", precision="fp32",
               variant_sha256="0" * 64, parity={}, max_input_tokens=128, max_batch_size=4, inputs={}, outputs={},
               spec={}).write(folder)
build_app(GatewayConfig(port=0, repositories=[folder], redis_url="redis://127.0.0.1:1/0"))
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def dockerfile_requirements() -> list[Requirement]:
    """The quoted requirements of the Dockerfile's first `pip install` (its dependency layer)."""
    text = DOCKERFILE.read_text()
    block = text.split("pip install --no-cache-dir", 1)[1].split("\n\n", 1)[0]
    return [Requirement(r) for r in re.findall(r'"([^"]+)"', block)]


@cache
def imported_distributions() -> set[str]:
    """Distributions whose modules a gateway process has loaded once its app is built."""
    out = subprocess.run([sys.executable, "-c", GATEWAY_MODULES], capture_output=True, text=True, timeout=120,
                         cwd=ROOT / "tests", env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    owners = metadata.packages_distributions()
    return {canonicalize_name(d) for m in modules for d in owners.get(m, [])}


def closure(requirements: list[Requirement]) -> set[str]:
    """The distributions installing `requirements` brings, as this environment resolves them."""
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in requirements]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency this environment lacks is one the gateway cannot import either
        if name in seen and not extras:
            continue
        seen.add(name)
        for line in dist.requires or []:
            dep = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in envs):
                todo.append((dep, frozenset(dep.extras)))
    return seen


def test_the_image_installs_everything_a_running_gateway_imports():
    installed = closure(dockerfile_requirements()) | {"kiln"}
    missing = sorted(imported_distributions() - installed - INCIDENTAL)
    assert not missing, f"kiln/gateway/Dockerfile lacks {missing}"


def test_the_gateway_imports_none_of_the_export_stack_and_the_image_installs_none():
    assert not imported_distributions() & EXPORT_STACK
    assert not {canonicalize_name(r.name) for r in dockerfile_requirements()} & EXPORT_STACK


def test_each_pin_is_the_one_in_pyproject():
    project = {canonicalize_name(r.name): r for r in map(Requirement, PYPROJECT["project"]["dependencies"])}
    for req in dockerfile_requirements():
        theirs = project.get(canonicalize_name(req.name))
        assert theirs is not None, f"{req} is not a dependency in pyproject.toml"
        assert req.specifier == theirs.specifier, f"{req} vs pyproject's {theirs}"
        assert req.extras <= theirs.extras, f"{req} vs pyproject's {theirs}"


def test_every_package_of_the_project_is_copied_and_installed_without_its_other_dependencies():
    text = DOCKERFILE.read_text()
    tops = {p.split(".")[0] for p in PYPROJECT["tool"]["setuptools"]["packages"]}
    copied = set(re.findall(r"^COPY (\S+) \1$", text, flags=re.M))
    assert tops <= copied, sorted(tops - copied)
    assert "pip install --no-cache-dir --no-deps ." in text
    assert re.search(r'^ENTRYPOINT \["kiln", "gateway"\]$', text, flags=re.M)
    assert re.search(r"^USER \d+$", text, flags=re.M)  # not root


def test_the_build_context_leaves_out_the_virtualenv_and_the_build_outputs():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "build", ".git"} <= set(ignored)


@pytest.mark.parametrize("spec", ["minilm", "smollm2"])
def test_the_manifests_run_the_gateway_image_with_a_command_line_the_cli_accepts(spec):
    """The Deployment's `kiln gateway ...` arguments parse (typer), with the image's entry point."""
    from typer.testing import CliRunner

    from kiln.cli import app
    from kiln.deploy.k8s import DeployOptions, Names, gateway_args
    from kiln_core.spec import load_spec

    args = gateway_args(Names.of(load_spec(spec)), "triton:8001")
    assert args[0] == "gateway" and DeployOptions().gateway_image == "kiln-gateway:latest"
    result = CliRunner().invoke(app, [*args[:1], "--help"])
    assert result.exit_code == 0
    options = {a for a in args if a.startswith("--")}
    assert options <= set(re.findall(r"--[a-z][a-z-]+", result.output)), options
