"""export.selection: what serve_precision auto picks, and which misses stop the pipeline."""

import numpy as np

from export.selection import encoder_invariance, gate_failures, select
from kiln_core.manifest import ExportManifest, ParityReport, TensorSpec, Variant
from kiln_core.spec import parse_spec

METRIC = "one-stream decode tokens/s"


def _variant(name, passed=True, invariant=True, speed=None):
    report = ParityReport(reference="x", inputs=8, figures={}, thresholds={}, passed=passed,
                          failures=[] if passed else ["ppl_ratio = 3, needs <= 1.1"])
    return Variant(precision=name, file=f"{name}.onnx", sha256="0" * 64, bytes=1, parity=report,
                   batch_invariance=None if invariant is None else {"invariant": invariant},
                   speed={} if speed is None else {METRIC: speed})


def _manifest(**variants):
    return ExportManifest(name="lm", task="text-generation", architecture="Llama", checkpoint="c", tokenizer_dir="t",
                          max_length=64, hidden_size=8, pooling="none", normalize=False, opset=18,
                          inputs=[TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"])],
                          outputs=[], variants=variants)


def _spec(serve="auto"):
    return parse_spec({"name": "lm", "source": {"kind": "folder", "path": "/x"}, "task": "text-generation",
                       "precisions": ["fp32", "int8", "int4"], "serve_precision": serve})


def test_auto_picks_the_fastest_eligible_variant_and_says_why_others_were_not():
    m = _manifest(fp32=_variant("fp32", speed=30.0), int8=_variant("int8", invariant=False, speed=90.0),
                  int4=_variant("int4", speed=70.0))
    sel = select(_spec(), m)
    assert sel.precision == "int4" and sel.metric == METRIC
    assert sel.runners_up == ["fp32"] and sel.values == {"fp32": 30.0, "int4": 70.0}
    assert sel.excluded == {"int8": "not batch-invariant"}
    assert sel.reason().startswith("int4: fastest by one-stream decode tokens/s (70.0; runners-up: fp32 30.0)")


def test_a_variant_that_failed_its_gate_is_never_picked_however_fast():
    m = _manifest(fp32=_variant("fp32", speed=30.0), int4=_variant("int4", passed=False, speed=99.0))
    sel = select(_spec(), m)
    assert sel.precision == "fp32" and sel.excluded == {"int4": "failed its parity gate"}


def test_only_the_served_variants_miss_stops_the_pipeline_unless_strict():
    m = _manifest(fp32=_variant("fp32", speed=30.0), int8=_variant("int8", passed=False))
    m.selection = select(_spec(), m)
    assert gate_failures(_spec(), m) == []
    assert gate_failures(_spec("fp32"), m) == []
    assert gate_failures(_spec("int8"), m) == ["int8, the served variant (ppl_ratio = 3, needs <= 1.1)"]
    assert gate_failures(_spec("fp32"), m, strict=True) == ["int8 (ppl_ratio = 3, needs <= 1.1)"]


def test_auto_with_nothing_eligible_stops_the_pipeline():
    m = _manifest(fp32=_variant("fp32", passed=False))
    m.selection = select(_spec(), m)
    assert m.selection is None
    (failure,) = gate_failures(_spec(), m)
    assert "no variant passed" in failure and "fp32: failed its parity gate" in failure


def _encode(texts):
    width = max(len(t) for t in texts)
    ids = np.zeros((len(texts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, t in enumerate(texts):
        ids[i, : len(t)] = [ord(c) for c in t]
        mask[i, : len(t)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _mean(out, mask):
    return (out * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)


def test_an_encoder_whose_output_depends_on_its_batch_is_not_invariant():
    per_token = lambda f: f["input_ids"][..., None].astype(np.float32) * np.ones(4, np.float32)
    per_batch = lambda f: per_token(f) / np.float32(f["input_ids"].max())  # one scale for the whole batch
    texts = ["a", "hello", "zzz"]
    assert encoder_invariance(per_token, _encode, texts, _mean)["invariant"] is True
    verdict = encoder_invariance(per_batch, _encode, texts, _mean)
    assert verdict["invariant"] is False and verdict["max_abs_diff"] > 1e-6 and "co-batched" in verdict["detail"]
