"""`kiln engines`: gated ONNX variants -> TensorRT engines (GPU machines only).

    model.fp32.plan   from the fp32 graph, TF32 off (fp32 means fp32: its gate allows 1e-3)
    model.fp16.plan   from the fp32 graph, BuilderFlag.FP16 (TensorRT picks fp16 kernels)
    model.int8.plan   from the static QDQ int8 graph, BuilderFlag.INT8 (explicit quantization)
                      and FP16, so the layers left unquantized may run in fp16, not only fp32

Each engine passes the parity gate of its precision (export.parity.gate, the thresholds
every ONNX variant of that precision is held to) against PyTorch, or it is deleted. It gets
beside it the exact graph TensorRT parsed (``model.<p>.trt.onnx``) and a record
(``model.<p>.plan.json``): precision, optimization profile, builder flags, the gate's
report, TensorRT version, GPU, sha256 of the source graph, an equivalent ``trtexec`` line.

The fp32 variant carries ONNX Runtime contrib fusions (SkipLayerNormalization, BiasGelu,
...) that TensorRT's ONNX parser cannot read; :func:`portable_graph` rewrites them back
into standard ONNX operators (TensorRT re-fuses them its own way) and refuses, by name,
any contrib op it does not know.

TensorRT is imported inside the functions that need it: everything else here (profile
shapes, graph checks and rewrites) is plain Python and runs on CPU-only machines.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kiln_core.manifest import ExportManifest, ParityReport, sha256
from kiln_core.spec import DeploymentSpec, Precision

log = logging.getLogger(__name__)

# engine precision -> the manifest variant (ONNX graph) it is built from
ENGINE_SOURCES = {"fp32": "fp32", "fp16": "fp32", "int8": "int8"}
# engine precision -> (BuilderFlags set, BuilderFlags cleared). TensorRT turns TF32 on by
# default, which would let an "fp32" engine miss the fp32 gate; an int8 engine without FP16
# runs every layer its QDQ graph leaves unquantized (softmax, layer norms) in fp32
BUILDER_FLAGS = {"fp32": ([], ["TF32"]), "fp16": (["FP16"], []), "int8": (["INT8", "FP16"], [])}
BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"
DEFAULT_OPT_SEQUENCE = 128  # typical sentence-embedding inputs are short; capped at max_length
MIN_TENSORRT_MAJOR = 10  # int64 inputs (what the manifest and Triton config declare) need TensorRT 10

_DYNAMIC_INT8_OPS = {
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QLinearMatMul",
    "QLinearConv",
}


class TensorRTUnavailable(RuntimeError):
    """The `tensorrt` Python package cannot be imported here."""


class EngineError(RuntimeError):
    """A graph, manifest or build TensorRT cannot turn into an engine; says what to change."""


class ShapeRange(NamedTuple):
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


# ----------------------------------------------------------------------------- paths
def engine_path(spec: DeploymentSpec, precision: str | Precision) -> Path:
    """Where the repository writer looks for the engine of `precision`."""
    return spec.export_dir / f"model.{Precision(precision).value}.plan"


def record_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


def parsed_graph_path(plan: Path) -> Path:
    return plan.with_name(plan.stem + ".trt.onnx")


def engine_precisions(spec: DeploymentSpec) -> tuple[list[str], dict[str, str]]:
    """The engines `kiln engines` builds for a spec: one per precision it lists, the served
    one included (fp32 too), and {precision: why} for those it cannot build."""
    wanted, skipped = [], {}
    for p in spec.precisions:
        if p is Precision.int8 and spec.int8_mode != "static":
            skipped[p.value] = "TensorRT int8 needs a static QDQ graph (spec int8_mode: static)"
        else:
            wanted.append(p.value)
    return wanted, skipped


# ----------------------------------------------------------------------------- profile
def profile_shapes(
    spec: DeploymentSpec,
    manifest: ExportManifest,
    opt_batch: int | None = None,
    opt_sequence: int | None = None,
) -> dict[str, ShapeRange]:
    """One optimization profile over the manifest's dynamic axes.

    batch: 1 .. spec.batching.max_batch_size (opt: the largest preferred batch size, what
    the dynamic batcher aims for); sequence: 1 .. spec.max_length (opt: min(max_length,
    128)). Fixed axes stay as they are. The engine then accepts every shape Triton's
    config (max_batch_size, dims -1) lets through.
    """
    max_batch = spec.batching.max_batch_size
    if opt_batch is None:
        opt_batch = max(spec.batching.preferred_batch_sizes, default=max_batch)
    if opt_sequence is None:
        opt_sequence = min(spec.max_length, DEFAULT_OPT_SEQUENCE)
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"opt_batch {opt_batch} must lie in 1..max_batch_size ({max_batch})")
    if not 1 <= opt_sequence <= spec.max_length:
        raise ValueError(f"opt_sequence {opt_sequence} must lie in 1..max_length ({spec.max_length})")
    if manifest.max_length != spec.max_length:
        raise EngineError(
            f"the manifest was exported with max_length {manifest.max_length} but the spec says "
            f"{spec.max_length}: re-run `kiln export` with this spec"
        )
    ranges = {BATCH_AXIS: (1, opt_batch, max_batch), SEQUENCE_AXIS: (1, opt_sequence, spec.max_length)}

    out = {}
    for t in manifest.inputs:
        if not t.shape or t.shape[0] != BATCH_AXIS:
            raise EngineError(
                f"input {t.name!r} has shape {t.shape}: its first axis must be the dynamic {BATCH_AXIS!r} axis "
                "(Triton batches along it)"
            )
        lo, opt, hi = [], [], []
        for axis, d in enumerate(t.shape):
            if isinstance(d, int):
                lo.append(d), opt.append(d), hi.append(d)
            elif d in ranges and (d == BATCH_AXIS) == (axis == 0):
                a, b, c = ranges[d]
                lo.append(a), opt.append(b), hi.append(c)
            else:
                raise EngineError(
                    f"input {t.name!r} axis {axis} is {d!r}: profiles know {BATCH_AXIS!r} (axis 0) and "
                    f"{SEQUENCE_AXIS!r} (bounded by max_length)"
                )
        out[t.name] = ShapeRange(tuple(lo), tuple(opt), tuple(hi))
    return out


def trtexec_command(onnx_file: Path, plan: Path, profile: dict[str, ShapeRange], precision: str, workspace_mib: int) -> str:
    """The equivalent `trtexec` call, for a person reproducing a build by hand."""

    def shapes(which: str) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, getattr(r, which)))}" for name, r in profile.items())

    args = [
        "trtexec",
        f"--onnx={onnx_file}",
        f"--saveEngine={plan}",
        f"--minShapes={shapes('min')}",
        f"--optShapes={shapes('opt')}",
        f"--maxShapes={shapes('max')}",
        f"--memPoolSize=workspace:{workspace_mib}",
    ]
    if precision == "fp32":
        args.append("--noTF32")
    elif precision == "int8":
        args += ["--int8", "--fp16"]
    else:
        args.append("--fp16")
    return shlex.join(args)


# ----------------------------------------------------------------------------- graph checks
def is_qdq_graph(model: onnx.ModelProto) -> bool:
    """Static int8 in QDQ form (QuantizeLinear/DequantizeLinear pairs), as TensorRT's
    explicit quantization reads it; False for dynamic int8 (DynamicQuantizeLinear,
    MatMulInteger) or an unquantized graph."""
    ops = {n.op_type for n in model.graph.node}
    return {"QuantizeLinear", "DequantizeLinear"} <= ops and not ops & _DYNAMIC_INT8_OPS


def qdq_problems(model: onnx.ModelProto) -> list[str]:
    """What TensorRT refuses in a QDQ graph: non-int8 (uint8) or non-zero zero points."""
    inits = {i.name: i for i in model.graph.initializer}
    problems = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 3 or n.input[2] not in inits:
            continue
        zp = numpy_helper.to_array(inits[n.input[2]])
        if zp.dtype != np.int8:
            problems.append(f"{n.name or n.output[0]}: zero point is {zp.dtype}, TensorRT needs int8")
        elif np.any(zp != 0):
            problems.append(f"{n.name or n.output[0]}: non-zero zero point (asymmetric), TensorRT needs symmetric")
    return problems


# ----------------------------------------------------------------------------- contrib-op rewrites
class _Emitter:
    """Builds replacement nodes with unique tensor names and shared scalar constants."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.inits = {i.name: i for i in graph.initializer}
        self.consts: dict[tuple[float, int], str] = {}
        self.nodes: list[onnx.NodeProto] = []

    def float_type(self, node: onnx.NodeProto) -> int:
        """Element type of a node's float initializers (bias, gamma); float32 if it has none."""
        for name in node.input:
            init = self.inits.get(name)
            if init is not None and init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
                return init.data_type
        return TensorProto.FLOAT

    def const(self, value: float, elem_type: int) -> str:
        key = (value, elem_type)
        if key not in self.consts:
            name = f"kiln_const_{len(self.consts)}"
            dtype = helper.tensor_dtype_to_np_dtype(elem_type)
            t = numpy_helper.from_array(np.array(value, dtype=dtype), name)
            self.graph.initializer.append(t)
            self.inits[name] = t
            self.consts[key] = name
        return self.consts[key]

    def op(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"{output}/{op_type}", **attrs))
        return output


