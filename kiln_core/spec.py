"""The one typed deployment spec every stage reads.

A YAML file is validated into :class:`DeploymentSpec` before any work starts; a bad
field fails with its dotted path and what is allowed. Nothing downstream re-derives
names, shapes or paths by hand: they come from here or from the export manifest.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PACKAGED_SPECS = Path(__file__).parent / "specs"


class SpecError(ValueError):
    """A spec that cannot be used; the message names each bad field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Task(str, Enum):
    feature_extraction = "feature-extraction"
    text_classification = "text-classification"
    text_generation = "text-generation"  # causal LM with a KV cache, served with streaming


class Pooling(str, Enum):
    mean = "mean"
    cls = "cls"


class Precision(str, Enum):
    fp32 = "fp32"
    int8 = "int8"
    fp16 = "fp16"
    int4 = "int4"  # causal LMs: 4-bit block-quantized weights (MatMulNBits)


AUTO = "auto"  # serve_precision: the fastest variant that passed its gate and the batch-invariance check


class Runtime(str, Enum):
    """Where the encoder runs inside Triton.

    python-ort: ONNX Runtime inside a python-backend model (the only one the
    pip-installed Triton can load); onnxruntime_onnx / tensorrt_plan: NVIDIA's
    container backends.
    """

    python_ort = "python-ort"
    onnxruntime_onnx = "onnxruntime_onnx"
    tensorrt_plan = "tensorrt_plan"


class PackageSource(_Frozen):
    kind: Literal["package"] = "package"
    package: str = Field(description="an installed Python package that carries the checkpoint")
    subdir: str = "model"


class FolderSource(_Frozen):
    kind: Literal["folder"] = "folder"
    path: Path


class GgufSource(_Frozen):
    """A GGUF file (weights dequantized to fp32 on load), from a path or an installed package."""

    kind: Literal["gguf"] = "gguf"
    file: str = Field(description="GGUF file name (inside package) or a path")
    package: str | None = Field(None, description="installed Python package that carries the file")


Source = Annotated[PackageSource | FolderSource | GgufSource, Field(discriminator="kind")]


class Batching(_Frozen):
    max_batch_size: int = Field(64, ge=1, le=4096)
    preferred_batch_sizes: list[int] = Field(default_factory=lambda: [8, 16, 32])
    max_queue_delay_us: int = Field(2000, ge=0, le=10_000_000)
    # bounded queue: requests beyond it are rejected at once (HTTP 503 / UNAVAILABLE)
    max_queue_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _preferred_fit(self) -> "Batching":
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ValueError(
                f"preferred_batch_sizes {bad} must lie in 1..max_batch_size ({self.max_batch_size})"
            )
        return self


class Instances(_Frozen):
    tokenizer: int = Field(1, ge=1, le=64)
    encoder: int = Field(1, ge=1, le=64)
    postprocess: int = Field(1, ge=1, le=64)
    kind: Literal["cpu", "gpu"] = "cpu"
    # ONNX Runtime threads per encoder instance (0: ONNX Runtime decides)
    intra_op_threads: int = Field(0, ge=0, le=256)
    # ONNX Runtime's busy-wait between runs: faster big batches, but on few cores it takes
    # CPU from the other models under many small concurrent requests (see README, bench)
    allow_spinning: bool = True


class ResponseCache(_Frozen):
    """Triton's local response cache (the one shipped with the server), for encoders: an
    identical request (same texts, same order) is answered from memory, not recomputed. Only
    where answers are deterministic: never for generation (sampled, and decoupled, which the
    cache does not serve), and only for a served variant that passed the batch-invariance
    check, so a cached answer is the one any batch would have given."""

    enabled: bool = True
    size_mb: int = Field(64, ge=1, le=65536, description="the cache's size; `kiln serve` sizes Triton's cache by the "
                                                         "largest of its models' (or --cache-mb)")


class Parity(_Frozen):
    """Gates a variant must pass before anything downstream may use it."""

    fp32_min_cosine: float = 0.99999
    fp32_max_abs: float = 1e-3
    fp16_min_cosine: float = 0.999
    int8_mean_cosine: float = 0.99
    int8_min_cosine: float = 0.98
    min_inputs: int = Field(32, ge=1)


class Ports(_Frozen):
    http: int = Field(8000, ge=0, le=65535)
    grpc: int = Field(8001, ge=0, le=65535)
    metrics: int = Field(8002, ge=0, le=65535)


