"""export/tensorrt.py without TensorRT: profile shapes, graph checks and rewrites, and the
checks build_engine makes before it imports TensorRT. Runs everywhere, skips nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.tensorrt import (
    BUILDER_FLAGS,
    EngineError,
    ShapeRange,
    TensorRTUnavailable,
    build_engine,
    engine_path,
    engine_precisions,
    gate_engine,
    is_qdq_graph,
    portable_graph,
    profile_shapes,
    qdq_problems,
    record_path,
    trtexec_command,
)
from kiln_core.manifest import ExportManifest, ParityReport, TensorSpec, Variant, sha256
from kiln_core.spec import DeploymentSpec
from kiln_testkit import tiny_spec

HIDDEN, VOCAB = 8, 16


def make_spec(tmp_path: Path, **kw) -> DeploymentSpec:
    base = dict(
        name="tiny",
        source={"kind": "folder", "path": str(tmp_path / "checkpoint")},
        max_length=64,
        precisions=["fp32", "int8", "fp16"],
        serve_precision="fp16",
        batching={"max_batch_size": 32, "preferred_batch_sizes": [4, 16]},
        workdir=tmp_path / "build",
    )
    return DeploymentSpec(**{**base, **kw})


def make_manifest(inputs=None, max_length: int = 64, variants=None, outputs=None) -> ExportManifest:
    return ExportManifest(
        name="tiny",
        task="feature-extraction",
        architecture="Tiny",
        checkpoint="/nowhere",
        tokenizer_dir="tokenizer",
        max_length=max_length,
        hidden_size=HIDDEN,
        pooling="mean",
        normalize=True,
        opset=18,
        inputs=inputs
        or [TensorSpec(name=n, dtype="int64", shape=["batch", "sequence"]) for n in ("input_ids", "attention_mask")],
        outputs=outputs or [TensorSpec(name="last_hidden_state", dtype="float32", shape=["batch", "sequence", HIDDEN])],
        variants=variants or {},
    )


# ----------------------------------------------------------------------------- profile shapes
def test_profile_covers_every_shape_the_triton_config_admits(tmp_path):
    spec = make_spec(tmp_path)
    shapes = profile_shapes(spec, make_manifest())
    assert shapes == {
        "input_ids": ShapeRange(min=(1, 1), opt=(16, 64), max=(32, 64)),
        "attention_mask": ShapeRange(min=(1, 1), opt=(16, 64), max=(32, 64)),
    }


def test_profile_opt_sequence_is_capped_at_128(tmp_path):
    spec = make_spec(tmp_path, max_length=512, batching={"max_batch_size": 64})
    (r,) = set(profile_shapes(spec, make_manifest(max_length=512)).values())
    assert r == ShapeRange((1, 1), (32, 128), (64, 512))  # opt batch: the largest default preferred size


def test_profile_opt_overrides_and_their_bounds(tmp_path):
    spec = make_spec(tmp_path)
    (r,) = set(profile_shapes(spec, make_manifest(), opt_batch=1, opt_sequence=8).values())
    assert r.opt == (1, 8)
    with pytest.raises(ValueError, match="opt_batch 33"):
        profile_shapes(spec, make_manifest(), opt_batch=33)
    with pytest.raises(ValueError, match="opt_sequence 65"):
        profile_shapes(spec, make_manifest(), opt_sequence=65)


def test_profile_keeps_fixed_axes(tmp_path):
    inputs = [TensorSpec(name="pixel", dtype="float32", shape=["batch", 3, "sequence"])]
    assert profile_shapes(make_spec(tmp_path), make_manifest(inputs)) == {
        "pixel": ShapeRange((1, 3, 1), (16, 3, 64), (32, 3, 64))
    }


@pytest.mark.parametrize(
    "shape, message",
    [
        (["sequence", "batch"], "first axis must be the dynamic 'batch'"),
        ([4, "sequence"], "first axis must be the dynamic 'batch'"),
        (["batch", "height"], "axis 1 is 'height'"),
        (["batch", "batch"], "axis 1 is 'batch'"),
    ],
)
def test_profile_refuses_axes_it_cannot_bound(tmp_path, shape, message):
    with pytest.raises(EngineError, match=message):
        profile_shapes(make_spec(tmp_path), make_manifest([TensorSpec(name="x", dtype="int64", shape=shape)]))


def test_profile_refuses_a_manifest_exported_with_another_max_length(tmp_path):
    with pytest.raises(EngineError, match="max_length 128 but the spec says 64"):
        profile_shapes(make_spec(tmp_path), make_manifest(max_length=128))


def test_trtexec_command_matches_the_profile(tmp_path):
    shapes = profile_shapes(make_spec(tmp_path), make_manifest())
    cmd = trtexec_command(Path("/x/model.fp16.trt.onnx"), Path("/x/model.fp16.plan"), shapes, "fp16", 4096)
    assert "--minShapes=input_ids:1x1,attention_mask:1x1" in cmd
    assert "--optShapes=input_ids:16x64,attention_mask:16x64" in cmd
    assert "--maxShapes=input_ids:32x64,attention_mask:32x64" in cmd
    assert cmd.endswith("--memPoolSize=workspace:4096 --fp16")


def test_engine_paths_are_where_the_repository_writer_looks(tmp_path):
    spec = make_spec(tmp_path)
    plan = engine_path(spec, "fp16")
    assert plan == spec.export_dir / "model.fp16.plan"  # model_repository.writer reads exactly this
    assert record_path(plan).name == "model.fp16.plan.json"


# ----------------------------------------------------------------------------- contrib-op rewrites
def contrib_graph() -> onnx.ModelProto:
    """SkipLayerNormalization (bias, sum output), BiasGelu, Gelu, FastGelu: what the
    onnxruntime.transformers optimizer leaves in an fp32 BERT graph."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    ms = "com.microsoft"
    nodes = [
        helper.make_node(
            "SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["ln", "", "", "sum"], domain=ms, epsilon=1e-5
        ),
        helper.make_node("MatMul", ["ln", "w"], ["mm"]),
        helper.make_node("BiasGelu", ["mm", "b1"], ["g1"], domain=ms),
        helper.make_node("Gelu", ["g1"], ["g2"], domain=ms),
        helper.make_node("FastGelu", ["g2", "b2"], ["g3"], domain=ms),
        helper.make_node("SkipLayerNormalization", ["g3", "sum", "gamma"], ["ln2"], domain=ms, epsilon=1e-12),
        helper.make_node("Add", ["ln2", "sum"], ["y"]),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "contrib",
        [helper.make_tensor_value_info(n, f, ["batch", "sequence", HIDDEN]) for n in ("x", "skip")],
        [helper.make_tensor_value_info("y", f, ["batch", "sequence", HIDDEN])],
        [init("gamma", HIDDEN), init("beta", HIDDEN), init("bias", HIDDEN), init("w", HIDDEN, HIDDEN), init("b1", HIDDEN), init("b2", HIDDEN)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(ms, 1)], ir_version=10)


