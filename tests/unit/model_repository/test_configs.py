"""model_repository.configs: generated configs parse through Triton's ModelConfig schema,
carry the spec's batching/queue/instances, and bad ensemble wiring fails before serving."""

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

import kiln_runtime
from kiln_core.card import RepositoryCard
from kiln_core.manifest import ExportManifest, TensorSpec
from kiln_core.spec import parse_spec
from model_repository import configs


def _manifest(task="feature-extraction", labels=None):
    inputs = [TensorSpec(name=n, dtype="int64", shape=["batch", "sequence"]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    if task == "text-classification":
        outputs = [TensorSpec(name="logits", dtype="float32", shape=["batch", len(labels)])]
    else:
        outputs = [TensorSpec(name="last_hidden_state", dtype="float32", shape=["batch", "sequence", 384])]
    return ExportManifest(
        name="enc", task=task, architecture="BertModel", checkpoint="/x", tokenizer_dir="tokenizer",
        max_length=128, hidden_size=384, pooling="mean", normalize=True, labels=labels, opset=18,
        inputs=inputs, outputs=outputs,
    )


def _spec(**kw):
    return parse_spec({"name": "enc", "source": {"kind": "package", "package": "x"}, **kw})


def _all(spec, man):
    names = configs.Names(spec.name)
    steps = [configs.tokenizer_config(spec, man, names), configs.encoder_config(spec, man, names, "model.onnx"), configs.postprocess_config(spec, man, names)]
    return names, steps, configs.ensemble_config(spec, names, steps)


def test_every_config_round_trips_through_triton_schema():
    spec, man = _spec(), _manifest()
    _, steps, ens = _all(spec, man)
    for cfg in steps + [ens]:
        text = configs.to_pbtxt(cfg)
        assert configs.parse_pbtxt(text) == cfg
    configs.validate_ensemble(ens, {m.name: m for m in steps})


def test_encoder_config_carries_batching_queue_instances_and_ragged_inputs():
    spec = _spec(batching={"max_batch_size": 32, "preferred_batch_sizes": [4, 16], "max_queue_delay_us": 500, "max_queue_size": 7},
                 instances={"encoder": 3, "intra_op_threads": 2, "allow_spinning": False})
    enc = configs.encoder_config(spec, _manifest(), configs.Names("enc"), "model.onnx")
    assert enc.backend == "python" and enc.max_batch_size == 32
    assert list(enc.dynamic_batching.preferred_batch_size) == [4, 16]
    assert enc.dynamic_batching.max_queue_delay_microseconds == 500
    q = enc.dynamic_batching.default_queue_policy
    assert q.max_queue_size == 7 and q.timeout_action == mc.ModelQueuePolicy.REJECT
    assert enc.instance_group[0].count == 3 and enc.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert [i.name for i in enc.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(i.allow_ragged_batch and list(i.dims) == [-1] and i.data_type == mc.TYPE_INT64 for i in enc.input)
    assert list(enc.output[0].dims) == [-1, 384]
    assert enc.parameters["intra_op_threads"].string_value == "2"
    assert enc.parameters["allow_spinning"].string_value == "0"
    tok = configs.tokenizer_config(spec, _manifest(), configs.Names("enc"))
    assert tok.dynamic_batching.max_queue_delay_microseconds == 0  # no added latency off the encoder
    assert tok.dynamic_batching.default_queue_policy.max_queue_size == 7


def test_container_runtimes_use_triton_platforms():
    for runtime, platform in (("onnxruntime_onnx", "onnxruntime_onnx"), ("tensorrt_plan", "tensorrt_plan")):
        spec = _spec(runtime=runtime, instances={"kind": "gpu"}, precisions=["fp32", "fp16"], serve_precision="fp16")
        enc = configs.encoder_config(spec, _manifest(), configs.Names("enc"), "model.plan")
        assert enc.platform == platform and not enc.backend
        assert enc.default_model_filename == "model.plan"
        assert enc.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert not any(i.allow_ragged_batch for i in enc.input)  # native backends batch equal shapes


def test_ensemble_is_the_public_model_text_in_embedding_out():
    spec = _spec()
    names, steps, ens = _all(spec, _manifest())
    assert ens.name == "enc" and ens.platform == "ensemble"
    assert [(i.name, i.data_type, list(i.dims)) for i in ens.input] == [("text", mc.TYPE_STRING, [1])]
    assert [(o.name, list(o.dims)) for o in ens.output] == [("embedding", [384])]
    assert [s.model_name for s in ens.ensemble_scheduling.step] == [names.tokenizer, names.encoder, names.postprocess]


def test_classification_ensemble_outputs_label_and_scores():
    spec = _spec(task="text-classification")
    _, steps, ens = _all(spec, _manifest("text-classification", ["neg", "pos"]))
    assert [(o.name, o.data_type, list(o.dims)) for o in ens.output] == [("label", mc.TYPE_STRING, [1]), ("scores", mc.TYPE_FP32, [2])]
    assert steps[2].parameters["labels"].string_value == "neg\npos"
    configs.validate_ensemble(ens, {m.name: m for m in steps})


def test_bad_wiring_is_caught_before_serving():
    spec = _spec()
    _, steps, ens = _all(spec, _manifest())
    members = {m.name: m for m in steps}
    broken = mc.ModelConfig()
    broken.CopyFrom(ens)
    broken.ensemble_scheduling.step[1].input_map["input_ids"] = "token_ids"  # nothing produces it
    with pytest.raises(configs.ConfigError, match="nothing upstream produces"):
        configs.validate_ensemble(broken, members)
    typed = {k: mc.ModelConfig() for k in members}
    for k in typed:
        typed[k].CopyFrom(members[k])
    typed["enc_encoder"].input[0].data_type = mc.TYPE_INT32
    with pytest.raises(configs.ConfigError, match="type TYPE_INT32"):
        configs.validate_ensemble(ens, typed)
    with pytest.raises(configs.ConfigError, match="unknown model"):
        configs.validate_ensemble(ens, {k: v for k, v in members.items() if k != "enc_postprocess"})


def test_generation_config_uses_trtllm_names_and_is_decoupled():
    spec = parse_spec({"name": "chat", "source": {"kind": "gguf", "package": "x", "file": "m.gguf"},
                       "task": "text-generation", "precisions": ["fp32"], "serve_precision": "fp32"})
    man = _manifest().model_copy(update={"task": "text-generation", "decoder": {"num_layers": 2, "max_context": 256}})
    cfg = configs.generation_config(spec, man, "model.onnx")
    assert configs.parse_pbtxt(configs.to_pbtxt(cfg)) == cfg
    assert cfg.model_transaction_policy.decoupled and cfg.max_batch_size == 0
    names = {i.name: i for i in cfg.input}
    assert {"text_input", "max_tokens", "temperature", "top_p", "top_k", "random_seed", "repetition_penalty",
            "presence_penalty", "frequency_penalty", "stop_words", "stream", "messages", "health"} == set(names)
    assert all(i.optional for i in cfg.input)
    assert names["random_seed"].data_type == mc.TYPE_UINT64 and names["stop_words"].dims == [-1]
    for name in ("presence_penalty", "frequency_penalty"):
        assert (names[name].data_type, list(names[name].dims)) == (mc.TYPE_FP32, [1])
    assert cfg.parameters["max_queue"].string_value == "64"  # the spec's default
    assert [o.name for o in cfg.output] == ["text_output", "finish_reason", "prompt_tokens", "completion_tokens"]
    assert '"num_layers": 2' in cfg.parameters["decoder"].string_value


def test_generation_config_carries_the_queue_bound():
    from kiln_core.spec import SpecError

    base = {"name": "chat", "source": {"kind": "gguf", "package": "x", "file": "m.gguf"}, "task": "text-generation",
            "precisions": ["fp32"], "serve_precision": "fp32"}
    man = _manifest().model_copy(update={"task": "text-generation", "decoder": {"num_layers": 2, "max_context": 256}})
    spec = parse_spec({**base, "generation": {"max_concurrent": 4, "max_queue": 5}})
    cfg = configs.generation_config(spec, man, "model.onnx")
    assert (cfg.parameters["max_concurrent"].string_value, cfg.parameters["max_queue"].string_value) == ("4", "5")
    with pytest.raises(SpecError, match="max_queue"):
        parse_spec({**base, "generation": {"max_queue": 0}})


def test_text_generation_needs_the_python_runtime():
    from kiln_core.spec import SpecError

    with pytest.raises(SpecError, match="python-ort"):
        parse_spec({"name": "chat", "source": {"kind": "gguf", "file": "m.gguf"}, "task": "text-generation",
                    "runtime": "onnxruntime_onnx", "precisions": ["fp32"], "serve_precision": "fp32"})


# ----------------------------------------------------------------------------- serving: fused
def test_fused_config_is_the_public_model_with_the_ensembles_tensors():
    for task, labels in (("feature-extraction", None), ("text-classification", ["neg", "pos"])):
        spec = _spec(task=task, serving="fused", instances={"encoder": 2, "intra_op_threads": 2, "allow_spinning": False},
                     batching={"max_batch_size": 32, "preferred_batch_sizes": [8], "max_queue_delay_us": 700, "max_queue_size": 9})
        man = _manifest(task, labels)
        fused = configs.fused_config(spec, man, configs.Names("enc"), "model.onnx")
        assert configs.parse_pbtxt(configs.to_pbtxt(fused)) == fused
        _, steps, ens = _all(spec, man)
        assert fused.name == ens.name == "enc" and fused.backend == "python" and not fused.platform
        assert list(fused.input) == list(ens.input) and list(fused.output) == list(ens.output)  # clients see no difference
        assert fused.max_batch_size == 32
        assert fused.dynamic_batching == steps[1].dynamic_batching  # batches like the encoder did
        assert fused.instance_group == steps[1].instance_group
        p = {k: v.string_value for k, v in fused.parameters.items()}
        assert p["tokenizer_file"] == configs.TOKENIZER_FILE and p["onnx_file"] == "model.onnx"
        assert p["input_names"] == "input_ids,attention_mask,token_type_ids" and p["hidden_output"] == man.outputs[0].name
        assert (p["intra_op_threads"], p["allow_spinning"], p["task"]) == ("2", "0", task)
        if labels:
            assert p["labels"] == "neg\npos"
        else:
            assert (p["pooling"], p["normalize"]) == ("mean", "1")


def test_fused_needs_python_ort_and_tokenizer_inputs():
    spec = _spec(serving="fused", runtime="onnxruntime_onnx")
    with pytest.raises(configs.ConfigError, match="needs runtime: python-ort"):
        configs.fused_config(spec, _manifest(), configs.Names("enc"), "model.onnx")
    man = _manifest()
    man = man.model_copy(update={"inputs": man.inputs + [TensorSpec(name="pixel_values", dtype="float32", shape=["batch", 3])]})
    with pytest.raises(configs.ConfigError, match=r"\['pixel_values'\] cannot be produced"):
        configs.fused_config(_spec(serving="fused"), man, configs.Names("enc"), "model.onnx")


def _written(tmp_path, serving, invariance=None, **kw):

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kiln.gateway.config import read_models
    from kiln_core.manifest import ParityReport, Variant, sha256
    from model_repository.writer import write_repository

    spec = parse_spec({"name": "enc", "source": {"kind": "folder", "path": str(tmp_path)}, "precisions": ["fp32"],
                       "serve_precision": "fp32", "serving": serving, "workdir": str(tmp_path / "build"), **kw})
    export = spec.export_dir
    (export / "tokenizer").mkdir(parents=True)
    (export / "tokenizer" / "tokenizer.json").write_text("{}\n")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["last_hidden_state"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", 384])],
        [numpy_helper.from_array(np.zeros((4, 384), np.float32), "emb")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), export / "model.fp32.onnx")
    man = _manifest().model_copy(update={"inputs": _manifest().inputs[:2], "variants": {"fp32": Variant(
        precision="fp32", file="model.fp32.onnx", sha256=sha256(export / "model.fp32.onnx"), bytes=1,
        parity=ParityReport(reference="test", inputs=32, figures={}, thresholds={}, passed=True),
        batch_invariance=invariance)}})
    repo = write_repository(spec, man)
    return repo, RepositoryCard.read(repo), read_models([repo])["enc"]


def test_fused_repository_is_one_model_carrying_graph_code_and_the_gateways_tokenizer(tmp_path):
    repo, card, served = _written(tmp_path, "fused")
    assert sorted(p.name for p in repo.iterdir()) == ["enc", "kiln.json"]
    files = {p.relative_to(repo / "enc").as_posix() for p in (repo / "enc").rglob("*") if p.is_file()}
    runtime = {f for f in files if f.startswith("1/kiln_runtime/")}
    assert files - runtime == {"config.pbtxt", "1/model.py", "1/model.onnx", "1/tokenizer/tokenizer.json"}
    package = Path(kiln_runtime.__file__).parent  # the whole served runtime, copied as it is
    assert runtime == {f"1/kiln_runtime/{f.relative_to(package).as_posix()}" for f in package.rglob("*.py")}
    assert "FusedEncoder" in (repo / "enc" / "1" / "model.py").read_text()
    cfg = configs.parse_pbtxt((repo / "enc" / "config.pbtxt").read_text())
    assert cfg.backend == "python" and cfg.parameters["input_names"].string_value == "input_ids,attention_mask"
    assert card.serving == "fused" and card.models == ["enc"] and card.public_model == "enc"
    assert card.tokenizer == "enc/1/tokenizer/tokenizer.json"
    assert served.tokenizer_file == repo / "enc/1/tokenizer/tokenizer.json" and served.dim == 384  # what the gateway reads


def test_ensemble_repository_card_is_unchanged_by_the_serving_field(tmp_path):
    repo, card, served = _written(tmp_path, "ensemble")
    assert card.serving == "ensemble" and card.models == ["enc_tokenizer", "enc_encoder", "enc_postprocess", "enc"]
    assert card.tokenizer == "enc_tokenizer/1/tokenizer/tokenizer.json" and served.tokenizer_file.is_file()
    assert configs.parse_pbtxt((repo / "enc" / "config.pbtxt").read_text()).platform == "ensemble"


def test_fused_on_a_container_runtime_is_refused_before_anything_is_written(tmp_path):
    for runtime in ("onnxruntime_onnx", "tensorrt_plan"):  # tensorrt: refused before looking for engines
        with pytest.raises(configs.ConfigError, match="needs runtime: python-ort"):
            _written(tmp_path / runtime, "fused", runtime=runtime, instances={"kind": "gpu"})
        assert not (tmp_path / runtime / "build" / "enc" / "model_repository").exists()


INVARIANT, VARIES = {"invariant": True, "max_abs_diff": 0.0}, {"invariant": False, "max_abs_diff": 0.05}


@pytest.mark.parametrize("serving", ["ensemble", "fused"])
def test_a_batch_invariant_encoder_is_cached_by_triton_at_its_public_model(tmp_path, serving):
    repo, card, served = _written(tmp_path, serving, invariance=INVARIANT, response_cache={"size_mb": 16})
    assert card.response_cache_mb == 16 and served.response_cache
    public = configs.parse_pbtxt((repo / "enc" / "config.pbtxt").read_text())
    assert public.response_cache.enable  # the whole text -> answer path: a hit skips every step
    for member in set(card.models) - {"enc"}:
        assert not configs.parse_pbtxt((repo / member / "config.pbtxt").read_text()).response_cache.enable


@pytest.mark.parametrize("invariance, kw, why", [
    (VARIES, {}, "a variant whose answers change with the batch"),
    (None, {}, "a variant never checked"),
    (INVARIANT, {"response_cache": {"enabled": False}}, "turned off in the spec"),
])
def test_no_cache_where_a_cached_answer_could_differ_or_the_spec_says_no(tmp_path, invariance, kw, why):
    repo, card, served = _written(tmp_path, "ensemble", invariance=invariance, **kw)
    assert card.response_cache_mb == 0 and not served.response_cache, why
    assert not configs.parse_pbtxt((repo / "enc" / "config.pbtxt").read_text()).response_cache.enable


def test_generation_is_never_cached():
    from model_repository.writer import response_cache_mb

    spec = parse_spec({"name": "lm", "source": {"kind": "package", "package": "x"}, "task": "text-generation",
                       "precisions": ["fp32"], "serve_precision": "fp32"})
    assert spec.response_cache.enabled  # the default...
    variant = type("V", (), {"batch_invariance": INVARIANT})()
    assert response_cache_mb(spec, variant) == 0  # ...never applies to sampled, decoupled generation


def test_a_written_encoder_pins_every_step_to_its_version_and_loads_only_that_version(tmp_path):
    repo, card, _ = _written(tmp_path, "ensemble")
    assert card.version == 1 and card.previous == []
    for name in card.models:
        cfg = configs.parse_pbtxt((repo / name / "config.pbtxt").read_text())
        assert list(cfg.version_policy.specific.versions) == [1], name
    public = configs.parse_pbtxt((repo / "enc" / "config.pbtxt").read_text())
    assert [s.model_version for s in public.ensemble_scheduling.step] == [1, 1, 1]  # never "latest" (-1)


def test_configs_that_differ_only_in_versions_are_the_same_and_any_other_change_is_seen():
    spec, man = _spec(), _manifest()
    _, steps, ens = _all(spec, man)
    a, b = mc.ModelConfig(), mc.ModelConfig()
    a.CopyFrom(ens)
    b.CopyFrom(ens)
    configs.pin_versions(configs.pin_steps(a, 1), [1])
    configs.pin_versions(configs.pin_steps(b, 2), [1, 2])
    assert [s.model_version for s in b.ensemble_scheduling.step] == [2, 2, 2]
    assert list(b.version_policy.specific.versions) == [1, 2]
    assert configs.same_but_versions(a, b)
    b.max_batch_size += 1
    assert not configs.same_but_versions(a, b)
    _, other_steps, _ = _all(_spec(batching={"max_batch_size": 8, "preferred_batch_sizes": [4]}), man)
    assert not configs.same_but_versions(steps[1], other_steps[1])