class Generation(_Frozen):
    """Causal-LM serving: context, defaults and the continuous-batching engine's limits."""

    max_context: int = Field(2048, ge=16, le=131072, description="prompt + generated tokens")
    default_max_tokens: int = Field(256, ge=1)
    max_concurrent: int = Field(8, ge=1, le=256, description="sequences sharing one decode step")
    max_queue: int = Field(64, ge=1, description="requests waiting for a slot beyond max_concurrent; more are rejected at once")
    # chunked prefill: while other streams decode, a prompt is prefilled this many tokens per
    # engine step, so a long prompt joining cannot stall them (0: whole prompt at once).
    # Measured on SmolLM2 fp32, 2 cores: a 1,000-token prompt joining one stream made its
    # stall step 2.0-3.1x a normal one at 16, 4.4-4.6x at 32, 45-70x unchunked; the long
    # prompt's own TTFT grows 2.5-4x at 16 (README, Causal LMs)
    prefill_chunk: int = Field(16, ge=0, le=131072)
    # the decoder graph: "fused" (export/lm_graph.py: onnxruntime's GroupQueryAttention with the
    # rotary embedding inside, a KV cache written in place, one cache row per sequence), "kv-concat"
    # (the dynamo export of the transformers module, its cache concatenated every step), or
    # "auto": fused where the architecture is covered (Llama, Mistral, Qwen2), else kv-concat
    graph: Literal["auto", "fused", "kv-concat"] = "auto"
    # streamed text goes out every stream_interval engine steps while more than 2 streams run
    # (1: every token as it comes): each response costs the python backend, Triton and the
    # gateway about the same whatever its length. Measured on SmolLM2 int4, 8 streams, 2 cores:
    # see README (Causal LMs, Bench). The first token is always sent at once.
    stream_interval: int = Field(2, ge=1, le=64)
    parity_prompts: int = Field(8, ge=1, description="greedy-identity prompts in the gate")
    parity_new_tokens: int = Field(64, ge=1)
    parity_decode_steps: int = Field(16, ge=1)
    max_logits_abs_diff: float = 1e-3
    max_perplexity_ratio: float = Field(1.10, ge=1.0, description="quantized ppl <= ratio x fp32 ppl")


class Targets(_Frozen):
    """Service-level objectives a load test checks; None: not checked."""

    p50_ms: float | None = Field(300.0, gt=0)
    p95_ms: float | None = Field(1000.0, gt=0)
    p99_ms: float | None = Field(2000.0, gt=0)
    min_qps: float | None = Field(10.0, ge=0)
    max_error_ratio: float = Field(0.01, ge=0, le=1)


class LoadShape(_Frozen):
    """users: fixed concurrency (closed loop); rate: constant request rate (open loop, so a
    slow server cannot slow the client down and hide latency); capacity: step the rate up
    and report the highest sustained QPS whose p95 stays under the target."""

    kind: Literal["users", "rate", "capacity"] = "users"
    # stream: Triton's generate_stream (token streaming); openai: through the OpenAI gateway
    # (chat streaming for text-generation, embeddings for feature-extraction)
    protocol: Literal["grpc", "http", "stream", "openai"] = "grpc"
    users: int = Field(4, ge=1, le=1000)
    spawn_rate: float = Field(4.0, gt=0)
    rate: float = Field(20.0, gt=0, description="requests/s for kind: rate")
    run_time_s: float = Field(20.0, gt=0, le=3600)
    texts_per_request: int = Field(1, ge=1, le=4096)
    max_tokens: int = Field(32, ge=1, le=131072, description="completion tokens asked per streamed request")
    max_in_flight: int = Field(256, ge=1, description="open-loop cap on outstanding requests")
    start_rate: float = Field(10.0, gt=0)
    step_factor: float = Field(1.5, gt=1)
    step_time_s: float = Field(5.0, gt=0)
    max_steps: int = Field(8, ge=1, le=50)


class LoadTest(_Frozen):
    targets: Targets = Targets()
    shape: LoadShape = LoadShape()


