"""Causal LM -> one fp32 ONNX graph with an explicit KV cache, and its quantized variants.

The graph computes one step for a batch of sequences:

    (input_ids, attention_mask, position_ids, past_key_values.{i}.key/value ...)
        -> (logits, present.{i}.key/value ...)

with the names and axes of :func:`io_specs`; the generation engine feeds the presents of
one step back as the past of the next. A prefill is the same graph with an empty past
(``past = 0``). Llama, Qwen2 and Mistral-family checkpoints (anything transformers
serves as a decoder-only ``AutoModelForCausalLM`` with a ``DynamicCache``) export alike.

A GGUF source is dequantized to fp32 once and saved as a plain checkpoint folder
(``<export_dir>/checkpoint``); everything downstream, the served tokenizer included,
reads that folder.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln_core.manifest import TensorSpec, sha256
from kiln_core.sources import checkpoint_dir, gguf_file
from kiln_core.spec import DeploymentSpec, GgufSource

log = logging.getLogger(__name__)

SOURCE_STAMP = "kiln-source.json"  # written last into a converted checkpoint: its presence means complete
_EXTERNAL_DATA_ABOVE = int(1.8e9)  # a single-file ONNX protobuf must stay under 2 GB


@dataclass(frozen=True)
class DecoderShape:
    """What the KV-cache graph's shapes depend on."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def of(cls, config) -> "DecoderShape":
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        return cls(
            num_layers=int(config.num_hidden_layers),
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            vocab_size=int(config.vocab_size),
        )

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]


