"""export/lm_*: a tiny random Llama (and Qwen2 / Mistral built on its tokenizer) goes through
the real causal-LM export; the gate passes on a faithful KV-cache graph and stops a
corrupted one, and the manifest carries the tensor contract the generation engine reads."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export import lm_export, lm_parity
from export.parity import ParityError
from export.pipeline import run_export
from kiln_core.manifest import ExportManifest
from kiln_core.spec import Precision
from kiln_testkit import tiny_spec

FAST = {"max_context": 256, "parity_prompts": 8, "parity_new_tokens": 16, "parity_decode_steps": 8}


def _spec(checkpoint, workdir, precisions=("fp32", "int8"), **generation):
    return tiny_spec(checkpoint, workdir, task="text-generation", precisions=list(precisions), serve_precision="fp32",
                     generation={**FAST, **generation})


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    """The dynamo export (generation.graph: kv-concat), what architectures the fused graph does
    not cover get."""
    spec = _spec(tiny_llama, tmp_path_factory.mktemp("work"), precisions=("fp32", "int8", "int4"), graph="kv-concat")
    return spec, run_export(spec)


@pytest.fixture(scope="module")
def fused(tiny_llama, tmp_path_factory):
    """The default for a Llama: the fused graph (export/lm_graph.py)."""
    spec = _spec(tiny_llama, tmp_path_factory.mktemp("fused"), precisions=("fp32", "int8", "int4"))
    return spec, run_export(spec)


def test_the_fused_graph_is_gated_and_recorded_like_the_exported_one(fused):
    spec, manifest = fused
    assert manifest.decoder["kv_layout"] == "slots" and spec.generation.graph == "auto"
    names = ["input_ids", "seqlens_k", "total_sequence_length"] + [
        f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [t.name for t in manifest.inputs] == names
    assert manifest.inputs[3].shape == ["batch", 2, 256, 16]  # one row per sequence, the whole context
    assert manifest.outputs[0].shape == ["batch", 1, manifest.decoder["vocab_size"]]  # the last position only
    fp32 = manifest.variants["fp32"]
    assert fp32.parity.passed and "GroupQueryAttention" in fp32.notes
    f = fp32.parity.figures
    assert f["prefill_max_abs_diff"] < 1e-4 and f["decode_max_abs_diff"] < 1e-4
    assert f["greedy_identical"] == 8 and abs(f["ppl_ratio_vs_torch"] - 1) < 1e-4
    int4 = manifest.variants["int4"]
    assert int4.parity.passed and "ppl_ratio" in int4.parity.figures and "MatMulNBits" in int4.notes
    graph = onnx.load(str(spec.export_dir / int4.file)).graph
    ops = {n.op_type for n in graph.node}
    assert {"GroupQueryAttention", "MatMulNBits", "SkipSimplifiedLayerNormalization"} <= ops
    # attention, its softmax and its cache live inside GroupQueryAttention: no concat of a cache
    assert "Softmax" not in ops and not [n for n in graph.node if n.op_type == "Concat" and "present" in n.output[0]]
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.node) == 2
    assert "int8" in manifest.variants  # dynamic int8 reads the fused graph too
    for name, v in manifest.variants.items():  # every variant's graph has the manifest's names and axes
        if v.parity.passed:
            assert v.batch_invariance is not None and v.speed["one-stream decode tokens/s"] > 0, name
        g = onnx.load(str(spec.export_dir / v.file)).graph
        assert [x.name for x in g.input] == names
        for x, t in zip(g.input, manifest.inputs):
            assert [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim] == t.shape


def test_a_corrupted_fused_graph_fails_its_gate(fused, tmp_path):
    spec, manifest = fused
    model, tokenizer, _ = lm_export.load_causal_lm(spec)
    ref = lm_parity.build_reference(spec, model, tokenizer, manifest.decoder["eos_token_ids"])
    bad = _corrupt(spec.export_dir / "model.fp32.onnx", tmp_path / "corrupt.onnx")
    lm = lm_parity.open_lm(bad, lm_export.DecoderShape.of(model.config), manifest.decoder)
    assert isinstance(lm, lm_parity.FusedLM)
    figures, _, _ = lm_parity.fp32_figures(ref, lm)
    report = lm_parity.gate_lm(spec, Precision.fp32, figures, len(ref.prompts))
    assert not report.passed and figures["prefill_max_abs_diff"] > 1e-3


def test_fp32_gate_passes_with_its_figures_recorded(exported):
    spec, manifest = exported
    report = manifest.variants["fp32"].parity
    assert report.passed, report.failures
    f = report.figures
    assert f["prefill_max_abs_diff"] <= 1e-4 and f["decode_max_abs_diff"] <= 1e-4
    assert f["greedy_identical"] == f["greedy_prompts"] == 8 and f["greedy_first_divergence"] == -1
    assert f["ppl_ratio_vs_torch"] == pytest.approx(1.0, abs=1e-4)
    assert report.thresholds == {"prefill_max_abs_diff": 1e-3, "decode_max_abs_diff": 1e-3, "greedy_identical": 8}
    on_disk = ExportManifest.read(spec.export_dir)  # what downstream reads is what was measured
    assert on_disk.variants["fp32"].parity == report


def test_int8_reports_perplexity_and_agreement_against_fp32(exported):
    spec, manifest = exported
    int8 = manifest.variants["int8"]
    f = int8.parity.figures
    assert f["ppl_fp32"] == pytest.approx(manifest.variants["fp32"].parity.figures["ppl"])
    assert f["ppl_ratio"] == pytest.approx(f["ppl"] / f["ppl_fp32"])
    assert 0.0 <= f["greedy_agreement"] <= 1.0 and f["greedy_prompts"] == 8
    assert int8.parity.thresholds == {"ppl_ratio": 1.10, "saturating_int8_matmuls": 0.0} and int8.parity.passed
    assert int8.parity.figures["saturating_int8_matmuls"] == 0  # U8U8: no int16 saturation on any x86 CPU
    assert int8.bytes < manifest.variants["fp32"].bytes
    assert "2 FFN down-projections kept fp32" in int8.notes  # one per layer: their inputs carry outliers
    graph = onnx.load(str(spec.export_dir / int8.file)).graph
    ops = {n.op_type for n in graph.node}
    assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops


def test_int4_packs_weights_in_4_bit_blocks_and_is_gated_on_perplexity(exported):
    spec, manifest = exported
    int4 = manifest.variants["int4"]
    assert int4.parity.thresholds == {"ppl_ratio": 1.10, "saturating_int8_matmuls": 0.0} and "ppl_ratio" in int4.parity.figures
    nodes = [n for n in onnx.load(str(spec.export_dir / int4.file)).graph.node if n.op_type == "MatMulNBits"]
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in nodes)
    # random weights are on no grid: onnxruntime's 4-bit quantizer for q, k, v, o, gate, up, down
    # of both layers; the lm_head (the tied embedding, untied) gets 8-bit codes
    assert bits == [4] * (2 * 7) + [8]


def test_manifest_carries_the_fixed_tensor_names_and_decoder_fields(exported):
    spec, manifest = exported
    on_disk = json.loads((spec.export_dir / "manifest.json").read_text())
    assert on_disk["task"] == "text-generation" and on_disk["architecture"] == "LlamaForCausalLM"
    assert on_disk["max_length"] == 256 and on_disk["pooling"] == "none" and on_disk["normalize"] is False
    names = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")
    ]
    assert [t["name"] for t in on_disk["inputs"]] == names
    assert on_disk["inputs"][1] == {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total"]}
    assert on_disk["inputs"][3] == {"name": "past_key_values.0.key", "dtype": "float32", "shape": ["batch", 2, "past", 16]}
    assert [t["name"] for t in on_disk["outputs"]] == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert on_disk["outputs"][4]["shape"] == ["batch", 2, "total", 16]
    # the tiny tokenizer's specials: <|endoftext|> = 0 (pad), <|im_start|> = 1 (bos), <|im_end|> = 2 (eos)
    assert on_disk["decoder"] == {
        "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "vocab_size": on_disk["outputs"][0]["shape"][2],
        "eos_token_ids": [2], "bos_token_id": 1, "max_context": 256, "has_chat_template": True,
    }
    # every variant's graph has exactly the manifest's names and axis names
    for v in manifest.variants.values():
        graph = onnx.load(str(spec.export_dir / v.file)).graph
        for values, specs in ((graph.input, manifest.inputs), (graph.output, manifest.outputs)):
            assert [x.name for x in values] == [t.name for t in specs]
            for x, t in zip(values, specs):
                assert [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim] == t.shape
    assert "chat_template" in (spec.export_dir / "tokenizer" / "tokenizer_config.json").read_text() or (
        spec.export_dir / "tokenizer" / "chat_template.jinja"
    ).is_file()


def test_prefill_then_cached_decode_equals_one_long_prefill(exported):
    """The contract the engine relies on: presents fed back as past give the logits a full
    recomputation gives, for a batch size and lengths the graph was not traced with."""
    spec, manifest = exported
    shape = lm_export.DecoderShape(2, 2, 16, manifest.decoder["vocab_size"])
    lm = lm_parity.OrtLM(spec.export_dir / "model.fp32.onnx", shape)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 300, size=n).tolist() for n in (11, 4, 7, 9, 5)]
    full = lm_parity.left_pad(seqs, 0)
    want, _ = lm.step(full, lm.empty_past(5))
    head = lm_parity.left_pad([s[:-2] for s in seqs], 0)  # all but the last two tokens, then two decode steps
    logits, past = lm.step(head, lm.empty_past(5))
    assert past[0].shape == (5, 2, 9, 16)
    for k in (2, 1):
        feeds = {
            "input_ids": np.array([[s[-k]] for s in seqs]),
            "attention_mask": np.concatenate([head["attention_mask"], np.ones((5, 3 - k), np.int64)], axis=1),
            "position_ids": np.array([[len(s) - k] for s in seqs]),
        }
        logits, past = lm.step(feeds, past)
    np.testing.assert_allclose(logits[:, -1], want[:, -1], atol=1e-5)
    assert past[-1].shape == (5, 2, 11, 16)


def _corrupt(path, out):
    model = onnx.load(str(path))
    big = max((t for t in model.graph.initializer if len(t.dims) == 2), key=lambda t: np.prod(t.dims))
    w = numpy_helper.to_array(big).copy()
    w += np.random.default_rng(1).normal(0, 0.05, size=w.shape).astype(w.dtype)  # a perturbed weight
    big.CopyFrom(numpy_helper.from_array(w, big.name))
    onnx.save(model, str(out))
    return out


def test_corrupted_graph_fails_the_gate_with_figures(exported, tmp_path):
    spec, manifest = exported
    model, tokenizer, _ = lm_export.load_causal_lm(spec)
    ref = lm_parity.build_reference(spec, model, tokenizer, manifest.decoder["eos_token_ids"])
    bad = _corrupt(spec.export_dir / "model.fp32.onnx", tmp_path / "corrupt.onnx")
    figures, _, _ = lm_parity.fp32_figures(ref, lm_parity.OrtLM(bad, lm_export.DecoderShape.of(model.config)))
    report = lm_parity.gate_lm(spec, Precision.fp32, figures, len(ref.prompts))
    assert not report.passed
    assert any(f.startswith("prefill_max_abs_diff") for f in report.failures), report.failures
    assert figures["prefill_max_abs_diff"] > 1e-3


def test_failed_gate_stops_the_pipeline_and_marks_fp32_unusable(tiny_llama, tmp_path, monkeypatch):
    real = lm_export.export_lm

    def corrupting(model, out_path, opset):
        real(model, out_path, opset)
        return _corrupt(out_path, out_path)

    monkeypatch.setattr(lm_export, "export_lm", corrupting)
    spec = _spec(tiny_llama, tmp_path, parity_prompts=2, parity_decode_steps=2, graph="kv-concat")
    with pytest.raises(ParityError, match="fp32.*prefill_max_abs_diff"):
        run_export(spec)
    manifest = ExportManifest.read(spec.export_dir)
    assert not manifest.variants["fp32"].parity.passed and "int8" not in manifest.variants
    with pytest.raises(LookupError, match="failed its parity gate"):
        manifest.usable_variant("fp32")


def _tiny_variant(tiny_llama, folder, family):
    """The tiny Llama's tokenizer with a random Qwen2 (q/k/v bias) or Mistral (sliding window) model."""
    from transformers import (
        AutoConfig,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    shutil.copytree(tiny_llama, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    base = AutoConfig.from_pretrained(tiny_llama).to_dict()
    keep = {k: base[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "max_position_embeddings", "eos_token_id", "bos_token_id", "pad_token_id")}
    if family == "qwen2":
        cfg, cls = Qwen2Config(**keep, tie_word_embeddings=True), Qwen2ForCausalLM
    else:  # a window shorter than the parity prompts, so the mask has to apply it
        cfg, cls = MistralConfig(**keep, sliding_window=24, tie_word_embeddings=False), MistralForCausalLM
    torch.manual_seed(1)
    model = cls(cfg).eval()
    if family == "qwen2":
        with torch.no_grad():  # random init leaves biases at zero: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_decoder_families_export_with_parity(family, tiny_llama, tmp_path):
    spec = _spec(_tiny_variant(tiny_llama, tmp_path / family, family), tmp_path, precisions=["fp32"],
                 parity_prompts=3, parity_new_tokens=8)
    model, tokenizer, _ = lm_export.load_causal_lm(spec)
    path = lm_export.export_lm(model, tmp_path / "model.onnx", spec.opset)
    ref = lm_parity.build_reference(spec, model, tokenizer, lm_export.eos_token_ids(model, tokenizer))
    if family == "mistral":
        assert ref.batch["input_ids"].shape[1] > 24, "the prompts must outgrow the sliding window"
    figures, _, _ = lm_parity.fp32_figures(ref, lm_parity.OrtLM(path, lm_export.DecoderShape.of(model.config)))
    report = lm_parity.gate_lm(spec, Precision.fp32, figures, len(ref.prompts))
    assert report.passed, report.failures


def test_every_passing_variant_records_batch_invariance_and_decode_speed(exported):
    """What serve_precision auto reads: measured at export on this machine, per variant."""
    _, manifest = exported
    assert manifest.variants["fp32"].batch_invariance["invariant"] is True  # fp32: alone == co-batched
    for name, v in manifest.variants.items():
        if v.usable:
            assert v.batch_invariance["prompts"] == 4 and v.batch_invariance["steps"] == 24, name
            assert v.speed["one-stream decode tokens/s"] > 0, name
    assert manifest.selection is None  # a fixed serve_precision: nothing picked
