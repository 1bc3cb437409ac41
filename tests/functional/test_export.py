"""export/: tiny random checkpoints built by the test go through the real export pipeline;
the gate passes on a faithful graph and stops a corrupted one, with its figures."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export import variants
from export.onnx_export import load_encoder
from export.parity import ParityError, compare, gate, ort_runner, parity_batches
from export.pipeline import run_export
from kiln_core.card import RepositoryCard
from kiln_core.manifest import ExportManifest
from kiln_core.sources import checkpoint_dir
from kiln_core.spec import Precision
from kiln_testkit import tiny_spec
from model_repository.writer import write_repository


@pytest.fixture(scope="module")
def exported(tiny_bert, tmp_path_factory):
    spec = tiny_spec(tiny_bert, tmp_path_factory.mktemp("work"))
    return spec, run_export(spec)


def test_export_passes_gate_and_writes_the_contract(exported):
    spec, manifest = exported
    assert set(manifest.variants) == {"fp32", "fp16"}
    fp32 = manifest.variants["fp32"]
    assert fp32.parity.passed and fp32.parity.inputs >= 32
    assert fp32.parity.figures["min_cosine"] >= 0.99999 and fp32.parity.figures["max_abs_diff"] <= 1e-3
    assert manifest.variants["fp16"].parity.passed
    # the manifest on disk is the contract: names, dtypes, named dynamic axes, hashes, versions
    on_disk = json.loads((spec.export_dir / "manifest.json").read_text())
    assert [i["name"] for i in on_disk["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert on_disk["outputs"][0] == {"name": "last_hidden_state", "dtype": "float32", "shape": ["batch", "sequence", 32]}
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(on_disk["tools"])
    assert len(fp32.sha256) == 64 and (spec.export_dir / fp32.file).is_file()
    graph = onnx.load(str(spec.export_dir / fp32.file)).graph
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert all(dims) and len(dims) == 2, f"batch and sequence must be named dynamic axes, got {dims}"


def test_exported_graph_handles_batch_and_length_it_was_not_traced_with(exported):
    spec, manifest = exported
    run = ort_runner(spec.export_dir / manifest.variants["fp32"].file)
    ids = np.random.default_rng(0).integers(5, 40, size=(7, 61))
    out = run({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    assert out.shape == (7, 61, 32)


def test_corrupted_graph_fails_the_gate_with_figures(exported, tmp_path):
    spec, manifest = exported
    model = onnx.load(str(spec.export_dir / manifest.variants["fp32"].file))
    big = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    w = numpy_helper.to_array(big).copy()
    w += np.random.default_rng(1).normal(0, 0.05, size=w.shape).astype(w.dtype)  # a perturbed weight
    big.CopyFrom(numpy_helper.from_array(w, big.name))
    bad = tmp_path / "corrupt.onnx"
    onnx.save(model, str(bad))

    loaded = load_encoder(spec, checkpoint_dir(spec))
    batches = parity_batches(spec, loaded)
    report = gate(spec, Precision.fp32, compare(spec, batches, ort_runner(bad)), sum(len(b.reference) for b in batches))
    assert not report.passed
    assert any("max_abs_diff" in f for f in report.failures), report.failures
    assert report.figures["max_abs_diff"] > 1e-3


def test_failed_gate_stops_the_pipeline_and_nothing_downstream_uses_it(tiny_bert, tmp_path, monkeypatch):
    real = variants.optimize_fp32

    def corrupting(src, dst, model_type):
        stats = real(src, dst, model_type)
        model = onnx.load(str(dst))
        emb = next(t for t in model.graph.initializer if list(t.dims) == [len(open(tiny_bert / "vocab.txt").read().split()), 32])
        emb.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(emb) * 1.5, emb.name))
        onnx.save(model, str(dst))
        return stats

    monkeypatch.setattr(variants, "optimize_fp32", corrupting)
    spec = tiny_spec(tiny_bert, tmp_path)
    with pytest.raises(ParityError, match="fp32"):
        run_export(spec)
    manifest = ExportManifest.read(spec.export_dir)
    assert not manifest.variants["fp32"].parity.passed
    assert "fp16" not in manifest.variants  # nothing is built on a failed fp32
    with pytest.raises(LookupError, match="failed its parity gate"):
        write_repository(spec, manifest)


def test_int8_variant_is_gated_and_reports_figures(tiny_bert, tmp_path):
    """Served int8 must pass its gate (run_export raises ParityError otherwise): the tiny
    BERT's U8U8 int8 graph keeps cosine ~0.99997, far above the gate's 0.99 / 0.98."""
    spec = tiny_spec(tiny_bert, tmp_path, precisions=["fp32", "int8"], serve_precision="int8")
    manifest = run_export(spec)
    v = manifest.variants["int8"]
    assert v.parity.passed and v.usable, v.parity.failures
    assert ExportManifest.read(spec.export_dir).variants["int8"].parity == v.parity  # what the writer reads
    assert set(v.parity.thresholds) == {"mean_cosine", "min_cosine", "saturating_int8_matmuls"}
    assert v.parity.figures["min_cosine"] >= spec.parity.int8_min_cosine
    assert v.parity.figures["mean_cosine"] >= spec.parity.int8_mean_cosine
    assert v.parity.figures["saturating_int8_matmuls"] == 0  # U8U8: the same numbers on every x86 CPU
    assert v.bytes < manifest.variants["fp32"].bytes
    assert "MatMuls kept fp32" in v.notes


def test_classifier_exports_logits_with_labels(tiny_classifier, tmp_path):
    spec = tiny_spec(tiny_classifier, tmp_path, task="text-classification")
    manifest = run_export(spec)
    assert manifest.labels == ["negative", "neutral", "positive"]
    assert manifest.outputs[0].name == "logits" and manifest.outputs[0].shape == ["batch", 3]
    assert manifest.variants["fp32"].parity.figures["label_agreement"] == 1.0


def test_an_unserved_variant_that_misses_its_gate_is_reported_not_fatal(tiny_bert, tmp_path):
    """int8 held to an impossible gate: the export still succeeds when fp32 is served, the
    miss is in the manifest, the writer refuses int8; --strict and serving int8 both fail."""
    impossible = {"int8_mean_cosine": 1.0, "int8_min_cosine": 1.0}
    spec = tiny_spec(tiny_bert, tmp_path / "a", precisions=["fp32", "int8"], serve_precision="fp32", parity=impossible)
    manifest = run_export(spec)
    assert manifest.variants["fp32"].usable and not manifest.variants["int8"].usable
    assert any("mean_cosine" in f for f in manifest.variants["int8"].parity.failures)
    write_repository(spec, manifest)  # fp32: fine
    with pytest.raises(LookupError, match="failed its parity gate"):
        write_repository(spec.with_precision("int8"), manifest)
    with pytest.raises(ParityError, match="int8"):
        run_export(spec, strict=True)
    served_int8 = tiny_spec(tiny_bert, tmp_path / "b", precisions=["fp32", "int8"], serve_precision="int8", parity=impossible)
    with pytest.raises(ParityError, match="int8, the served variant"):
        run_export(served_int8)


def test_auto_serves_the_fastest_variant_that_passed_and_is_batch_invariant(tiny_bert, tmp_path):
    spec = tiny_spec(tiny_bert, tmp_path, precisions=["fp32", "int8", "fp16"], serve_precision="auto")
    manifest = run_export(spec)
    sel = manifest.selection
    assert sel is not None and sel.metric == "batch-8 sentences/s"
    assert sel.precision in sel.eligible and sel.values[sel.precision] == max(sel.values.values())
    for name in sel.eligible:  # what was eligible passed both checks, with figures recorded
        v = manifest.variants[name]
        assert v.usable and v.batch_invariance["invariant"] and v.speed["batch-8 sentences/s"] > 0
    # dynamic int8 quantizes activations with one scale per batch: co-batched inputs change it
    int8 = manifest.variants["int8"]
    if int8.usable:
        assert int8.batch_invariance["invariant"] is False and "int8" in sel.excluded
    assert "fp16" in sel.excluded  # a GPU variant, not timed on CPU
    assert sel.machine["cores"] >= 1 and "flags" in sel.machine
    repo = write_repository(spec, manifest)
    card = RepositoryCard.read(repo)
    assert card.precision == sel.precision
    assert card.selection["metric"] == sel.metric and card.selection["reason"].startswith(sel.precision)