def io_specs(shape: DecoderShape) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The fixed tensor contract of the KV-cache graph (the generation engine relies on it)."""
    cache = ["batch", shape.num_kv_heads, "past", shape.head_dim]
    inputs = [
        TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"]),
        TensorSpec(name="attention_mask", dtype="int64", shape=["batch", "total"]),
        TensorSpec(name="position_ids", dtype="int64", shape=["batch", "sequence"]),
    ] + [TensorSpec(name=n, dtype="float32", shape=cache) for n in shape.past_names]
    outputs = [TensorSpec(name="logits", dtype="float32", shape=["batch", "sequence", shape.vocab_size])] + [
        TensorSpec(name=n, dtype="float32", shape=["batch", shape.num_kv_heads, "total", shape.head_dim])
        for n in shape.present_names
    ]
    return inputs, outputs


# --- loading ---------------------------------------------------------------------------


def load_causal_lm(spec: DeploymentSpec):
    """(model, tokenizer, checkpoint_dir): fp32, eager attention, eval mode.

    A GGUF source is converted to ``<export_dir>/checkpoint`` first (reused when that
    conversion is complete and came from the same file).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = checkpoint_dir(spec)
    if isinstance(spec.source, GgufSource):
        convert_gguf(gguf_file(spec), ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{ckpt}: {model.config.model_type} is an encoder-decoder; text-generation exports decoder-only LMs")
    return model, tokenizer, ckpt


def convert_gguf(path: Path, out: Path) -> Path:
    """Dequantize a GGUF file to a plain fp32 checkpoint folder (model, tokenizer, chat template).

    transformers loads GGUF with a quantizer attached that refuses ``save_pretrained``;
    a plain model built from the same config and state dict saves normally.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stamp = {"gguf": str(path), "sha256": sha256(path)}
    if (out / SOURCE_STAMP).is_file() and json.loads((out / SOURCE_STAMP).read_text()) == stamp:
        return out
    log.info("dequantizing %s to %s", path, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    (out / SOURCE_STAMP).unlink(missing_ok=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / SOURCE_STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    return out


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the generation config's, the model config's, the tokenizer's."""
    ids: list[int] = []
    for v in (getattr(model.generation_config, "eos_token_id", None), model.config.eos_token_id, tokenizer.eos_token_id):
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("the checkpoint names no end-of-sequence token (generation_config, config or tokenizer)")
    return ids


def decoder_info(model, tokenizer, max_context: int) -> dict:
    """The manifest's ``decoder`` section: what the generation engine needs besides the graph."""
    shape = DecoderShape.of(model.config)
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else tokenizer.bos_token_id
    return {
        "num_layers": shape.num_layers,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size,
        "eos_token_ids": eos_token_ids(model, tokenizer),
        "bos_token_id": None if bos is None else int(bos),
        "max_context": int(max_context),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


# --- export ----------------------------------------------------------------------------


class _KVCacheStep(torch.nn.Module):
    """Flat tensors in, flat tensors out: the cache is rebuilt as a DynamicCache inside."""

    def __init__(self, model: torch.nn.Module, num_layers: int):
        super().__init__()
        self.model, self.num_layers = model, num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        # no config: every layer a plain DynamicLayer, so a present is always past + new
        # (sliding-window models still apply their window through the attention mask)
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        presents = []
        for layer in out.past_key_values.layers[: self.num_layers]:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def needs_external_data(model: torch.nn.Module) -> bool:
    """Whether the fp32 graph would pass the 2 GB protobuf limit (tied embeddings count twice)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * 4
    if getattr(model.config, "tie_word_embeddings", False):
        total += model.get_input_embeddings().weight.numel() * 4  # exported once for Gather, once transposed for MatMul
    return total > _EXTERNAL_DATA_ABOVE


def export_lm(model: torch.nn.Module, out_path: Path, opset: int) -> Path:
    """Trace with batch 2, 3 new tokens and 4 cached ones; batch, sequence, past and total stay dynamic."""
    shape = DecoderShape.of(model.config)
    inputs, outputs = io_specs(shape)
    b, s, p = 2, 3, 4  # distinct sizes > 1, so no axis is specialized
    ids = torch.randint(0, shape.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    past = [torch.randn(b, shape.num_kv_heads, p, shape.head_dim) for _ in shape.past_names]
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=1, max=131072)
    past_len, total = torch.export.Dim("past", min=0, max=131072), torch.export.Dim("total", min=1, max=131072)
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past_len} for _ in shape.past_names),
    }
    external = needs_external_data(model)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    step = _KVCacheStep(model, shape.num_layers).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step,
            (ids, mask, pos, *past),
            str(out_path),
            input_names=[t.name for t in inputs],
            output_names=[t.name for t in outputs],
            dynamic_shapes=dynamic,
            opset_version=opset,
            dynamo=True,
            external_data=external,
            verbose=False,
        )
    _name_axes_and_check(out_path, inputs, outputs)
    return out_path


def _name_axes_and_check(path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Give the graph's symbolic axes the manifest's names ('past + sequence' -> 'total') and
    fail now if the exported names or ranks differ from the contract."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for values, specs in ((model.graph.input, inputs), (model.graph.output, outputs)):
        got = [v.name for v in values]
        if got != [t.name for t in specs]:
            raise RuntimeError(f"exported graph has tensors {got}, expected {[t.name for t in specs]}")
        for v, t in zip(values, specs):
            dims = v.type.tensor_type.shape.dim
            if len(dims) != len(t.shape):
                raise RuntimeError(f"{t.name}: exported rank {len(dims)}, expected {len(t.shape)} ({t.shape})")
            for d, want in zip(dims, t.shape):
                if isinstance(want, str):
                    d.dim_param = want
                elif d.HasField("dim_value") and d.dim_value != want:
                    raise RuntimeError(f"{t.name}: exported shape {[x.dim_value or x.dim_param for x in dims]}, expected {t.shape}")
    onnx.save(model, str(path))


# --- quantized variants ----------------------------------------------------------------
#
# Measured on SmolLM2-135M (held-out perplexity ratio vs the fp32 graph): dynamic int8 of
# every MatMul 1.53 (activations quantized per tensor: the FFN down-projection's inputs carry
# outliers); with the down-projections kept fp32 1.02-1.04. int4 ignoring the checkpoint's
# grid (MatMulNBits, block 32, symmetric) 1.14; on the GGUF's own Q4_1 grid (export/lm_quant.py,
# exact codes + block-minimum correction, 8-bit lm_head) 1.003-1.010.


def has_external_data(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)


def weight_matmuls(graph) -> dict[str, str]:
    """MatMul nodes with a constant weight -> the module they came from ('model.layers.0.mlp.down_proj').

    The dynamo exporter records each node's module path in its metadata; '' where it is absent.
    """
    consts = {t.name for t in graph.initializer}
    out = {}
    for n in graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in consts:
            meta = {p.key: p.value for p in n.metadata_props}
            scopes = meta.get("pkg.torch.onnx.name_scopes", "[]").strip("[]").replace("'", "").split(", ")
            out[n.name] = scopes[-2] if len(scopes) >= 2 else ""
    return out


def fold_transposed_weights(model) -> int:
    """Replace Transpose(initializer) -> MatMul with a transposed initializer, in place.

    A tied lm_head is exported as Transpose(embedding); folding it makes the head a
    constant-weight MatMul the quantizers can see (the embedding Gather keeps the original).
    """
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    users: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            users.setdefault(x, []).append(n)
    folded = 0
    for t in [n for n in g.node if n.op_type == "Transpose" and n.input and n.input[0] in inits]:
        consumers = users.get(t.output[0], [])
        if t.output[0] in {o.name for o in g.output} or not consumers:
            continue
        if not all(u.op_type == "MatMul" and list(u.input).index(t.output[0]) == 1 for u in consumers):
            continue
        w = numpy_helper.to_array(inits[t.input[0]])
        perm = [a.ints for a in t.attribute if a.name == "perm"]
        g.initializer.append(numpy_helper.from_array(w.transpose(*perm[0]) if perm else w.T, t.output[0]))
        g.node.remove(t)
        folded += 1
    return folded


class _QuietQuantizers:
    """onnxruntime's quantizers log every node at INFO on the root logger (and one module
    calls logging.basicConfig at import): keep the root logger quiet while they run."""

    def __enter__(self):
        root = logging.getLogger()
        self.level = root.level
        root.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self.level)


def quantize_int8(src: Path, dst: Path) -> str:
    """Dynamic int8, per-channel uint8 MatMul weights (U8U8: int8 weights saturate onnxruntime's
    AVX2 kernels, perplexity x136.9 seen on an AVX2-only CPU); FFN down-projections stay fp32;
    the tied lm_head is quantized."""
    import onnx

    with _QuietQuantizers():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        model = onnx.load(str(src))
        folded = fold_transposed_weights(model)
        keep = [name for name, module in weight_matmuls(model.graph).items() if module.endswith("down_proj")]
        external = has_external_data(src)
        tmp = dst.with_name(dst.stem + ".prequant.onnx")
        onnx.save(model, str(tmp), save_as_external_data=external, location=tmp.name + ".data")
        try:
            quantize_dynamic(
                str(tmp), str(dst), weight_type=QuantType.QUInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                nodes_to_exclude=keep, use_external_data_format=external,
                # the fused graph's contrib ops (GroupQueryAttention, ...) stop onnx's shape inference:
                # what it cannot type is float, as every activation of these graphs is
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        finally:
            tmp.unlink(missing_ok=True)
            (tmp.parent / (tmp.name + ".data")).unlink(missing_ok=True)
    return (
        "dynamic int8 U8U8: per-channel uint8 MatMul weights, activations quantized at run time (no int16 "
        "saturation on any x86 CPU; not batch-invariant: one activation scale per batch); "
        f"{len(keep)} FFN down-projections kept fp32 (outlier inputs); {folded} tied weight(s) untied for the lm_head"
    )


def quantize_int4(src: Path, dst: Path, block_size: int = 32, *, accuracy_level: int = 4, pad_invariant: bool = True) -> str:
    """4-bit MatMul weights, grid-aware (export/lm_quant.py); returns the manifest's notes.

    Weights already on a 4-bit grid of their own (a dequantized GGUF Q4_1 / Q4_0
    checkpoint) are rewritten exactly: their codes plus the block minima as a small
    correction. A checkpoint with no grid gets onnxruntime's 4-bit quantizer. The lm_head
    (a tied one untied first) and off-grid weights get 8-bit codes. ``accuracy_level`` 4
    quantizes activations to int8 per block inside MatMulNBits (fast); 0 computes in fp32
    (the grid layers then reproduce the fp32 graph to float rounding, slowly).
    ``pad_invariant`` rewrites the attention softmax so that int8 activation rounding cannot
    amplify padding's float noise: a left-padded batch row decodes exactly as alone.
    """
    from dataclasses import replace

    import onnx

    from export import lm_quant

    model = onnx.load(str(src))
    folded = fold_transposed_weights(model)
    report = lm_quant.quantize_lm_int4(
        model, weight_matmuls(model.graph), block=block_size,
        grid_format=replace(lm_quant.GRID_FORMAT, accuracy_level=accuracy_level),
        head_format=replace(lm_quant.HEAD_FORMAT, accuracy_level=accuracy_level),
    )
    notes = report.notes() + (f"; {folded} tied weight(s) untied for the lm_head" if folded else "")
    if pad_invariant:
        n = lm_quant.pad_invariant_attention(model)
        notes += f"; attention: {n} softmaxes summed in float64, probs @ V with 2+ query rows (batch-invariant)"
    external = has_external_data(src)
    onnx.save(model, str(dst), save_as_external_data=external, location=dst.name + ".data")
    return notes
