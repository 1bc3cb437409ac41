"""TensorRT engines for real: the tiny random BERT of tests/support/kiln_testkit.py goes through
`kiln export`, fp16 and fp32 engines are built from its gated fp32 graph (each passing the
parity gate of its precision against PyTorch, as every ONNX variant does, before it is kept),
and the fp16 engine's output is checked against ONNX Runtime.

Needs the `tensorrt` Python package (10.x) and a CUDA GPU; anywhere else it skips, saying
which is missing. That is the only skip.
"""

from __future__ import annotations

import json

import numpy as np
import pytest


def missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        return f"`import tensorrt` failed ({err})"
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is a project dependency
        return f"`import torch` failed ({err})"
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    return None


# at collection, before any fixture builds a checkpoint or exports it
_reason = missing()
if _reason:
    print(f"needs TensorRT and a GPU: {_reason}")
    pytest.skip(f"needs TensorRT and a GPU: {_reason}", allow_module_level=True)


@pytest.fixture(scope="module")
def exported(tiny_bert, tmp_path_factory):
    from rich.console import Console

    from export.pipeline import run_export
    from kiln_core.spec import DeploymentSpec

    root = tmp_path_factory.mktemp("trt")
    spec = DeploymentSpec(
        name="tiny",
        source={"kind": "folder", "path": str(tiny_bert)},
        max_length=32,
        precisions=["fp32", "fp16"],  # an engine for each, fp32 included
        serve_precision="fp16",
        runtime="tensorrt_plan",
        instances={"kind": "gpu"},
        batching={"max_batch_size": 8, "preferred_batch_sizes": [4, 8]},
        workdir=root / "build",
    )
    manifest = run_export(spec, Console(quiet=True))
    return spec, manifest


@pytest.fixture(scope="module")
def fp16_engine(exported):
    from export.tensorrt import build_engine

    spec, manifest = exported
    return build_engine(spec, manifest, "fp16", workspace_gib=1.0)


@pytest.fixture(scope="module")
def fp32_engine(exported):
    from export.tensorrt import build_engine

    spec, manifest = exported
    return build_engine(spec, manifest, "fp32", workspace_gib=1.0)


def _feeds(spec, manifest, texts: list[str], pad_to: int | None = None) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.export_dir / manifest.tokenizer_dir)
    padding = "max_length" if pad_to else True
    enc = tok(texts, padding=padding, max_length=pad_to or spec.max_length, truncation=True, return_tensors="np")
    return {t.name: enc[t.name].astype(np.int64) for t in manifest.inputs}


def test_fp16_engine_is_recorded(exported, fp16_engine):
    import tensorrt as trt

    spec, manifest = exported
    assert fp16_engine == spec.export_dir / "model.fp16.plan" and fp16_engine.stat().st_size > 0
    record = json.loads((spec.export_dir / "model.fp16.plan.json").read_text())
    assert record["precision"] == "fp16" and record["builder_flags"] == ["FP16"] and record["builder_flags_cleared"] == []
    assert record["parity"]["passed"] and record["parity"]["thresholds"] == {"min_cosine": spec.parity.fp16_min_cosine}
    assert record["tensorrt"] == trt.__version__
    assert record["source"] == {
        "variant": "fp32",
        "file": manifest.variants["fp32"].file,
        "sha256": manifest.variants["fp32"].sha256,
        "notes": manifest.variants["fp32"].notes,
    }
    assert record["profile"]["input_ids"] == {"min": [1, 1], "opt": [8, 32], "max": [8, 32]}
    assert (spec.export_dir / record["parsed_graph"]["file"]).is_file()


def test_fp16_engine_matches_onnx_runtime(exported, fp16_engine):
    from export.parity import ort_runner
    from export.tensorrt import engine_runner
    from kiln_runtime.encoder import pool

    spec, manifest = exported
    engine, reference = engine_runner(fp16_engine), ort_runner(spec.export_dir / manifest.variants["fp32"].file)
    batches = [
        _feeds(spec, manifest, ["the man is playing a guitar"]),  # batch 1, short
        _feeds(spec, manifest, ["a", "hello world on the street " * 8, "我爱北京 🚀"]),  # padded, truncated
        _feeds(spec, manifest, [f"a man {i} and the guitar" for i in range(spec.batching.max_batch_size)], pad_to=spec.max_length),
    ]
    for feeds in batches:
        got, want = engine(feeds), reference(feeds)
        assert got.shape == want.shape
        mask = feeds["attention_mask"]
        a, b = pool(got, mask, "mean", True), pool(want, mask, "mean", True)
        cos = (a * b).sum(-1)
        assert cos.min() >= spec.parity.fp16_min_cosine, cos
        assert float((np.abs(got - want) * mask[..., None]).max()) < 0.05


def test_engines_pass_the_gate_of_their_precision(exported, fp16_engine, fp32_engine):
    from export.tensorrt import (
        engine_precisions,
        engine_runner,
        gate_engine,
        record_path,
    )

    spec, manifest = exported
    assert engine_precisions(spec) == (["fp32", "fp16"], {})
    for precision, plan in (("fp16", fp16_engine), ("fp32", fp32_engine)):
        report = gate_engine(spec, precision, engine_runner(plan))
        assert report.passed, (precision, report.failures)
        assert report.thresholds == manifest.variants["fp32" if precision == "fp32" else "fp16"].parity.thresholds
    record = json.loads(record_path(fp32_engine).read_text())
    assert record["builder_flags"] == [] and record["builder_flags_cleared"] == ["TF32"]  # fp32 means fp32
    assert record["parity"]["figures"]["max_abs_diff"] <= spec.parity.fp32_max_abs


def test_repository_serves_the_engine(exported, fp16_engine):
    from model_repository import configs
    from model_repository.writer import write_repository

    spec, manifest = exported
    repo = write_repository(spec, manifest)
    enc_dir = repo / configs.Names(spec.name).encoder
    cfg = configs.parse_pbtxt((enc_dir / "config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
    assert (enc_dir / "1" / "model.plan").read_bytes() == fp16_engine.read_bytes()
