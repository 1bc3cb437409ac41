"""triton/: container launch assets, checked statically (no Docker engine runs here).

The script runs for real in dry-run mode (KILN_DRY_RUN=1 prints the docker commands), on a
repository the writer produced for the onnxruntime_onnx runtime.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
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
    assert ports == ["18000:8000", "18001:8001", "18002:8002"]
    server = run[run.index(image) + 1 :]
    assert server[0] == "tritonserver"
    assert "--model-repository=/models" in server and server[-1] == "--log-verbose=1"


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


def test_dockerfile_builds_on_nvidia_triton_py3():
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", base_image(DOCKERFILE.read_text()))


def test_dockerfile_installs_what_python_models_import():
    text = DOCKERFILE.read_text()
    install = re.search(r"pip install(.*?)(?:&&|$)", text, re.S).group(1)
    for package in ('"numpy<2"', "tokenizers", "onnxruntime-gpu", "jinja2"):
        assert package in install, package


def test_triton_folder_is_not_python():
    # the top-level triton/ must never be importable: it would shadow the `triton` package torch uses
    assert not list(TRITON.rglob("*.py"))
    assert {p.name for p in TRITON.iterdir()} >= {"Dockerfile", "run-container.sh", "README.md"}