def run_ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the rewritten ops as written
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_portable_graph_is_standard_onnx_with_the_same_outputs():
    model = contrib_graph()
    portable, rewrites = portable_graph(model)
    assert rewrites == {"SkipLayerNormalization": 2, "BiasGelu": 1, "Gelu": 1, "FastGelu": 1}
    assert {n.domain for n in portable.graph.node} == {""}
    assert [o.domain for o in portable.opset_import] == [""]
    onnx.checker.check_model(portable, full_check=True)
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((3, 5, HIDDEN)).astype(np.float32) for n in ("x", "skip")}
    np.testing.assert_allclose(run_ort(portable, feeds), run_ort(model, feeds), atol=2e-5, rtol=1e-5)
    assert any(n.domain == "com.microsoft" for n in model.graph.node)  # the input is left as it was


def test_portable_graph_names_contrib_ops_it_cannot_rewrite():
    model = contrib_graph()
    model.graph.node.append(helper.make_node("Attention", ["y"], ["z"], domain="com.microsoft"))
    with pytest.raises(EngineError, match=r"com\.microsoft:Attention x1"):
        portable_graph(model)


# ----------------------------------------------------------------------------- int8 forms
def matmul_graph(path: Path) -> Path:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", HIDDEN])],
        [numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return path


def quantize(src: Path, dst: Path, mode: str, symmetric: bool = True) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return dst

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(2)
            self.batches = iter([{"x": rng.standard_normal((4, HIDDEN)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )
    return dst


def test_qdq_detection(tmp_path):
    src = matmul_graph(tmp_path / "fp32.onnx")
    assert not is_qdq_graph(onnx.load(str(src)))
    assert not is_qdq_graph(onnx.load(str(quantize(src, tmp_path / "dyn.onnx", "dynamic"))))
    static = onnx.load(str(quantize(src, tmp_path / "qdq.onnx", "static")))
    assert is_qdq_graph(static) and qdq_problems(static) == []


def test_asymmetric_qdq_is_reported(tmp_path):
    src = matmul_graph(tmp_path / "fp32.onnx")
    model = onnx.load(str(quantize(src, tmp_path / "qdq_u8.onnx", "static", symmetric=False)))
    assert is_qdq_graph(model)
    assert any("TensorRT needs int8" in p for p in qdq_problems(model))


# ----------------------------------------------------------------------------- build_engine before TensorRT
def exported(tmp_path: Path, int8_mode: str) -> tuple[DeploymentSpec, ExportManifest]:
    """An export folder with a gated fp32 graph and an int8 graph of the given mode."""
    spec = make_spec(tmp_path, int8_mode=int8_mode)
    out = spec.export_dir
    out.mkdir(parents=True)
    fp32 = matmul_graph(out / "model.fp32.onnx")
    int8 = quantize(fp32, out / "model.int8.onnx", int8_mode)
    passed = ParityReport(reference="test", inputs=32, figures={}, thresholds={}, passed=True)
    variants = {
        p.stem.split(".")[1]: Variant(precision=p.stem.split(".")[1], file=p.name, sha256=sha256(p), bytes=p.stat().st_size, parity=passed)
        for p in (fp32, int8)
    }
    inputs = [TensorSpec(name="x", dtype="float32", shape=["batch", HIDDEN])]
    outputs = [TensorSpec(name="y", dtype="float32", shape=["batch", HIDDEN])]
    return spec, make_manifest(inputs=inputs, variants=variants, outputs=outputs)


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_int8_engine_needs_a_static_qdq_graph(tmp_path, no_tensorrt):
    spec, manifest = exported(tmp_path, "dynamic")
    with pytest.raises(EngineError, match="int8_mode: static"):
        build_engine(spec, manifest, "int8")


def test_without_tensorrt_the_error_says_where_engines_are_built(tmp_path, no_tensorrt):
    spec, manifest = exported(tmp_path, "static")
    for precision in ("fp16", "int8"):
        with pytest.raises(TensorRTUnavailable, match="NVIDIA GPU"):
            build_engine(spec, manifest, precision)
    assert not list(spec.export_dir.glob("*.plan*"))


def test_a_graph_that_failed_its_gate_is_refused(tmp_path, no_tensorrt):
    spec, manifest = exported(tmp_path, "static")
    manifest.variants["fp32"].parity.passed = False
    with pytest.raises(LookupError, match="failed its parity gate"):
        build_engine(spec, manifest, "fp16")


def test_a_graph_changed_after_its_gate_is_refused(tmp_path, no_tensorrt):
    spec, manifest = exported(tmp_path, "static")
    matmul_graph(spec.export_dir / "other.onnx").replace(spec.export_dir / "model.int8.onnx")
    with pytest.raises(EngineError, match="changed since it passed its parity gate"):
        build_engine(spec, manifest, "int8")


# ----------------------------------------------------------------------------- what is built, and its gate
def test_every_listed_precision_gets_an_engine_fp32_included(tmp_path):
    assert engine_precisions(make_spec(tmp_path, precisions=["fp32"], serve_precision="fp32")) == (["fp32"], {})
    wanted, skipped = engine_precisions(make_spec(tmp_path))  # int8 dynamic: no QDQ graph to build from
    assert wanted == ["fp32", "fp16"] and "int8_mode: static" in skipped["int8"]
    assert engine_precisions(make_spec(tmp_path, int8_mode="static")) == (["fp32", "int8", "fp16"], {})


def test_builder_flags_keep_fp32_exact_and_let_int8_fall_back_to_fp16(tmp_path):
    assert BUILDER_FLAGS["fp32"] == ([], ["TF32"])  # TensorRT's TF32 default would miss the fp32 gate
    assert BUILDER_FLAGS["fp16"] == (["FP16"], [])
    assert BUILDER_FLAGS["int8"] == (["INT8", "FP16"], [])  # unquantized layers may run in fp16
    profile = {"x": ShapeRange((1, 8), (4, 8), (32, 8))}
    cmd = {p: trtexec_command(Path("g.onnx"), Path("e.plan"), profile, p, 1024).split() for p in BUILDER_FLAGS}
    assert "--noTF32" in cmd["fp32"] and {"--int8", "--fp16"} <= set(cmd["int8"]) and "--fp16" in cmd["fp16"]


@pytest.fixture(scope="module")
def bert_reference(tiny_bert, tmp_path_factory):
    """A tiny BERT spec whose profile admits batches of 3, and run(feeds) by PyTorch itself:
    what a perfect engine returns."""
    import torch

    from export.onnx_export import load_encoder
    from kiln_core.sources import checkpoint_dir

    spec = tiny_spec(tiny_bert, tmp_path_factory.mktemp("gate"), batching={"max_batch_size": 3, "preferred_batch_sizes": [2]})
    loaded = load_encoder(spec, checkpoint_dir(spec))
    rows = []

    def run(feeds):
        rows.append(len(feeds["input_ids"]))
        with torch.no_grad():
            out = loaded.model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return getattr(out, loaded.output_name).float().numpy()

    return spec, run, rows


def test_an_engine_is_held_to_the_gate_of_its_precision(bert_reference):
    """The thresholds every ONNX variant of that precision meets; batches cut to the profile."""
    spec, run, rows = bert_reference
    report = gate_engine(spec, "fp32", run)
    assert report.passed and report.figures["max_abs_diff"] == 0 and report.inputs >= spec.parity.min_inputs
    assert report.thresholds == {"min_cosine": spec.parity.fp32_min_cosine, "max_abs_diff": spec.parity.fp32_max_abs}
    assert max(rows) == 3  # parity batches of 8 reach the engine in pieces its profile admits
    assert gate_engine(spec, "int8", run).thresholds == {"mean_cosine": spec.parity.int8_mean_cosine,
                                                         "min_cosine": spec.parity.int8_min_cosine}


def test_an_engine_that_drifts_fails_its_gate(bert_reference):
    spec, run, _ = bert_reference
    noise = np.random.default_rng(0)

    def drifting(feeds):  # what TF32 or a bad fusion does: small errors everywhere
        out = run(feeds)
        return out + noise.normal(0, 0.01, out.shape).astype(np.float32)

    report = gate_engine(spec, "fp32", drifting)
    assert not report.passed and any(f.startswith("max_abs_diff") for f in report.failures), report.failures
    assert gate_engine(spec, "fp16", drifting).passed  # the fp16 gate allows it, as for ONNX fp16
