"""A Llama-family decoder written as onnxruntime's fused contrib ops, for a KV cache that is
never copied: kiln's own graph builder (onnxruntime-genai's model builder was the reference
for which ops and shapes; this builds from the same transformers module the parity gate runs).

One step for a batch of sequences, each in its own row of a preallocated cache::

    input_ids [B, S] int64, seqlens_k [B] int32 (each row's total length - 1),
    total_sequence_length [] int32 (the longest row's total length),
    past_key_values.{i}.key/value [B, kv_heads, max_context, head_dim] float32
        -> logits [B, 1, V] (the last position only),
           present.{i}.key/value: the same buffers, written in place

Per layer: ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (the residual
add fused into the norm), q/k/v and gate/up as MatMuls reading one activation (the int4 rewrite,
``export.lm_quant``, fuses each group into one MatMulNBits), ``GroupQueryAttention`` with the
rotary embedding inside it and the past/present buffers shared (bound once through IOBinding,
written in place: no concat, no copy per step), SiLU-gated MLP. The prefill computes logits for
its last position only. A row's new tokens go to positions ``seqlens_k - S + 1 .. seqlens_k`` of
its cache; rows of a batch keep their own lengths (no left padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.lm_export import DecoderShape

MS = "com.microsoft"
OPSET = 17
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
KV_LAYOUT = "slots"  # the manifest's decoder["kv_layout"] for this graph (absent: the exported KV-concat graph)


@dataclass(frozen=True)
class GqaGraph:
    model: object  # onnx.ModelProto
    modules: dict[str, str]  # MatMul node name -> module path (what export.lm_quant reads)
    shape: DecoderShape
    max_context: int


def io_specs(shape: DecoderShape, max_context: int):
    """The fused graph's tensor contract (the slot engine relies on it)."""
    from kiln_core.manifest import TensorSpec

    cache = ["batch", shape.num_kv_heads, max_context, shape.head_dim]
    inputs = [TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"]),
              TensorSpec(name="seqlens_k", dtype="int32", shape=["batch"]),
              TensorSpec(name="total_sequence_length", dtype="int32", shape=[])]
    inputs += [TensorSpec(name=n, dtype="float32", shape=cache) for n in shape.past_names]
    outputs = [TensorSpec(name="logits", dtype="float32", shape=["batch", 1, shape.vocab_size])]
    outputs += [TensorSpec(name=n, dtype="float32", shape=cache) for n in shape.present_names]
    return inputs, outputs


def save(graph: GqaGraph, path) -> None:
    """Write the graph (its weights beside it when the protobuf would pass 2 GB)."""
    import onnx

    external = sum(t.ByteSize() for t in graph.model.graph.initializer) > 1_800_000_000
    onnx.save(graph.model, str(path), save_as_external_data=external, location=path.name + ".data")