def _base(node: onnx.NodeProto) -> str:
    return f"kiln/{node.name or node.output[0]}"


def _gelu_erf(e: _Emitter, x: str, out: str, node: onnx.NodeProto, ft: int) -> None:
    # 0.5 * x * (1 + erf(x / sqrt(2)))
    b = _base(node)
    scaled = e.op("Div", [x, e.const(float(np.sqrt(2.0)), ft)], f"{b}/div")
    erf = e.op("Erf", [scaled], f"{b}/erf")
    one_plus = e.op("Add", [erf, e.const(1.0, ft)], f"{b}/one_plus")
    prod = e.op("Mul", [x, one_plus], f"{b}/mul")
    e.op("Mul", [prod, e.const(0.5, ft)], out)


def _rewrite_skip_layer_norm(e: _Emitter, node: onnx.NodeProto) -> None:
    # com.microsoft SkipLayerNormalization(input, skip, gamma, beta?, bias?)
    #   -> (output, mean?, inv_std_var?, input_skip_bias_sum?)
    ins = list(node.input) + [""] * (5 - len(node.input))
    outs = list(node.output) + [""] * (4 - len(node.output))
    x, skip, gamma, beta, bias = ins[:5]
    eps = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"), 1e-12)
    b = _base(node)
    total = outs[3] or f"{b}/sum"
    if bias:
        s = e.op("Add", [x, skip], f"{b}/input_skip")
        e.op("Add", [s, bias], total)
    else:
        e.op("Add", [x, skip], total)
    ln_inputs = [total, gamma] + ([beta] if beta else [])
    ln_outputs = [outs[0]] + ([outs[1], outs[2]] if outs[1] or outs[2] else [])
    e.nodes.append(
        helper.make_node(
            "LayerNormalization", ln_inputs, ln_outputs, name=f"{b}/LayerNormalization", axis=-1, epsilon=float(eps)
        )
    )


