"""Triton model configs, built as Triton's own `ModelConfig` protobuf messages.

Nobody writes config.pbtxt by hand: each is built here from the spec and the export
manifest, serialised with protobuf's text format, and parsed back into a fresh
`ModelConfig` to prove Triton's schema accepts it. Ensemble wiring (every mapped tensor
exists on both sides with the same type) is checked before anything is served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from kiln_core.manifest import ExportManifest, TensorSpec
from kiln_core.spec import DeploymentSpec, Runtime, Task
from kiln_runtime.contract import (  # the tensor-name contract, shared with the python models and clients
    EMBEDDING,
    GENERATION_INPUTS,
    GENERATION_OUTPUTS,
    LABEL,
    SCORES,
    TEXT,
    TOKENIZER_FIELDS,
    TOKENIZER_FILE,
)

DTYPES = {
    "int64": mc.TYPE_INT64,
    "uint64": mc.TYPE_UINT64,
    "int32": mc.TYPE_INT32,
    "float32": mc.TYPE_FP32,
    "float16": mc.TYPE_FP16,
    "bool": mc.TYPE_BOOL,
    "bytes": mc.TYPE_STRING,
}


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Names:
    """Model names inside the repository; the ensemble carries the public name."""

    public: str

    @property
    def tokenizer(self) -> str:
        return f"{self.public}_tokenizer"

    @property
    def encoder(self) -> str:
        return f"{self.public}_encoder"

    @property
    def postprocess(self) -> str:
        return f"{self.public}_postprocess"




def _dims(shape: list[int | str]) -> list[int]:
    """Manifest shape without its batch axis; symbolic axes become -1."""
    return [d if isinstance(d, int) else -1 for d in shape[1:]]


def _tensor(cls, name: str, dtype: str, dims: list[int], ragged: bool = False):
    t = cls(name=name, data_type=DTYPES[dtype], dims=dims)
    if ragged:
        t.allow_ragged_batch = True
    return t


def _io(cls, spec: TensorSpec, ragged: bool = False):
    return _tensor(cls, spec.name, spec.dtype, _dims(spec.shape), ragged)


def _instance_group(count: int, kind: str) -> mc.ModelInstanceGroup:
    return mc.ModelInstanceGroup(count=count, kind=mc.ModelInstanceGroup.KIND_GPU if kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU)


def _dynamic_batching(spec: DeploymentSpec, wait: bool = True) -> mc.ModelDynamicBatching:
    """The encoder waits up to max_queue_delay for a fuller batch (that is where batching
    pays); the cheap python steps take whatever is queued at once (wait=False)."""
    b = spec.batching
    return mc.ModelDynamicBatching(
        preferred_batch_size=b.preferred_batch_sizes if wait else [],
        max_queue_delay_microseconds=b.max_queue_delay_us if wait else 0,
        default_queue_policy=mc.ModelQueuePolicy(
            max_queue_size=b.max_queue_size, timeout_action=mc.ModelQueuePolicy.REJECT
        ),
    )


def _set_params(cfg: mc.ModelConfig, **kv) -> None:
    for k, v in kv.items():
        cfg.parameters[k].string_value = str(v)


def tokenizer_config(spec: DeploymentSpec, man: ExportManifest, names: Names) -> mc.ModelConfig:
    cfg = mc.ModelConfig(
        name=names.tokenizer,
        backend="python",
        max_batch_size=spec.batching.max_batch_size,
        input=[_tensor(mc.ModelInput, TEXT, "bytes", [1])],
        output=[_io(mc.ModelOutput, t) for t in man.inputs],
        instance_group=[_instance_group(spec.instances.tokenizer, "cpu")],
        dynamic_batching=_dynamic_batching(spec, wait=False),
    )
    _set_params(
        cfg,
        tokenizer_file=TOKENIZER_FILE,
        max_length=spec.max_length,
        output_names=",".join(t.name for t in man.inputs),
    )
    return cfg


def encoder_config(spec: DeploymentSpec, man: ExportManifest, names: Names, model_file: str) -> mc.ModelConfig:
    python = spec.runtime is Runtime.python_ort
    cfg = mc.ModelConfig(
        name=names.encoder,
        max_batch_size=spec.batching.max_batch_size,
        # ragged: requests of different sequence lengths share a batch; model.py pads them
        input=[_io(mc.ModelInput, t, ragged=python) for t in man.inputs],
        output=[_io(mc.ModelOutput, t) for t in man.outputs],
        instance_group=[_instance_group(spec.instances.encoder, spec.instances.kind)],
        dynamic_batching=_dynamic_batching(spec),
    )
    if python:
        cfg.backend = "python"
        _set_params(
            cfg,
            onnx_file=model_file,
            intra_op_threads=spec.instances.intra_op_threads,
            allow_spinning=int(spec.instances.allow_spinning),
        )
    else:
        cfg.platform = spec.runtime.value
        cfg.default_model_filename = model_file
    return cfg


def _head_outputs(spec: DeploymentSpec, man: ExportManifest) -> list[mc.ModelOutput]:
    """The public outputs: embedding, or label + scores (postprocess and fused models alike)."""
    if spec.task is Task.text_classification:
        return [_tensor(mc.ModelOutput, LABEL, "bytes", [1]), _tensor(mc.ModelOutput, SCORES, "float32", [len(man.labels or [])])]
    return [_tensor(mc.ModelOutput, EMBEDDING, "float32", [man.hidden_size])]


def _head_params(spec: DeploymentSpec, man: ExportManifest) -> dict[str, Any]:
    if spec.task is Task.text_classification:
        return {"task": spec.task.value, "labels": "\n".join(man.labels or [])}
    return {"task": spec.task.value, "pooling": man.pooling, "normalize": int(man.normalize)}


def postprocess_config(spec: DeploymentSpec, man: ExportManifest, names: Names) -> mc.ModelConfig:
    encoder_out = man.outputs[0]
    cfg = mc.ModelConfig(
        name=names.postprocess,
        backend="python",
        max_batch_size=spec.batching.max_batch_size,
        instance_group=[_instance_group(spec.instances.postprocess, "cpu")],
        dynamic_batching=_dynamic_batching(spec, wait=False),
    )
    if spec.task is Task.text_classification:
        cfg.input.append(_io(mc.ModelInput, encoder_out))
    else:
        cfg.input.extend([_io(mc.ModelInput, encoder_out, ragged=True), _tensor(mc.ModelInput, "attention_mask", "int64", [-1], ragged=True)])
    cfg.output.extend(_head_outputs(spec, man))
    _set_params(cfg, **_head_params(spec, man))
    return cfg


def fused_config(spec: DeploymentSpec, man: ExportManifest, names: Names, model_file: str) -> mc.ModelConfig:
    """serving: fused: ONE python model under the public name does tokenizer, ONNX Runtime
    and pooling / softmax; same public tensors as the ensemble, one IPC hop per request.
    It batches like the encoder (the spec's delay and preferred sizes); requests' texts are
    padded together into one ONNX Runtime run inside model.py."""
    if spec.runtime is not Runtime.python_ort:
        raise ConfigError(
            f"serving: fused runs ONNX Runtime inside a python model, so it needs runtime: python-ort "
            f"(got {spec.runtime.value}); use serving: ensemble with that runtime"
        )
    bad = [t.name for t in man.inputs if t.name not in TOKENIZER_FIELDS]
    if bad:
        raise ConfigError(f"encoder inputs {bad} cannot be produced by the tokenizer (it gives {list(TOKENIZER_FIELDS)})")
    cfg = mc.ModelConfig(
        name=names.public,
        backend="python",
        max_batch_size=spec.batching.max_batch_size,
        input=[_tensor(mc.ModelInput, TEXT, "bytes", [1])],
        output=_head_outputs(spec, man),
        instance_group=[_instance_group(spec.instances.encoder, spec.instances.kind)],
        dynamic_batching=_dynamic_batching(spec),
    )
    _set_params(
        cfg,
        tokenizer_file=TOKENIZER_FILE,
        max_length=spec.max_length,
        onnx_file=model_file,
        input_names=",".join(t.name for t in man.inputs),
        hidden_output=man.outputs[0].name,
        intra_op_threads=spec.instances.intra_op_threads,
        allow_spinning=int(spec.instances.allow_spinning),
        **_head_params(spec, man),
    )
    return cfg


def generation_config(spec: DeploymentSpec, man: ExportManifest, model_file: str) -> mc.ModelConfig:
    """The public chat model: decoupled python model; it batches internally (continuous
    batching across decode steps), so Triton hands requests over one by one at once."""
    import json

    cfg = mc.ModelConfig(
        name=spec.name,
        backend="python",
        max_batch_size=0,
        input=[_tensor(mc.ModelInput, t.name, t.dtype, list(t.dims)) for t in GENERATION_INPUTS],
        output=[_tensor(mc.ModelOutput, t.name, t.dtype, list(t.dims)) for t in GENERATION_OUTPUTS],
        instance_group=[_instance_group(1, "cpu")],
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
    )
    for i in cfg.input:
        i.optional = True  # text_input or messages; every sampling field has a default
    g = spec.generation
    _set_params(
        cfg,
        onnx_file=model_file,
        decoder=json.dumps(man.decoder or {}),
        intra_op_threads=spec.instances.intra_op_threads,
        max_concurrent=g.max_concurrent,
        default_max_tokens=g.default_max_tokens,
        max_queue=g.max_queue,
        prefill_chunk=g.prefill_chunk,
        stream_interval=g.stream_interval,
    )
    return cfg


def ensemble_config(spec: DeploymentSpec, names: Names, steps: list[mc.ModelConfig]) -> mc.ModelConfig:
    """Wire tokenizer -> encoder -> postprocess; tensor names flow through unchanged."""
    tok, enc, post = steps
    cfg = mc.ModelConfig(
        name=names.public,
        platform="ensemble",
        max_batch_size=spec.batching.max_batch_size,
        input=[_tensor(mc.ModelInput, TEXT, "bytes", [1])],
        output=[mc.ModelOutput(name=o.name, data_type=o.data_type, dims=o.dims) for o in post.output],
    )
    for model in steps:
        step = cfg.ensemble_scheduling.step.add(model_name=model.name, model_version=-1)
        for i in model.input:
            step.input_map[i.name] = i.name
        for o in model.output:
            # only tensors someone downstream reads are mapped (ensemble rejects dangling ones)
            if model is tok and o.name not in {i.name for i in enc.input} | {i.name for i in post.input}:
                continue
            step.output_map[o.name] = o.name
    return cfg


def pin_versions(cfg: mc.ModelConfig, versions: list[int]) -> mc.ModelConfig:
    """Triton loads exactly these versions of the model (``version_policy: specific``): a
    new version is loaded beside the serving one, and an old one unloaded, by changing this."""
    del cfg.version_policy.specific.versions[:]
    cfg.version_policy.specific.versions.extend(sorted(versions))
    return cfg


def pin_steps(ensemble: mc.ModelConfig, version: int) -> mc.ModelConfig:
    """Every step of the ensemble names this version of its model (never "latest"), so no
    step changes under live traffic: a switch is a new ensemble version pinned to new steps."""
    for step in ensemble.ensemble_scheduling.step:
        step.model_version = version
    return ensemble


def same_but_versions(a: mc.ModelConfig, b: mc.ModelConfig) -> bool:
    """Two configs that differ at most in their version policy (and an ensemble's pinned versions)."""
    x, y = mc.ModelConfig(), mc.ModelConfig()
    x.CopyFrom(a)
    y.CopyFrom(b)
    for cfg in (x, y):
        cfg.ClearField("version_policy")
        for step in cfg.ensemble_scheduling.step:
            step.model_version = -1
    return x == y


def validate_ensemble(ensemble: mc.ModelConfig, members: dict[str, mc.ModelConfig]) -> None:
    """Every tensor an ensemble step reads is produced upstream (or is an ensemble input)
    with the same data type; every ensemble output is produced. Fails before serving."""
    produced = {i.name: i.data_type for i in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = members.get(step.model_name)
        if model is None:
            raise ConfigError(f"ensemble step names unknown model {step.model_name!r}")
        wanted = {i.name: i.data_type for i in model.input}
        for model_in, ens_tensor in step.input_map.items():
            if model_in not in wanted:
                raise ConfigError(f"{step.model_name} has no input {model_in!r}")
            if ens_tensor not in produced:
                raise ConfigError(f"{step.model_name}.{model_in} reads {ens_tensor!r}, which nothing upstream produces")
            if produced[ens_tensor] != wanted[model_in]:
                raise ConfigError(
                    f"{step.model_name}.{model_in}: type {mc.DataType.Name(wanted[model_in])} but "
                    f"{ens_tensor!r} is {mc.DataType.Name(produced[ens_tensor])}"
                )
        missing = set(wanted) - set(step.input_map)
        if missing:
            raise ConfigError(f"{step.model_name}: inputs {sorted(missing)} are not mapped")
        outs = {o.name: o.data_type for o in model.output}
        for model_out, ens_tensor in step.output_map.items():
            if model_out not in outs:
                raise ConfigError(f"{step.model_name} has no output {model_out!r}")
            produced[ens_tensor] = outs[model_out]
    for o in ensemble.output:
        if o.name not in produced:
            raise ConfigError(f"ensemble output {o.name!r} is produced by no step")


def to_pbtxt(cfg: mc.ModelConfig) -> str:
    """Serialise, then parse back through Triton's schema; a mismatch is a bug here."""
    text = text_format.MessageToString(cfg)
    parsed = text_format.Parse(text, mc.ModelConfig())
    if parsed != cfg:
        raise ConfigError(f"{cfg.name}: config.pbtxt does not round-trip through ModelConfig")
    return text


def parse_pbtxt(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())
