"""Is a quantized graph's arithmetic the same on every x86-64 CPU?

onnxruntime's int8 GEMM (MLAS) multiplies uint8 activations by int8 weights (U8S8). On
AVX2 and AVX-512 machines *without VNNI* its kernel uses VPMADDUBSW, which adds each
pair of adjacent products along K into a saturating int16; VNNI machines (VPDPBUSD) sum
into int32 and never saturate. So the same U8S8 graph can be right on the machine that
built it and wrong elsewhere: seen as perplexity x1.04 on an AVX-512 VNNI machine and
x136.9 on an AVX2-only one (onnxruntime's quantization docs warn of this). U8U8 (uint8
weights: the kernel widens to int16 and uses VPMADDWD) and 7-bit weights
(``reduce_range``: |pair sum| <= 255 * 128 < 32768) cannot saturate.

This module decides that from the weights alone (a worst case over every possible uint8
activation), so the verdict does not depend on the machine that runs the check, and
emulates the AVX2 kernel in numpy to measure what saturation does to real outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

INT16_MAX, INT16_MIN = 32767, -32768
_INTEGER_MATMULS = ("MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat")


def worst_pair_sums(weights: np.ndarray) -> tuple[int, int]:
    """(largest, smallest) value a pair of adjacent products along K can reach for any uint8
    activations: a0*w0 + a1*w1 with a in 0..255. ``weights``: int8 [K, N] (MatMul orientation)."""
    w = np.asarray(weights, dtype=np.int64)
    if w.shape[0] % 2:
        w = np.concatenate([w, np.zeros((1,) + w.shape[1:], np.int64)])
    w0, w1 = w[0::2], w[1::2]
    hi = 255 * (np.maximum(w0, 0) + np.maximum(w1, 0))
    lo = 255 * (np.minimum(w0, 0) + np.minimum(w1, 0))
    return int(hi.max(initial=0)), int(lo.min(initial=0))


def u8s8_can_saturate(weights: np.ndarray) -> bool:
    """Whether some uint8 input drives a VPMADDUBSW pair sum out of int16 with these int8 weights."""
    hi, lo = worst_pair_sums(weights)
    return hi > INT16_MAX or lo < INT16_MIN


def matmul_u8s8_avx2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What the AVX2 U8S8 kernel computes: int32 sums of int16-saturated pair products.
    ``a``: uint8 [M, K], ``b``: int8 [K, N] -> int32 [M, N]."""
    a = np.asarray(a, dtype=np.int32)
    b = np.asarray(b, dtype=np.int32)
    if a.shape[1] % 2:
        a = np.pad(a, ((0, 0), (0, 1)))
        b = np.pad(b, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * b[None, 0::2] + a[:, 1::2, None] * b[None, 1::2]  # [M, K/2, N]
    return np.clip(pairs, INT16_MIN, INT16_MAX).sum(axis=1, dtype=np.int64).astype(np.int32)


def matmul_exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The saturation-free reference: plain integer matmul in int64."""
    return np.asarray(a, dtype=np.int64) @ np.asarray(b, dtype=np.int64)


@dataclass(frozen=True)
class IntegerMatMul:
    node: str
    op: str
    activation: str  # "uint8" | "int8" | "float" (weight-only)
    weight: str  # "uint8" | "int8"
    saturates: bool  # some activation overflows int16 in a VPMADDUBSW kernel


def integer_matmuls(path: Path) -> list[IntegerMatMul]:
    """Every integer MatMul with a constant weight in an ONNX graph, and whether its int8
    weights can saturate the AVX2/AVX-512 (non-VNNI) U8S8 kernel."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm"):  # QDQ form: DequantizeLinear(int weights) feeding a float MatMul
            qdq = _qdq_matmul(n, inits, producers)
            if qdq is not None:
                out.append(qdq)
            continue
        if n.op_type not in _INTEGER_MATMULS:
            continue
        b_index = 3 if n.op_type == "QLinearMatMul" else 1
        b_name = n.input[b_index]
        if b_name not in inits:  # weights may sit behind a DequantizeLinear / Transpose: not handled
            continue
        w = numpy_helper.to_array(inits[b_name])
        a_name = n.input[0]
        if n.op_type == "DynamicQuantizeMatMul":
            act = "uint8"  # quantized inside the op
        else:
            src = producers.get(a_name)
            act = "uint8" if src is not None and src.op_type == "DynamicQuantizeLinear" else _dtype_of(model, a_name)
        weight = "int8" if w.dtype == np.int8 else "uint8" if w.dtype == np.uint8 else str(w.dtype)
        saturates = act == "uint8" and weight == "int8" and u8s8_can_saturate(w.reshape(w.shape[0], -1))
        out.append(IntegerMatMul(n.name, n.op_type, act, weight, saturates))
    return out


def _qdq_matmul(n, inits, producers) -> IntegerMatMul | None:
    """A MatMul whose weight is DequantizeLinear(constant int8/uint8): onnxruntime fuses it into
    an integer kernel. Activations from a QuantizeLinear of int8 are shifted to uint8 by the
    kernel (the same VPMADDUBSW path), so they are judged as uint8."""
    from onnx import numpy_helper

    deq = producers.get(n.input[1])
    if deq is None or deq.op_type != "DequantizeLinear" or deq.input[0] not in inits:
        return None
    w = numpy_helper.to_array(inits[deq.input[0]])
    a_deq = producers.get(n.input[0])
    if a_deq is None or a_deq.op_type != "DequantizeLinear":
        return None  # weight-only: float activations, no integer kernel
    weight = "int8" if w.dtype == np.int8 else "uint8" if w.dtype == np.uint8 else str(w.dtype)
    saturates = weight == "int8" and u8s8_can_saturate(w.reshape(w.shape[0], -1))
    return IntegerMatMul(n.name, "QDQ MatMul", "uint8", weight, saturates)


def _dtype_of(model, name: str) -> str:
    import onnx

    for v in list(model.graph.input) + list(model.graph.value_info):
        if v.name == name:
            return onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
    return "uint8"  # the dynamic quantizer's activations are uint8 unless told otherwise


def portability_problems(path: Path) -> list[str]:
    """Why this graph's numerics depend on the CPU (empty: they do not)."""
    bad = [m for m in integer_matmuls(path) if m.saturates]
    if not bad:
        return []
    return [
        f"{len(bad)} int8 MatMuls with uint8 activations x int8 weights (U8S8) can saturate int16 in "
        "onnxruntime's AVX2 / AVX-512-without-VNNI kernels (VPMADDUBSW), so their output depends on the "
        f"CPU (e.g. {bad[0].node}); use uint8 weights (U8U8) or 7-bit weights (reduce_range)"
    ]