def _rewrite_bias_gelu(e: _Emitter, node: onnx.NodeProto) -> None:
    # com.microsoft BiasGelu(A, B) = Gelu(A + B), exact (erf) form
    x = e.op("Add", [node.input[0], node.input[1]], f"{_base(node)}/biased")
    _gelu_erf(e, x, node.output[0], node, e.float_type(node))


def _rewrite_gelu(e: _Emitter, node: onnx.NodeProto) -> None:
    _gelu_erf(e, node.input[0], node.output[0], node, e.float_type(node))


def _rewrite_fast_gelu(e: _Emitter, node: onnx.NodeProto) -> None:
    # com.microsoft FastGelu(X, bias?): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    ft, b = e.float_type(node), _base(node)
    x = node.input[0]
    if len(node.input) > 1 and node.input[1]:
        x = e.op("Add", [x, node.input[1]], f"{b}/biased")
    x2 = e.op("Mul", [x, x], f"{b}/x2")
    x3 = e.op("Mul", [x2, x], f"{b}/x3")
    inner = e.op("Add", [x, e.op("Mul", [x3, e.const(0.044715, ft)], f"{b}/cubic")], f"{b}/inner")
    t = e.op("Tanh", [e.op("Mul", [inner, e.const(float(np.sqrt(2.0 / np.pi)), ft)], f"{b}/scaled")], f"{b}/tanh")
    prod = e.op("Mul", [x, e.op("Add", [t, e.const(1.0, ft)], f"{b}/one_plus")], f"{b}/mul")
    e.op("Mul", [prod, e.const(0.5, ft)], node.output[0])


