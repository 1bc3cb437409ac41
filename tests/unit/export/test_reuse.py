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


def test_a_chat_export_in_another_graph_form_is_rebuilt():
    """generation.graph: auto asks for the fused graph of a Llama; an export of the older
    KV-concat graph (no kv_layout) is stale, a fused one is reused, and kv-concat asks back."""
    spec = load_spec("smollm2")
    fused = {"kv_layout": "slots", "max_context": spec.generation.max_context}
    common = dict(task="text-generation", architecture="LlamaForCausalLM", max_length=spec.generation.max_context)
    assert stale_reasons(spec, _manifest(spec, decoder=fused, **common)) == []
    older = stale_reasons(spec, _manifest(spec, decoder={}, **common))
    assert older == ["generation.graph: spec 'slots', export 'concat'"]
    pinned = spec.model_copy(update={"generation": spec.generation.model_copy(update={"graph": "kv-concat"})})
    assert stale_reasons(pinned, _manifest(pinned, decoder={}, **common)) == []
    other = stale_reasons(spec, _manifest(spec, decoder={}, **{**common, "architecture": "GPT2LMHeadModel"}))
    assert other == []  # an architecture the fused graph does not cover keeps the exported graph
