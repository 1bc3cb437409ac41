"""export.parity: the encoder gate's thresholds per precision, and the caption that shows them."""

import math

from export.parity import gate, gates_caption
from kiln_core.manifest import ExportManifest, TensorSpec, Variant
from kiln_core.spec import Precision
from kiln_testkit import tiny_spec

GOOD = {"min_cosine": 0.999995, "mean_cosine": 0.999999, "max_abs_diff": 2e-4}


def _variant(precision: str, report) -> Variant:
    return Variant(precision=precision, file=f"model.{precision}.onnx", sha256="0" * 64, bytes=1, parity=report)


def test_each_precision_is_held_to_its_own_thresholds(tmp_path):
    spec = tiny_spec(tmp_path, tmp_path)
    limits = {p: [str(t) for t in gate(spec, p, GOOD, 32).limits] for p in Precision if p is not Precision.int4}
    assert limits == {
        Precision.fp32: ["min_cosine >= 0.99999", "max_abs_diff <= 0.001"],
        Precision.fp16: ["min_cosine >= 0.999"],
        Precision.int8: ["mean_cosine >= 0.99", "min_cosine >= 0.98"],
    }
    assert all(gate(spec, p, GOOD, 32).passed for p in limits)


def test_a_miss_names_the_figure_and_too_few_inputs_fail_too(tmp_path):
    spec = tiny_spec(tmp_path, tmp_path)
    report = gate(spec, Precision.fp32, {**GOOD, "max_abs_diff": 0.25, "min_cosine": math.nan}, 10)
    assert not report.passed
    assert report.failures == [
        "min_cosine = nan, needs >= 0.99999 (not a number)",
        "max_abs_diff = 0.25, needs <= 0.001 (off by 0.249)",
        "only 10 inputs, needs >= 32",
    ]


def test_the_caption_shows_each_variants_gates_the_way_they_point(tmp_path):
    spec = tiny_spec(tmp_path, tmp_path, precisions=["fp32", "int8"])
    manifest = ExportManifest(
        name="tiny", task="feature-extraction", architecture="BertModel", checkpoint="c", tokenizer_dir="tokenizer",
        max_length=64, hidden_size=32, pooling="mean", normalize=True, opset=18,
        inputs=[TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"])], outputs=[],
        variants={p.value: _variant(p.value, gate(spec, p, GOOD, 32)) for p in (Precision.fp32, Precision.int8)},
    )
    assert gates_caption(manifest) == (
        "gates: fp32: min_cosine >= 0.99999, max_abs_diff <= 0.001 | int8: mean_cosine >= 0.99, min_cosine >= 0.98"
    )