def rotary_caches(model, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_context, head_dim / 2] from the model's own rotary module (its inv_freq
    carries any rope scaling, its attention_scaling the amplitude)."""
    import torch

    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().to(torch.float64).cpu().numpy()
    scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    freqs = np.outer(np.arange(max_context, dtype=np.float64), inv_freq)
    return (np.cos(freqs) * scale).astype(np.float32), (np.sin(freqs) * scale).astype(np.float32)


MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def kv_layout(graph_choice: str, architecture: str) -> str:
    """The manifest's kv_layout a spec's generation.graph asks for ("auto": fused where the
    architecture is covered): "slots" or "concat" (an exported graph has no kv_layout)."""
    fused = graph_choice == "fused" or (graph_choice == "auto" and architecture in MODEL_TYPES.values())
    return KV_LAYOUT if fused else "concat"


def supported(model) -> str | None:
    """Why this model cannot be built here (None: it can)."""
    cfg = model.config
    if cfg.model_type not in MODEL_TYPES:
        return f"{cfg.model_type}: the fused graph covers Llama, Mistral and Qwen2 decoders"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act}: the fused graph has SiLU-gated MLPs only"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and cfg.model_type == "mistral":
        return "sliding-window attention is not built yet"
    return None


def build_gqa_decoder(model, max_context: int) -> GqaGraph:
    """The fp32 graph of ``model`` (a transformers LlamaForCausalLM-like module, eval, fp32)."""
    from onnx import TensorProto, helper, numpy_helper

    why = supported(model)
    if why:
        raise ValueError(why)
    cfg = model.config
    shape = DecoderShape.of(cfg)
    heads, kv, hd = int(cfg.num_attention_heads), shape.num_kv_heads, shape.head_dim
    eps = float(cfg.rms_norm_eps)
    sd = {k: v.detach().to("cpu").float().numpy() for k, v in model.state_dict().items()}
    nodes, inits, modules = [], [], {}

    def init(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))

    def matmul(a: str, module: str, out: str, weight: np.ndarray | None = None) -> str:
        """y = a @ W.T of a Linear (no bias in these models; a bias is added when there is one)."""
        name = f"/{module}/MatMul"
        w = weight if weight is not None else sd[f"{module}.weight"]
        node("MatMul", [a, init(f"{module}.weight.T", w.T.astype(np.float32))], [out if f"{module}.bias" not in sd
                                                                                  else f"{out}_nobias"], name)
        # the module path where the dynamo exporter writes it: export.lm_export.weight_matmuls
        # (and so the int8 / int4 rewrites) read this graph as they read an exported one
        nodes[-1].metadata_props.add(key=SCOPES_KEY, value=f"['{module}', 'MatMul']")
        modules[name] = module
        if f"{module}.bias" in sd:
            node("Add", [f"{out}_nobias", init(f"{module}.bias", sd[f"{module}.bias"])], [out], f"/{module}/Add")
        return out

    cos, sin = rotary_caches(model, max_context)
    init("cos_cache", cos)
    init("sin_cache", sin)
    embed = sd["model.embed_tokens.weight"]
    node("Gather", [init("model.embed_tokens.weight", embed), "input_ids"], ["embeds"], "/embed_tokens/Gather")

    residual, pending = "embeds", None  # pending: the last block's output, not yet added to the residual
    for i in range(shape.num_layers):
        p = f"model.layers.{i}"
        ln = init(f"{p}.input_layernorm.weight", sd[f"{p}.input_layernorm.weight"])
        if pending is None:
            node("SimplifiedLayerNormalization", [residual, ln], [f"{p}/attn_in"], f"/{p}/input_layernorm",
                 axis=-1, epsilon=eps, stash_type=1)
        else:
            node("SkipSimplifiedLayerNormalization", [pending, residual, ln],
                 [f"{p}/attn_in", "", "", f"{p}/resid_attn"], f"/{p}/input_layernorm", domain=MS, epsilon=eps)
            residual = f"{p}/resid_attn"
        a = f"{p}/attn_in"
        q = matmul(a, f"{p}.self_attn.q_proj", f"{p}/q")
        k = matmul(a, f"{p}.self_attn.k_proj", f"{p}/k")
        v = matmul(a, f"{p}.self_attn.v_proj", f"{p}/v")
        node("GroupQueryAttention",
             [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
              "total_sequence_length", "cos_cache", "sin_cache"],
             [f"{p}/attn", f"present.{i}.key", f"present.{i}.value"], f"/{p}/self_attn/GroupQueryAttention",
             domain=MS, num_heads=heads, kv_num_heads=kv, do_rotary=1, rotary_interleaved=0,
             scale=float(getattr(model.model.layers[i].self_attn, "scaling", hd ** -0.5)))
        o = matmul(f"{p}/attn", f"{p}.self_attn.o_proj", f"{p}/o")
        post = init(f"{p}.post_attention_layernorm.weight", sd[f"{p}.post_attention_layernorm.weight"])
        node("SkipSimplifiedLayerNormalization", [o, residual, post], [f"{p}/mlp_in", "", "", f"{p}/resid_mlp"],
             f"/{p}/post_attention_layernorm", domain=MS, epsilon=eps)
        residual = f"{p}/resid_mlp"
        m = f"{p}/mlp_in"
        gate = matmul(m, f"{p}.mlp.gate_proj", f"{p}/gate")
        up = matmul(m, f"{p}.mlp.up_proj", f"{p}/up")
        node("Sigmoid", [gate], [f"{p}/gate_sig"], f"/{p}/mlp/Sigmoid")
        node("Mul", [gate, f"{p}/gate_sig"], [f"{p}/gate_act"], f"/{p}/mlp/SiLU")
        node("Mul", [f"{p}/gate_act", up], [f"{p}/gated"], f"/{p}/mlp/Mul")
        pending = matmul(f"{p}/gated", f"{p}.mlp.down_proj", f"{p}/down")

    final = init("model.norm.weight", sd["model.norm.weight"])
    node("SkipSimplifiedLayerNormalization", [pending, residual, final], ["hidden", "", "", "resid_final"],
         "/norm", domain=MS, epsilon=eps)
    # only each row's last new position: a prefill of S tokens pays the head once, not S times.
    # That position is min(seqlens_k, S - 1): S - 1 for a decode step or a chunk on a past, the
    # row's own last token for prompts prefilled together right-padded (no past: seqlens_k = len - 1)
    node("Shape", ["input_ids"], ["ids_shape"], "/last/Shape")
    node("Gather", ["ids_shape", init("seq_dim", np.array(1, np.int64))], ["seq_len"], "/last/S", axis=0)
    node("Sub", ["seq_len", init("one", np.array(1, np.int64))], ["seq_last"], "/last/S_minus_1")
    node("Cast", ["seqlens_k"], ["seqlens_k_64"], "/last/Cast", to=TensorProto.INT64)
    node("Min", ["seqlens_k_64", "seq_last"], ["last_index"], "/last/Min")
    node("Unsqueeze", ["last_index", init("axes_12", np.array([1, 2], np.int64))], ["last_index_3d"], "/last/Unsqueeze")
    node("Shape", ["hidden"], ["hidden_shape"], "/last/hidden_shape")
    node("Slice", ["hidden_shape", init("two", np.array([2], np.int64)), init("three", np.array([3], np.int64))],
         ["hidden_width"], "/last/width")
    node("Concat", [init("one_1d", np.array([1], np.int64)), "one_1d", "hidden_width"], ["gather_shape"],
         "/last/gather_shape", axis=0)  # [1, 1, H]: broadcast against the index's [B, 1, 1]
    node("Expand", ["last_index_3d", "gather_shape"], ["last_index_exp"], "/last/Expand")
    node("GatherElements", ["hidden", "last_index_exp"], ["hidden_last"], "/last/GatherElements", axis=1)
    head = sd.get("lm_head.weight", embed)
    matmul("hidden_last", "lm_head", "logits", weight=head)

    cache = ["batch", kv, max_context, hd]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, shape.vocab_size])]
    for i in range(shape.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, cache))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, cache))
    graph = helper.make_graph(nodes, "kiln_gqa_decoder", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="kiln")
    proto.ir_version = 9  # onnx's checker knows no contrib op; onnxruntime checks the graph when it opens it
    return GqaGraph(proto, modules, shape, max_context)
