"""triton/: container launch assets, checked statically (no Docker engine runs here).

The script runs for real in dry-run mode (KILN_DRY_RUN=1 prints the docker commands), on a
repository the writer produced for the onnxruntime_onnx runtime.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln_core.manifest import ExportManifest, ParityReport, TensorSpec, Variant, sha256
from kiln_core.spec import DeploymentSpec
from model_repository import configs
from model_repository.writer import write_repository

ROOT = Path(__file__).resolve().parents[3]
TRITON = ROOT / "triton"
SCRIPT = TRITON / "run-container.sh"
DOCKERFILE = TRITON / "Dockerfile"


def run_script(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )


# ----------------------------------------------------------------------------- a written repository
def tiny_encoder(path: Path, hidden: int = 4, vocab: int = 10) -> None:
    """input_ids, attention_mask [batch, sequence] -> last_hidden_state [batch, sequence, hidden]."""
    emb = numpy_helper.from_array(np.arange(vocab * hidden, dtype=np.float32).reshape(vocab, hidden), "emb")
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        [emb, numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture
def written(tmp_path: Path) -> tuple[DeploymentSpec, Path]:
    spec = DeploymentSpec(
        name="tiny",
        source={"kind": "folder", "path": str(tmp_path / "checkpoint")},
        max_length=16,
        precisions=["fp32"],
        serve_precision="fp32",
        runtime="onnxruntime_onnx",
        instances={"kind": "gpu"},
        workdir=tmp_path / "build",
    )
    export = spec.export_dir
    (export / "tokenizer").mkdir(parents=True)
    (export / "tokenizer" / "tokenizer.json").write_text("{}\n")
    onnx_file = export / "model.fp32.onnx"
    tiny_encoder(onnx_file)
    manifest = ExportManifest(
        name=spec.name,
        task="feature-extraction",
        architecture="Tiny",
        checkpoint=str(tmp_path / "checkpoint"),
        tokenizer_dir="tokenizer",
        max_length=16,
        hidden_size=4,
        pooling="mean",
        normalize=True,
        opset=18,
        inputs=[TensorSpec(name=n, dtype="int64", shape=["batch", "sequence"]) for n in ("input_ids", "attention_mask")],
        outputs=[TensorSpec(name="last_hidden_state", dtype="float32", shape=["batch", "sequence", 4])],
        variants={
            "fp32": Variant(
                precision="fp32",
                file=onnx_file.name,
                sha256=sha256(onnx_file),
                bytes=onnx_file.stat().st_size,
                parity=ParityReport(reference="test", inputs=32, figures={}, thresholds={}, passed=True),
            )
        },
    )
    manifest.write(export)
    return spec, write_repository(spec, manifest)


def test_onnxruntime_onnx_repository_has_platform_encoder(written):
    spec, repo = written
    names = configs.Names(spec.name)
    enc = configs.parse_pbtxt((repo / names.encoder / "config.pbtxt").read_text())
    assert enc.platform == "onnxruntime_onnx"
    assert enc.default_model_filename == "model.onnx"
    assert enc.instance_group[0].kind == enc.instance_group[0].KIND_GPU
    placed = repo / names.encoder / "1" / "model.onnx"
    assert placed.is_file() and sha256(placed) == sha256(spec.export_dir / "model.fp32.onnx")
    assert not (repo / names.encoder / "1" / "model.py").exists()  # served by the backend, not python
    assert [i.name for i in enc.input] == ["input_ids", "attention_mask"]
    assert (repo / "kiln.json").is_file()


# ----------------------------------------------------------------------------- run-container.sh
def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_script_basics():
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert re.search(r"^set -euo pipefail$", text, re.M)
    assert os.access(SCRIPT, os.X_OK)
    for needle in (":/models:ro", "--model-repository=/models", '--gpus "$GPUS"', "--shm-size"):
        assert needle in text, needle
    for port in (8000, 8001, 8002):
        assert f":{port}\"" in text, port


RESTRICTED = {"shared-memory", "logging", "trace", "model-repository"}


def restricted(server: list[str], flag: str) -> tuple[set[str], str]:
    """The APIs a --http-restricted-api / --grpc-restricted-protocol argument closes, and its header."""
    (value,) = [a.split("=", 1)[1] for a in server if a.startswith(flag + "=")]
    apis, header = value.split(":", 1)
    return set(apis.split(",")), header


def test_script_without_arguments_prints_usage(tmp_path):
    r = run_script(cwd=tmp_path)
    assert r.returncode == 2
    assert "usage:" in r.stderr and "MODEL_REPOSITORY" in r.stderr


def test_script_refuses_a_folder_that_is_not_a_repository(tmp_path):
    r = run_script(str(tmp_path), cwd=tmp_path, KILN_DRY_RUN="1")
    assert r.returncode == 2
    assert "kiln.json" in r.stderr


def test_script_serves_the_written_repository(written, tmp_path):
    _, repo = written
    r = run_script(
        str(repo), "--log-verbose=1", cwd=tmp_path, KILN_DRY_RUN="1", HTTP_PORT="18000", GRPC_PORT="18001", METRICS_PORT="18002"
    )
    assert r.returncode == 0, r.stderr
    build, run = [shlex.split(line) for line in r.stdout.strip().splitlines()]
    assert build[:2] == ["docker", "build"] and build[-1] == str(TRITON)
    image = build[build.index("-t") + 1]
    assert run[:3] == ["docker", "run", "--rm"]
    assert run[run.index("--gpus") + 1] == "all"
    assert run[run.index("-v") + 1] == f"{repo.resolve()}:/models:ro"
    ports = [run[i + 1] for i, a in enumerate(run) if a == "-p"]
    assert ports == ["127.0.0.1:18000:8000", "127.0.0.1:18001:8001", "127.0.0.1:18002:8002"]  # loopback only
    server = run[run.index(image) + 1 :]
    assert server[0] == "tritonserver"
    assert "--model-repository=/models" in server and server[-1] == "--log-verbose=1"
    # Triton has no authentication: its admin APIs answer only a header with a random key
    http, grpc = restricted(server, "--http-restricted-api"), restricted(server, "--grpc-restricted-protocol")
    assert http == grpc and http[0] == RESTRICTED
    assert re.fullmatch(r"kiln-admin=[0-9a-f]{32}", http[1])
    again = shlex.split(run_script(str(repo), cwd=tmp_path, KILN_DRY_RUN="1").stdout.splitlines()[-1])
    assert restricted(again, "--http-restricted-api")[1] != http[1]  # a fresh key each start


def test_script_binds_elsewhere_and_takes_an_admin_key_only_when_asked(written, tmp_path):
    _, repo = written
    key = "k" * 24
    r = run_script(str(repo), cwd=tmp_path, KILN_DRY_RUN="1", KILN_SKIP_BUILD="1", KILN_BIND_ADDRESS="0.0.0.0",
                   KILN_ADMIN_KEY=key)
    assert r.returncode == 0, r.stderr
    run = shlex.split(r.stdout.strip())
    assert [run[i + 1] for i, a in enumerate(run) if a == "-p"] == ["0.0.0.0:8000:8000", "0.0.0.0:8001:8001", "0.0.0.0:8002:8002"]
    assert restricted(run, "--grpc-restricted-protocol") == (RESTRICTED, f"kiln-admin={key}")
    for bad in ("short", "a:b=c,d" * 4):  # too guessable, or breaks the flag's syntax
        r = run_script(str(repo), cwd=tmp_path, KILN_DRY_RUN="1", KILN_SKIP_BUILD="1", KILN_ADMIN_KEY=bad)
        assert r.returncode == 2 and "KILN_ADMIN_KEY" in r.stderr


def test_script_skip_build_runs_only_the_container(written, tmp_path):
    _, repo = written
    r = run_script(str(repo), cwd=tmp_path, KILN_DRY_RUN="1", KILN_SKIP_BUILD="1", GPUS="device=0")
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.strip().splitlines()
    run = shlex.split(line)
    assert run[:2] == ["docker", "run"] and run[run.index("--gpus") + 1] == "device=0"


# ----------------------------------------------------------------------------- Dockerfile
def base_image(text: str) -> str:
    """The FROM line with its ARG defaults substituted."""
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    (image,) = re.findall(r"^FROM (\S+)", text, re.M)
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


def test_dockerfile_builds_on_a_triton_release_with_the_2025_fixes():
    """The python-backend and HTTP advisories of August 2025 are fixed from 25.07 on; the
    onnxruntime-gpu pin is the onnxruntime backend's version in that release."""
    text = DOCKERFILE.read_text()
    tag = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d{2})\.(\d{2})-py3", base_image(text))
    assert tag and (int(tag[1]), int(tag[2])) >= (25, 7), base_image(text)
    ort = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))["ORT_VERSION"]
    assert {"25.07": "1.22.0"}.get(f"{tag[1]}.{tag[2]}") == ort, "pin ORT_VERSION to the release's onnxruntime backend"
    script = SCRIPT.read_text()
    assert f"${{TRITON_TAG:-{tag[1]}.{tag[2]}-py3}}" in script  # the script's image name follows the Dockerfile