_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class DeploymentSpec(_Frozen):
    name: str = Field(description="served (public) model name")
    source: Source
    task: Task = Task.feature_extraction
    pooling: Pooling = Pooling.mean
    normalize: bool = True
    labels: list[str] | None = Field(
        None, description="class names for text-classification; default: the checkpoint's id2label"
    )
    max_length: int = Field(256, ge=8, le=8192)
    precisions: list[Precision] = Field(default_factory=lambda: [Precision.fp32, Precision.int8])
    # a precision, or "auto": among the variants that passed their gate and the
    # batch-invariance check on the machine that built them, the fastest by one named
    # metric (see export/selection.py); the pick is recorded in the manifest
    serve_precision: Precision | Literal["auto"] = AUTO
    # encoders: "ensemble" (tokenizer -> encoder -> postprocess models) or "fused" (one
    # python model does all three: less IPC per request, same outputs)
    serving: Literal["ensemble", "fused"] = "ensemble"
    int8_mode: Literal["dynamic", "static"] = "dynamic"
    generation: Generation = Generation()
    runtime: Runtime = Runtime.python_ort
    opset: int = Field(18, ge=17, le=23)
    batching: Batching = Batching()
    response_cache: ResponseCache = ResponseCache()
    instances: Instances = Instances()
    parity: Parity = Parity()
    ports: Ports = Ports()
    loadtest: LoadTest = LoadTest()
    workdir: Path = Field(Path("build"), description="artifacts go to <workdir>/<name>/")

    @model_validator(mode="after")
    def _consistent(self) -> "DeploymentSpec":
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use lowercase letters, digits, '_', '-', '.'")
        if Precision.fp32 not in self.precisions:
            raise ValueError("precisions must include fp32: every other variant derives from it")
        if self.serve_precision != AUTO and self.serve_precision not in self.precisions:
            raise ValueError(
                f"serve_precision {self.serve_precision.value!r} is not among precisions "
                f"{[p.value for p in self.precisions]}"
            )
        if self.task is Task.text_classification and self.labels is not None and len(self.labels) < 2:
            raise ValueError("labels: a classifier needs at least 2")
        if self.task is Task.text_generation and self.runtime is not Runtime.python_ort:
            raise ValueError("text-generation is served by the python-ort runtime (generation model with continuous batching)")
        if self.task is not Task.text_generation and Precision.int4 in self.precisions:
            raise ValueError("int4 is for text-generation models; encoders use int8")
        if self.runtime is Runtime.tensorrt_plan and self.serve_precision is Precision.int8:
            # int8 TensorRT engines need calibration or QDQ; the QDQ route needs static int8
            if self.int8_mode != "static":
                raise ValueError("runtime tensorrt_plan with int8 needs int8_mode: static (QDQ)")
        return self

    def with_precision(self, precision: str) -> "DeploymentSpec":
        """This spec serving one fixed precision (how "auto" reads once an export has picked)."""
        return self.model_copy(update={"serve_precision": Precision(precision)})

    # --- derived locations: the one place paths are decided ---
    @property
    def root(self) -> Path:
        return self.workdir / self.name

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def repository_dir(self) -> Path:
        return self.root / "model_repository"

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    @property
    def loadtest_dir(self) -> Path:
        return self.root / "loadtest"


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(spec)"
        msg = e["msg"].removeprefix("Value error, ")
        allowed = e.get("ctx", {}).get("expected")
        lines.append(f"  {where}: {msg}" + (f" (allowed: {allowed})" if allowed and allowed not in msg else ""))
    return "\n".join(lines)


def parse_spec(data: dict, origin: str = "spec") -> DeploymentSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return DeploymentSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{origin} is not a valid deployment spec:\n{_format_errors(err)}") from None


def spec_file(path: str | Path) -> Path:
    """The file a spec argument names: a path, or a packaged spec's name (e.g. ``minilm``)."""
    p = Path(path)
    if not p.exists() and (PACKAGED_SPECS / f"{path}.yaml").exists():
        p = PACKAGED_SPECS / f"{path}.yaml"
    if not p.exists():
        known = ", ".join(sorted(s.stem for s in PACKAGED_SPECS.glob("*.yaml")))
        raise SpecError(f"no spec file {path!r} (packaged specs: {known})")
    return p


def load_spec(path: str | Path, **overrides) -> DeploymentSpec:
    """Load a spec file, or a packaged one by name (e.g. ``minilm``)."""
    p = spec_file(path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: not valid YAML: {err}") from None
    if isinstance(data, dict):
        data = merge_overrides(data, overrides)
    return parse_spec(data, origin=str(p))


def merge_overrides(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` laid over it, mappings merged key by key (None: keep base's)."""
    out = dict(base)
    for k, v in overrides.items():
        if v is None:
            continue
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_overrides(out[k], v)
        else:
            out[k] = v
    return out