def _rewrite_qdq(e: _Emitter, node: onnx.NodeProto) -> None:
    # com.microsoft Q/DQ (ORT's contrib form) -> the standard operator, same inputs and axis
    n = onnx.NodeProto()
    n.CopyFrom(node)
    n.domain = ""
    e.nodes.append(n)


_REWRITES: dict[str, Callable[[_Emitter, onnx.NodeProto], None]] = {
    "SkipLayerNormalization": _rewrite_skip_layer_norm,
    "BiasGelu": _rewrite_bias_gelu,
    "Gelu": _rewrite_gelu,
    "FastGelu": _rewrite_fast_gelu,
    "QuantizeLinear": _rewrite_qdq,
    "DequantizeLinear": _rewrite_qdq,
}
_STANDARD_DOMAINS = ("", "ai.onnx")


def portable_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of `model` in standard ONNX only (what TensorRT's parser reads), and the
    count of contrib ops rewritten per type. Unknown contrib ops raise EngineError."""
    unknown = Counter(
        f"{n.domain}:{n.op_type}"
        for n in model.graph.node
        if n.domain not in _STANDARD_DOMAINS and not (n.domain == "com.microsoft" and n.op_type in _REWRITES)
    )
    if unknown:
        raise EngineError(
            "TensorRT's ONNX parser cannot read "
            + ", ".join(f"{k} x{v}" for k, v in sorted(unknown.items()))
            + f"; kiln rewrites only {', '.join(sorted(_REWRITES))} (com.microsoft) into standard ONNX. "
            "Export the graph without these ONNX Runtime fusions for tensorrt_plan."
        )
    opset = next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), 0)
    needs_ln = any(n.domain == "com.microsoft" and n.op_type == "SkipLayerNormalization" for n in model.graph.node)
    if needs_ln and opset < 17:
        raise EngineError(f"opset {opset}: the standard LayerNormalization needs opset >= 17 (spec.opset)")

    out = onnx.ModelProto()
    out.CopyFrom(model)
    e = _Emitter(out.graph)
    rewrites: Counter[str] = Counter()
    for node in model.graph.node:
        if node.domain in _STANDARD_DOMAINS:
            e.nodes.append(node)
        else:
            _REWRITES[node.op_type](e, node)
            rewrites[node.op_type] += 1
    del out.graph.node[:]
    out.graph.node.extend(e.nodes)
    keep = [o for o in out.opset_import if o.domain in _STANDARD_DOMAINS]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out, dict(rewrites)


def _save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB ceiling
    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
        onnx.checker.check_model(str(path))
    else:
        onnx.checker.check_model(model)
        onnx.save_model(model, str(path))


# ----------------------------------------------------------------------------- TensorRT
def import_tensorrt():
    """The `tensorrt` module, or TensorRTUnavailable saying where it can be had."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise TensorRTUnavailable(
            f"TensorRT is not importable here ({err}). Engines are built on a machine with an NVIDIA GPU "
            "and the TensorRT version of the Triton image that will serve them: inside an NVIDIA container "
            "(nvcr.io/nvidia/tensorrt or nvcr.io/nvidia/tritonserver with TensorRT's Python bindings) or "
            "`pip install tensorrt-cu12==<that version>` from NVIDIA's package index. It cannot be "
            "installed on CPU-only machines; use runtime python-ort or onnxruntime_onnx there."
        ) from None
    major = int(str(trt.__version__).split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        raise TensorRTUnavailable(
            f"TensorRT {trt.__version__} is too old: kiln needs >= {MIN_TENSORRT_MAJOR} "
            "(int64 input tensors, as the manifest and the Triton config declare them)"
        )
    return trt


def _check_network_io(trt, network, manifest: ExportManifest) -> None:
    """The parsed network has exactly the manifest's tensors (names, dtypes, ranks)."""

    def dtype(t) -> str:
        return np.dtype(trt.nptype(t.dtype)).name

    got_in = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    got_out = {network.get_output(i).name: network.get_output(i) for i in range(network.num_outputs)}
    problems = []
    for kind, wanted, got in (("input", manifest.inputs, got_in), ("output", manifest.outputs, got_out)):
        if sorted(t.name for t in wanted) != sorted(got):
            problems.append(f"{kind}s: manifest {[t.name for t in wanted]}, network {sorted(got)}")
            continue
        for t in wanted:
            g = got[t.name]
            if dtype(g) != t.dtype:
                problems.append(f"{kind} {t.name}: manifest {t.dtype}, network {dtype(g)}")
            if len(g.shape) != len(t.shape):
                problems.append(f"{kind} {t.name}: manifest rank {len(t.shape)}, network shape {tuple(g.shape)}")
    if problems:
        raise EngineError("the parsed network does not match the export manifest: " + "; ".join(problems))


def _device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{torch.cuda.get_device_name(0)} (sm_{major}{minor})"
    except Exception as err:  # the record stays useful without it
        log.debug("no device name: %s", err)
    return "unknown"


def build_engine(
    spec: DeploymentSpec,
    manifest: ExportManifest,
    precision: str | Precision,
    out_path: Path | None = None,
    *,
    workspace_gib: float = 4.0,
    opt_batch: int | None = None,
    opt_sequence: int | None = None,
) -> Path:
    """Build the TensorRT engine of `precision` from the manifest's gated ONNX variant.

    Writes ``out_path`` (default spec.export_dir / model.<precision>.plan), the graph that
    was parsed beside it, and the record ``<plan>.json``; returns the engine path.
    Everything that can be checked without TensorRT is checked before it is imported.
    """
    precision = Precision(precision).value
    plan = Path(out_path) if out_path else engine_path(spec, precision)
    variant = manifest.usable_variant(ENGINE_SOURCES[precision])  # refuses a graph that failed its gate
    src = spec.export_dir / variant.file
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found: run `kiln export` first")
    src_sha = sha256(src)
    if src_sha != variant.sha256:
        raise EngineError(f"{src} changed since it passed its parity gate (sha256 differs from the manifest)")

    model = onnx.load(str(src))
    if precision == "int8":
        if not is_qdq_graph(model):
            raise EngineError(
                f"{src.name} is not a QDQ (static int8) graph ({variant.notes or 'dynamic int8'}): TensorRT "
                "int8 engines need explicit quantization. Set `int8_mode: static` in the spec and re-run "
                "`kiln export`."
            )
        problems = qdq_problems(model)
        if problems:
            raise EngineError("the int8 QDQ graph is not symmetric int8: " + "; ".join(problems[:5]))
    portable, rewrites = portable_graph(model)
    del model
    profile = profile_shapes(spec, manifest, opt_batch, opt_sequence)

    trt = import_tensorrt()
    parsed = parsed_graph_path(plan)
    _save(portable, parsed)
    del portable

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    logger = Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: every network is explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(parsed)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT's ONNX parser rejected {parsed.name}: " + "; ".join(errors or logger.errors))
    _check_network_io(trt, network, manifest)

    config = builder.create_builder_config()
    workspace = int(workspace_gib * (1 << 30))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    flags, cleared = BUILDER_FLAGS[precision]
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in cleared:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    opt_profile = builder.create_optimization_profile()
    for name, r in profile.items():
        opt_profile.set_shape(name, r.min, r.opt, r.max)
    config.add_optimization_profile(opt_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build the {precision} engine: " + "; ".join(logger.errors or ["see the log"]))
    plan.parent.mkdir(parents=True, exist_ok=True)
    with open(plan, "wb") as f:
        f.write(serialized)
    report = gate_engine(spec, precision, engine_runner(plan))

    record = {
        "engine": plan.name,
        "precision": precision,
        "bytes": plan.stat().st_size,
        "sha256": sha256(plan),
        "source": {"variant": variant.precision, "file": variant.file, "sha256": src_sha, "notes": variant.notes},
        "parsed_graph": {"file": parsed.name, "contrib_ops_rewritten": rewrites},
        "profile": {name: r._asdict() for name, r in profile.items()},
        "builder_flags": flags,
        "builder_flags_cleared": cleared,
        "parity": report.model_dump(mode="json"),
        "workspace_bytes": workspace,
        "tensorrt": str(trt.__version__),
        "device": _device_name(),
        "trtexec": trtexec_command(parsed, plan, profile, precision, workspace >> 20),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    record_path(plan).write_text(json.dumps(record, indent=2) + "\n")
    if not report.passed:  # the writer serves whatever model.<p>.plan it finds: leave none
        plan.unlink()
        raise EngineError(f"the {precision} engine failed its parity gate ({'; '.join(report.failures)}): "
                          f"deleted it; the figures are in {record_path(plan).name}")
    return plan


def gate_engine(spec: DeploymentSpec, precision: str | Precision, run) -> ParityReport:
    """An engine's outputs (``run(feeds) -> output``, as engine_runner gives) against PyTorch
    on the export's parity inputs, judged by the thresholds of its precision: the gate
    every ONNX variant of that precision passed."""
    from export.onnx_export import load_encoder
    from export.parity import compare, gate, parity_batches
    from kiln_core.sources import checkpoint_dir

    step = spec.batching.max_batch_size  # the engine's profile admits no larger batch

    def chunked(feeds: dict[str, np.ndarray]) -> np.ndarray:
        rows = len(next(iter(feeds.values())))
        return np.concatenate([run({k: v[i : i + step] for k, v in feeds.items()}) for i in range(0, rows, step)])

    batches = parity_batches(spec, load_encoder(spec, checkpoint_dir(spec)))
    return gate(spec, Precision(precision), compare(spec, batches, chunked), sum(len(b.reference) for b in batches))


def engine_runner(plan: Path) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """`run(feeds) -> first output` for a built engine (needs TensorRT, torch and a GPU);
    same calling convention as export.parity.ort_runner, so parity.compare can gate it."""
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("running a TensorRT engine needs a CUDA GPU; torch sees none")
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
    if engine is None:
        raise EngineError(f"{plan}: TensorRT could not deserialize it (built by another TensorRT version or GPU?)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if n not in inputs]

    def torch_dtype(name: str):
        return torch.from_numpy(np.zeros(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        missing = [n for n in inputs if n not in feeds]
        if missing:
            raise EngineError(f"{plan}: feeds lack inputs {missing} (engine inputs: {inputs})")
        buffers = {}
        for n in inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device="cuda", dtype=torch_dtype(n))
            if not context.set_input_shape(n, tuple(t.shape)):
                lo, _, hi = engine.get_tensor_profile_shape(n, 0)
                raise EngineError(f"{n}: shape {tuple(t.shape)} is outside the engine's profile {tuple(lo)}..{tuple(hi)}")
            context.set_tensor_address(n, t.data_ptr())
            buffers[n] = t
        for n in outputs:
            t = torch.empty(tuple(context.get_tensor_shape(n)), dtype=torch_dtype(n), device="cuda")
            context.set_tensor_address(n, t.data_ptr())
            buffers[n] = t
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"{plan}: execute_async_v3 failed")
        stream.synchronize()
        return buffers[outputs[0]].float().cpu().numpy()

    run.engine, run.runtime = engine, runtime  # the runtime must outlive the engine it deserialized
    return run