def test_dockerfile_command_restricts_the_admin_apis():
    (cmd,) = re.findall(r"^CMD (.*)$", DOCKERFILE.read_text(), re.M)
    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
        (value,) = re.findall(flag + r"=(\S+?):kiln-admin=", cmd)
        assert set(value.split(",")) == RESTRICTED, flag


def pip_requirements(text: str) -> set[str]:
    """Distribution names on the Dockerfile's pip install line."""
    install = re.search(r"pip install(.*?)(?:&&|$)", text, re.S).group(1)
    words = [w.strip('"\\') for w in install.split() if not w.startswith("-") and w.strip('"\\')]
    return {re.split(r"[<>=!~\[]", w, maxsplit=1)[0].lower() for w in words}


# import name -> the distribution that provides it in the image
DISTRIBUTIONS = {"numpy": "numpy", "onnxruntime": "onnxruntime-gpu", "tokenizers": "tokenizers", "jinja2": "jinja2"}
IN_THE_IMAGE = {"triton_python_backend_utils"}  # the python backend provides it
SHIPPED = {"kiln_runtime"}  # copied into every repository beside model.py


def served_imports() -> dict[str, list[str]]:
    """Top-level names of every import (function-level included) in the served code: the
    python models and kiln_runtime; {name: ["file:line", ...]}, the standard library left out."""
    files = sorted((ROOT / "model_repository" / "python_models").glob("*.py")) + sorted((ROOT / "kiln_runtime").rglob("*.py"))
    found: dict[str, list[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_import_of_the_served_code_is_installed_in_the_image():
    installed = pip_requirements(DOCKERFILE.read_text())
    assert installed >= {"numpy", "tokenizers", "jinja2", "onnxruntime-gpu"}
    imports = served_imports()
    assert {"numpy", "onnxruntime", "tokenizers", "jinja2", "kiln_runtime"} <= set(imports)  # the scan sees them
    missing = {
        name: where for name, where in imports.items()
        if name not in IN_THE_IMAGE | SHIPPED and DISTRIBUTIONS.get(name) not in installed
    }
    assert not missing, f"imported by served code but not installed by triton/Dockerfile: {missing}"


def test_triton_folder_is_not_python():
    # the top-level triton/ must never be importable: it would shadow the `triton` package torch uses
    assert not list(TRITON.rglob("*.py"))
    assert {p.name for p in TRITON.iterdir()} >= {"Dockerfile", "run-container.sh", "README.md"}
