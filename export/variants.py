"""Precision variants of the exported fp32 graph, built with onnxruntime's own tools.

- fp32: onnxruntime.transformers optimizer (SkipLayerNormalization, BiasGelu, ... fusions;
  hardware-independent, so the same file serves CPU and GPU runtimes)
- int8: onnxruntime.quantization, dynamic (weights int8, activations quantized on the fly:
  best on CPU) or static QDQ calibrated on export/data/calibration.txt (the form TensorRT
  and other int8 runtimes consume)
- fp16: float16 weights and compute, fp32 inputs/outputs (for GPU runtimes)
"""

from __future__ import annotations

import logging
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import onnx

log = logging.getLogger(__name__)

# transformers model_type -> onnxruntime.transformers optimizer model_type
_ORT_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "distilbert": "bert",
    "electra": "bert",
    "mpnet": "bert",
    "camembert": "bert",
}


def optimize_fp32(src: Path, dst: Path, model_type: str) -> dict[str, int]:
    """Offline transformer fusions; returns the fused-operator counts that are non-zero."""
    from onnxruntime.transformers import optimizer

    ort_type = _ORT_MODEL_TYPES.get(model_type, "bert")
    # opt_level 0: only the fusion passes, no provider-specific rewrites baked into the file
    model = optimizer.optimize_model(str(src), model_type=ort_type, num_heads=0, hidden_size=0, opt_level=0, use_gpu=False)
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    model.save_model_to_file(str(dst))
    return stats


def int8_node_groups(src: Path, hidden: int, intermediate: int, layers: int) -> tuple[list[str], list[list[str]]]:
    """(FFN down-projection MatMuls, weight MatMuls grouped per layer) of an fp32 graph.

    The FFN down-projection (intermediate -> hidden) reads GELU outputs whose outliers
    per-tensor int8 cannot represent (Bondarenko et al. 2021); it stays fp32 by default.
    Layers are found structurally (topological order), since exported weight names are
    not kept.
    """
    graph = onnx.load(str(src), load_external_data=False).graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    weighted = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(x in shapes for x in n.input)]
    down = [n.name for n in weighted if any(shapes.get(x) == (intermediate, hidden) for x in n.input)]
    per = len(weighted) // layers if layers else 0
    groups = [] if not per or len(weighted) % layers else [[n.name for n in weighted[i * per : (i + 1) * per]] for i in range(layers)]
    return down, groups


def quantize_int8_dynamic(src: Path, dst: Path, keep_fp32: list[str] | None = None) -> str:
    """uint8 weights (U8U8): int8 weights with uint8 activations (U8S8) saturate int16 in
    onnxruntime's AVX2 kernels, so their results would depend on the CPU (export/portability.py)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QUInt8, per_channel=True, nodes_to_exclude=list(keep_fp32 or [])
    )
    return (
        "dynamic U8U8: per-channel uint8 weights, activations quantized at run time (no int16 saturation on any "
        f"x86 CPU); {len(keep_fp32 or [])} MatMuls kept fp32"
    )


def calibration_texts() -> list[str]:
    lines = resources.files("export").joinpath("data/calibration.txt").read_text(encoding="utf-8").splitlines()
    return [l for l in lines if l.strip() and not l.startswith("#")]


def quantize_int8_static(
    src: Path, dst: Path, tokenizer, input_names: list[str], max_length: int, keep_fp32: list[str] | None = None,
    for_tensorrt: bool = False,
) -> str:
    """Static QDQ int8, calibrated: fixed activation scales, so a text's output does not depend
    on what it is batched with. For ONNX Runtime on CPU, uint8 activations and weights (U8U8:
    no int16 saturation on any x86 CPU, see export/portability.py); for TensorRT, the symmetric
    int8 (S8S8) it requires."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    texts = calibration_texts()

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(range(0, len(texts), 8))

        def get_next(self):
            i = next(self._it, None)
            if i is None:
                return None
            enc = tokenizer(texts[i : i + 8], padding=True, truncation=True, max_length=max_length, return_tensors="np")
            return {n: enc[n].astype(np.int64) for n in input_names}

    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8 if for_tensorrt else QuantType.QUInt8,
        weight_type=QuantType.QInt8 if for_tensorrt else QuantType.QUInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_exclude=list(keep_fp32 or []),
        extra_options={"ActivationSymmetric": for_tensorrt, "WeightSymmetric": for_tensorrt},
    )
    form = "symmetric int8 (S8S8, for TensorRT)" if for_tensorrt else "uint8 activations and weights (U8U8)"
    return (
        f"static QDQ: {form}, per-channel weights, activation scales calibrated on {len(texts)} texts "
        f"(batch-invariant); {len(keep_fp32 or [])} MatMuls kept fp32"
    )


def convert_fp16(src: Path, dst: Path) -> str:
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst))
    return "fp16 weights and compute; inputs and outputs stay int64 / fp32"


def op_histogram(path: Path, top: int = 8) -> dict[str, int]:
    return dict(Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node).most_common(top))
