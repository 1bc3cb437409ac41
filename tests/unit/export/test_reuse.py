"""kiln.cli helpers that need no server."""

from export.reuse import stale_reasons
from kiln_core.manifest import EXPORT_FORMAT, ExportManifest, TensorSpec, Variant
from kiln_core.sources import checkpoint_dir
from kiln_core.spec import load_spec


def _manifest(spec, **kw):
    base = dict(
        export_format=EXPORT_FORMAT, name=spec.name, task=spec.task.value, architecture="BertModel", checkpoint=str(checkpoint_dir(spec)),
        tokenizer_dir="tokenizer", max_length=spec.max_length, hidden_size=384, pooling=spec.pooling.value,
        normalize=spec.normalize, opset=spec.opset,
        inputs=[TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"])],
        outputs=[TensorSpec(name="last_hidden_state", dtype="float32", shape=["batch", "sequence", 384])],
        variants={p.value: Variant(precision=p.value, file="f", sha256="0" * 64, bytes=1) for p in spec.precisions},
    )
    base.update(kw)
    return ExportManifest(**base)


def test_matching_export_is_reused():
    spec = load_spec("minilm")
    assert stale_reasons(spec, _manifest(spec)) == []


def test_changed_spec_makes_the_export_stale():
    spec = load_spec("minilm")
    reasons = stale_reasons(spec, _manifest(spec, max_length=128, pooling="cls", variants={}))
    assert any(r.startswith("max_length: spec 256, export 128") for r in reasons)
    assert any(r.startswith("pooling") for r in reasons)
    assert any("not built" in r for r in reasons)


def test_an_export_in_an_older_format_is_rebuilt_not_reused():
    spec = load_spec("minilm")
    reasons = stale_reasons(spec, _manifest(spec, export_format=1))
    assert reasons == [f"export format 1, this kiln writes {EXPORT_FORMAT}"]
