"""Block-quantized weights for causal-LM graphs: find a checkpoint's own 4-bit grid and
rewrite MatMuls as onnxruntime ``MatMulNBits`` that reproduce it exactly.

A weight ``W [K, N]`` (ONNX orientation, ``y = A @ W``) is cut into blocks of ``block``
rows per column. In every block a Q4_1-style grid holds ``w = d * q + m`` with ``q`` in
0..15, ``m`` the block minimum and ``d = (max - min) / 15`` (ggml rounds ``d`` and ``m``
to fp16; a Q4_0 block ``d * (q - 8)`` is such a grid too, with ``d = absmax / 8``). A GGUF
Q4_1 checkpoint dequantized to fp32 is on its grid exactly; an ordinary fp16/bf16
checkpoint is not. :func:`fit_grid` recovers ``(q, d, m)`` from the weight alone and says
whether ``d * q + m`` reproduces it to float32 rounding.

``MatMulNBits`` dequantizes ``(q - zero_point) * scale``. A float zero point ``-m / d``
would be exact, but sends onnxruntime down a slow path; an integer zero point forces
``m`` onto the ``d`` grid (~9% RMS weight error on SmolLM2). Here the codes keep an
integer zero point ``z`` and the minima go into a small correction::

    y = MatMulNBits(A, q, d, z) + BlockSum(A) @ Mc,   Mc[j, n] = m[j, n] + z * d[j, n]

with ``BlockSum(A)[..., j] = sum(A[..., j*block:(j+1)*block])`` computed once per
distinct ``A`` as ``A @ S`` with a 0/1 indicator ``S [K, K/block]`` (one MatMul whatever
A's rank). MatMuls reading one ``A`` (q/k/v; gate/up) become one MatMulNBits over their
concatenated columns, then a Split. ``Mc`` is ``K/block`` rows: as many bytes as the fp32
scales, ~1/4 of the 4-bit codes.

Weights on no 4-bit grid (a tied lm_head, the embedding transposed) get the same form with
8-bit codes of their blocks' min/max grid. :func:`pad_invariant_attention` makes the
graph's attention order-stable, so that int8 activation rounding cannot turn padding's
float noise into different tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

BLOCK = 32
MS_DOMAIN = "com.microsoft"
_F32_EPS = float(np.finfo(np.float32).eps)
GRID_RTOL = 8 * _F32_EPS  # a grid reproduces each value to a few float32 ulps of its block's magnitude


# --- the maths ------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockCodes:
    """``w[k, n] == scales[k // block, n] * codes[k, n] + minima[k // block, n]`` (up to rounding)."""

    codes: np.ndarray  # uint8 [K, N], 0 .. 2**bits - 1
    scales: np.ndarray  # float32 [K / block, N], >= 0
    minima: np.ndarray  # float32 [K / block, N]
    bits: int
    block: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        k, n = self.codes.shape
        q = self.codes.reshape(k // self.block, self.block, n).astype(np.float32)
        return (self.scales[:, None, :] * q + self.minima[:, None, :]).reshape(k, n)


@dataclass(frozen=True)
class GridFit:
    """How well a weight sits on a 4-bit grid of its own blocks."""

    codes: BlockCodes
    max_abs_error: float  # max |d*q + m - w|
    max_rel_error: float  # max of |d*q + m - w| / (|m| + 15 d), per block
    on_grid: bool  # max_rel_error <= rtol in every block (constant blocks, d == 0, fit trivially)
    scale_kinds: dict[str, int]  # which candidate scale each block kept -> block count


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    k, n = w.shape
    if k % block:
        raise ValueError(f"weight of shape {w.shape}: K = {k} is not a multiple of the block size {block}")
    return np.asarray(w, dtype=np.float32).reshape(k // block, block, n)


def _codes_for(b: np.ndarray, lo: np.ndarray, d: np.ndarray, levels: int) -> np.ndarray:
    safe = np.where(d > 0, d, 1.0).astype(np.float32)
    return np.clip(np.rint((b - lo) / safe), 0, levels).astype(np.uint8)


def _scale_candidates(lo: np.ndarray, hi: np.ndarray, levels: int) -> dict[str, np.ndarray]:
    """Per-block scales a 4-bit block format could have used, rounded to fp16 (what ggml
    stores) and not: Q4_1's ``(max - min) / 15`` and Q4_0's ``absmax / 8`` (whose grid
    ``d * (q - 8)`` is ``d * q' + min`` with ``q' = q - q_min``)."""
    span = ((hi.astype(np.float64) - lo) / levels).astype(np.float32)
    absmax = (np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64) / 8).astype(np.float32)
    out = {}
    for kind, raw in (("(max-min)/15", span), ("absmax/8", absmax)):
        out[f"{kind} fp16"] = raw.astype(np.float16).astype(np.float32)
        out[f"{kind} fp32"] = raw
    return out


def fit_grid(w: np.ndarray, block: int = BLOCK, rtol: float = GRID_RTOL) -> GridFit:
    """Recover ``(q, d, m)`` of a 4-bit grid ``w = d * q + m`` (q in 0..15) from ``w [K, N]``;
    blocks run along K, ``m`` is the block minimum.

    Each block keeps the candidate scale (:func:`_scale_candidates`) that reproduces it
    best; the weight is on the grid when every block is reproduced to float32 rounding.
    """
    levels = 15
    b = _blocks(w, block)
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    candidates = _scale_candidates(lo, hi, levels)
    best_err = best_q = best_d = best_kind = None
    for i, d in enumerate(candidates.values()):
        q = _codes_for(b, lo, d, levels)  # clipped: a scale too small for its block shows as error
        err = np.abs(d * q.astype(np.float32) + lo - b).max(axis=1, keepdims=True)
        if best_err is None:
            best_err, best_q, best_d, best_kind = err, q, d, np.zeros(err.shape, np.int8)
            continue
        better = err < best_err
        best_err, best_d = np.where(better, err, best_err), np.where(better, d, best_d)
        best_q, best_kind = np.where(better, q, best_q), np.where(better, np.int8(i), best_kind)
    magnitude = np.abs(lo) + levels * best_d
    rel = np.where(magnitude > 0, best_err / np.where(magnitude > 0, magnitude, 1.0), 0.0)
    k, n = w.shape
    names = list(candidates)
    kinds = {names[i]: int((best_kind == i).sum()) for i in range(len(names)) if (best_kind == i).any()}
    return GridFit(
        codes=BlockCodes(best_q.reshape(k, n), best_d[:, 0, :], lo[:, 0, :], 4, block),
        max_abs_error=float(best_err.max()),
        max_rel_error=float(rel.max()),
        on_grid=bool((rel <= rtol).all()),
        scale_kinds=kinds,
    )


def minmax_codes(w: np.ndarray, bits: int, block: int = BLOCK) -> BlockCodes:
    """Round a weight that is on no grid onto its blocks' own min/max grid of ``2**bits`` levels."""
    levels = 2**bits - 1
    b = _blocks(w, block)
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    d = ((hi.astype(np.float64) - lo) / levels).astype(np.float32)
    k, n = w.shape
    return BlockCodes(_codes_for(b, lo, d, levels).reshape(k, n), d[:, 0, :], lo[:, 0, :], bits, block)


def pack_codes(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """MatMulNBits input B: uint8 ``[N, K / block, block * bits / 8]``; for 4 bits the low
    nibble holds the even element along K."""
    k, n = codes.shape
    per_col = np.ascontiguousarray(codes.T).astype(np.uint8).reshape(n, k // block, block)
    if bits == 8:
        return per_col
    if bits == 4:
        return (per_col[..., 0::2] & 0x0F) | ((per_col[..., 1::2] & 0x0F) << 4)
    raise ValueError(f"bits = {bits}: packing supports 4 and 8")


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``[K, N]`` codes."""
    n = packed.shape[0]
    if bits == 8:
        per_col = packed
    else:
        per_col = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, packed.shape[1], -1)
    return per_col.reshape(n, k).T.copy()


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits zero_points from ``[K / block, N]`` integers: uint8 ``[N, ceil(K / block * bits / 8)]``,
    two 4-bit values per byte (low nibble: the even block)."""
    z = np.ascontiguousarray(np.asarray(zero_points).T).astype(np.uint8)
    if bits == 8:
        return z
    if bits != 4:
        raise ValueError(f"bits = {bits}: packing supports 4 and 8")
    if z.shape[1] % 2:
        z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], axis=1)
    return (z[:, 0::2] & 0x0F) | ((z[:, 1::2] & 0x0F) << 4)


def block_indicator(k: int, block: int) -> np.ndarray:
    """``S [K, K / block]`` with ``S[i, i // block] = 1``: ``A @ S`` sums A's blocks."""
    s = np.zeros((k, k // block), np.float32)
    s[np.arange(k), np.arange(k) // block] = 1.0
    return s


# --- formats --------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """How one group of weights is written.

    ``zero_point``: "zero" writes explicit zero points 0 (the kernel sees unsigned codes;
    the correction is the minima), "default" omits them (the op's default ``2**(bits-1)``;
    the correction is ``m + 2**(bits-1) * d``). Both are exact at accuracy_level 0. At
    accuracy_level 4 (activations quantized to int8 per block) "default" is as fast and
    ~4x closer to fp32 (KL on SmolLM2's held-out text 0.003 vs 0.012): centred codes keep
    the activation rounding error small, and the offsets are applied in fp32.
    """

    bits: int = 4
    accuracy_level: int = 4
    zero_point: Literal["zero", "default"] = "default"
    block: int = BLOCK  # for min/max codes; grid codes keep the block they were found in

    def describe(self, block: int | None = None) -> str:
        block = block or self.block
        zp = "zero point 0, minima" if self.zero_point == "zero" else f"zero point {2 ** (self.bits - 1)}, offsets"
        return (f"MatMulNBits bits {self.bits} block {block} accuracy_level {self.accuracy_level}, "
                f"{zp} as a BlockSum correction")


# --- the graph rewrite ----------------------------------------------------------------


def _ensure_ms_opset(model) -> None:
    import onnx

    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


class Rewriter:
    """Replaces constant-weight MatMuls of one graph with MatMulNBits + a BlockSum correction.

    Call :meth:`replace` for each MatMul, then :meth:`apply` once: new nodes take the
    replaced node's place in the (topological) order; block sums of one activation are
    shared by every MatMul that reads it.
    """

    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self._inits = {t.name: t for t in self.graph.initializer}
        self._to_array = numpy_helper.to_array
        self._from_array = numpy_helper.from_array
        self._replacement: dict[str, list] = {}  # MatMul node name -> its new nodes
        self._new_inits: list = []
        self._sums: dict[tuple[str, int, int], str] = {}
        self._indicators: dict[tuple[int, int], str] = {}
        self._dropped: set[str] = set()

    def weight(self, node) -> np.ndarray:
        return self._to_array(self._inits[node.input[1]])

    def _init(self, name: str, value: np.ndarray) -> str:
        self._new_inits.append(self._from_array(np.ascontiguousarray(value), name))
        return name

    def _block_sum(self, a: str, k: int, block: int, nodes: list) -> str:
        import onnx

        key = (a, k, block)
        if key not in self._sums:
            ind = self._indicators.get((k, block))
            if ind is None:
                ind = self._init(f"kiln_blocksum_S_{k}_{block}", block_indicator(k, block))
                self._indicators[(k, block)] = ind
            out = f"{a}_blocksum{block}"
            nodes.append(onnx.helper.make_node("MatMul", [a, ind], [out], name=f"kiln_blocksum{block}/{a}"))
            self._sums[key] = out
        return self._sums[key]

    def _nbits(self, name: str, a: str, codes: np.ndarray, scales: np.ndarray, bits: int, block: int,
               level: int, zero: bool, out: str):
        import onnx

        k, n = codes.shape
        inputs = [
            a,
            self._init(f"{name}_B", pack_codes(codes, bits, block)),
            self._init(f"{name}_scales", np.ascontiguousarray(scales.T).astype(np.float32)),
        ]
        if zero:
            inputs.append(self._init(f"{name}_zp", pack_zero_points(np.zeros(scales.shape, np.uint8), bits)))
        return onnx.helper.make_node(
            "MatMulNBits", inputs, [out], name=name, domain=MS_DOMAIN,
            K=k, N=n, bits=bits, block_size=block, accuracy_level=level,
        )

    def replace(self, node, codes: BlockCodes, fmt: Format) -> None:
        self.replace_group([node], [codes], fmt)

    def replace_group(self, nodes: list, codes: list[BlockCodes], fmt: Format) -> None:
        """Several MatMuls reading one activation (q/k/v; gate/up) as one MatMulNBits over their
        concatenated columns, one correction, then a Split into their outputs: fewer, larger
        kernels; each column's arithmetic is unchanged."""
        import onnx

        a = nodes[0].input[0]
        if any(n.input[0] != a for n in nodes) or len({(c.bits, c.block, c.shape[0]) for c in codes}) != 1:
            raise ValueError(f"{[n.name for n in nodes]}: a group must share its input, bits, block and K")
        cat = codes[0] if len(codes) == 1 else BlockCodes(
            np.concatenate([c.codes for c in codes], axis=1), np.concatenate([c.scales for c in codes], axis=1),
            np.concatenate([c.minima for c in codes], axis=1), codes[0].bits, codes[0].block,
        )
        base = nodes[0].name or nodes[0].output[0]
        y = nodes[0].output[0] if len(nodes) == 1 else f"{base}_fused"
        k, block, level = cat.shape[0], cat.block, fmt.accuracy_level
        new: list = []
        s = self._block_sum(a, k, block, new)
        zero = fmt.zero_point == "zero"
        if fmt.bits != cat.bits:
            raise ValueError(f"{base}: {cat.bits}-bit codes for a {fmt.bits}-bit format")
        offset = 0.0 if zero else float(2 ** (cat.bits - 1))
        new.append(self._nbits(f"{base}_nbits", a, cat.codes, cat.scales, cat.bits, block, level, zero, f"{y}_q"))
        correction = (cat.minima.astype(np.float64) + offset * cat.scales).astype(np.float32)
        m = self._init(f"{base}_blockmin", correction)
        new.append(onnx.helper.make_node("MatMul", [s, m], [f"{y}_corr"], name=f"{base}_corr"))
        new.append(onnx.helper.make_node("Add", [f"{y}_q", f"{y}_corr"], [y], name=f"{base}_add"))
        if len(nodes) > 1:
            widths = self._init(f"{base}_split", np.array([c.shape[1] for c in codes], np.int64))
            outs = [n.output[0] for n in nodes]
            new.append(onnx.helper.make_node("Split", [y, widths], outs, name=f"{base}_split", axis=-1))
        self._replacement[nodes[0].name] = new
        for n in nodes[1:]:
            self._replacement[n.name] = []
        self._dropped.update(n.input[1] for n in nodes)

    def apply(self) -> None:
        g = self.graph
        new_nodes = []
        for n in g.node:
            new_nodes.extend(self._replacement.get(n.name, [n]) if n.op_type == "MatMul" else [n])
        still_used = {x for n in new_nodes for x in n.input}
        keep = [t for t in g.initializer if t.name not in self._dropped or t.name in still_used]
        del g.node[:]
        g.node.extend(new_nodes)
        del g.initializer[:]
        g.initializer.extend(keep + self._new_inits)
        _ensure_ms_opset(self.model)


# --- batch invariance -----------------------------------------------------------------
#
# A left-padded batch row must decode exactly as the same prompt alone. MatMulNBits (and
# its block sums) give each row the same bits whatever the batch, but the fp32 attention
# does not: with padding the real scores sit at other positions of the softmax row, so a
# vectorized sum groups them differently, and onnxruntime's one-query-row MatMul (decode)
# groups probs @ V along the keys differently again. In fp32 that is ~1e-5 on the logits;
# int8 activation rounding amplifies it to flipped greedy tokens (SmolLM2: 2 of 3 prompts at
# the first token). Summing the softmax in float64 and giving probs @ V a second (duplicate)
# query row makes both order-stable: leading zeros add exactly nothing to a K-sequential sum.


def pad_invariant_attention(model) -> int:
    """Rewrite ``Softmax(axis=-1)`` (and the MatMuls reading it as their first input) in place;
    returns how many softmaxes were rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    const = {"kiln_axis_m1": [-1], "kiln_axis_m2": [-2], "kiln_zero": [0], "kiln_end": [2**62]}
    g.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in const.items())
    probs, out, count = set(), [], 0
    for n in g.node:
        axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
        if n.op_type == "Softmax" and axis == -1:
            x, y, b = n.input[0], n.output[0], n.name or n.output[0]
            out += [
                helper.make_node("ReduceMax", [x, "kiln_axis_m1"], [f"{b}_max"], keepdims=1, name=f"{b}_max"),
                helper.make_node("Sub", [x, f"{b}_max"], [f"{b}_shifted"], name=f"{b}_shift"),
                helper.make_node("Exp", [f"{b}_shifted"], [f"{b}_exp"], name=f"{b}_exp"),
                helper.make_node("Cast", [f"{b}_exp"], [f"{b}_exp64"], to=onnx.TensorProto.DOUBLE, name=f"{b}_to64"),
                helper.make_node("ReduceSum", [f"{b}_exp64", "kiln_axis_m1"], [f"{b}_sum64"], keepdims=1,
                                 name=f"{b}_sum"),
                helper.make_node("Cast", [f"{b}_sum64"], [f"{b}_sum32"], to=onnx.TensorProto.FLOAT, name=f"{b}_to32"),
                helper.make_node("Div", [f"{b}_exp", f"{b}_sum32"], [y], name=f"{b}_div"),
            ]
            probs.add(y)
            count += 1
        elif n.op_type == "MatMul" and n.input[0] in probs:
            p, v, y, b = n.input[0], n.input[1], n.output[0], n.name or n.output[0]
            out += [
                helper.make_node("Slice", [p, "kiln_axis_m1", "kiln_end", "kiln_axis_m2"], [f"{b}_lastrow"],
                                 name=f"{b}_lastrow"),
                helper.make_node("Concat", [p, f"{b}_lastrow"], [f"{b}_rows"], axis=-2, name=f"{b}_rows"),
                helper.make_node("MatMul", [f"{b}_rows", v], [f"{b}_out"], name=b),
                helper.make_node("Slice", [f"{b}_out", "kiln_zero", "kiln_axis_m1", "kiln_axis_m2"], [y],
                                 name=f"{b}_drop"),
            ]
        else:
            out.append(n)
    del g.node[:]
    g.node.extend(out)
    return count


# --- the variant ----------------------------------------------------------------------


@dataclass
class WeightReport:
    node: str
    module: str
    shape: tuple[int, int]
    fit: GridFit | None = None
    group: str = ""  # "grid" | "head" | "off-grid" | "ordinary"
    format: Format | None = None  # head / off-grid: the 8-bit format it got


@dataclass
class Int4Report:
    """What :func:`quantize_lm_int4` did, for the manifest's notes."""

    block: int
    weights: list[WeightReport] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # group -> description

    @property
    def grid_aware(self) -> bool:
        return any(w.group == "grid" for w in self.weights)

    def notes(self) -> str:
        layers = [w for w in self.weights if w.group != "head"]
        exact = [w for w in layers if w.fit is not None and w.fit.on_grid]
        if self.grid_aware:
            err = max(w.fit.max_abs_error for w in exact)
            rel = max(w.fit.max_rel_error for w in exact)
            head = (
                f"grid detected: {len(exact)}/{len(layers)} layer MatMuls on a 4-bit block-{self.block} grid "
                f"(reconstruction max abs error {err:.3g}, max rel {rel:.3g})"
            )
        else:
            head = f"no 4-bit grid in the checkpoint (0/{len(layers)} layer MatMuls on a block-{self.block} grid)"
        parts = [head] + [f"{g}: {d}" for g, d in self.formats.items()]
        return "int4: " + "; ".join(parts)


def head_matmul(graph, modules: dict[str, str]) -> str | None:
    """The MatMul producing the logits: its output is a graph output, or its module is the lm_head."""
    outputs = {o.name for o in graph.output}
    for n in graph.node:
        if n.name in modules and (n.output[0] in outputs or modules[n.name].split(".")[-1] == "lm_head"):
            return n.name
    return None


# Measured on SmolLM2-135M (Q4_1 GGUF; 2 cores, 1 intra-op thread, tokens per CPU-second,
# 128-token greedy decode; held-out perplexity ratio and mean per-token KL vs the fp32 graph):
#   layers exact 4-bit + head 8-bit block 64   52.9 tok/CPU-s  ppl x1.003  KL 0.0037
#   layers exact 4-bit + head 8-bit block 32   50.4            ppl x1.010  KL 0.0030
#   layers exact 4-bit + head fp32             37.0            ppl x1.004  KL 0.0019
#   MatMulNBitsQuantizer 4-bit (uint8 zp)      57.4            ppl x1.102  KL 0.28
#   fp32 graph                                 21.0
# The head's 8-bit MatMulNBits at accuracy_level 0 runs ~100x slower than at 4 (it
# dequantizes the whole weight per call), so the head quantizes its activations too.
# Portability of 8-bit codes x int8 activations: MLAS's AVX2 (non-VNNI) kernels could in
# principle saturate VPMADDUBSW's int16 pair sums (255 * 127 * 2 > 32767); its 8-bit
# kernels split each byte pair into even/odd halves first (sqnbitgemm_kernel_avx2_int8_
# blklen64.h: "2 x i8 x i8 may be larger than i16"). Checked on onnxruntime 1.32 under
# `qemu-x86_64 -cpu Haswell` (AVX2+FMA, no AVX-512/VNNI): all-255 / all-0 codes against
# activations at +-127, blocks 32/64/128, M = 1..4, are exact while random activations show
# the int8 kernel's rounding (so that kernel, not a float fallback, ran). 4-bit codes cannot
# saturate (15 * 127 * 2 < 32767).
GRID_FORMAT = Format(bits=4, accuracy_level=4, zero_point="default")
HEAD_FORMAT = Format(bits=8, accuracy_level=4, zero_point="default", block=64)


def quantize_lm_int4(model, modules: dict[str, str], block: int = BLOCK, grid_format: Format = GRID_FORMAT,
                     head_format: Format = HEAD_FORMAT, ordinary_symmetric: bool = False) -> Int4Report:
    """Rewrite a causal-LM graph's constant-weight MatMuls in place; ``modules`` maps MatMul
    node names to their module paths (:func:`export.lm_export.weight_matmuls`).

    - on a 4-bit grid of their own (detected per weight): exact 4-bit codes + block minima;
    - the head, and other weights on no grid when the graph has grid weights: 8-bit codes;
    - no grid anywhere (an ordinary checkpoint): onnxruntime's MatMulNBitsQuantizer,
      4-bit block ``block``, asymmetric by default (uint8 zero points: held-out perplexity
      x1.10 vs symmetric's x1.18 on SmolLM2's weights pushed through this path);
      the head 8-bit as above.
    """
    from onnx import numpy_helper

    head = head_matmul(model.graph, modules)
    weights = {t.name: t for t in model.graph.initializer}
    report = Int4Report(block=block)
    for n in model.graph.node:
        if n.name not in modules:
            continue
        w = numpy_helper.to_array(weights[n.input[1]])
        r = WeightReport(n.name, modules[n.name], tuple(w.shape))
        if n.name != head and w.shape[0] % block == 0:
            r.fit = fit_grid(w, block)
        report.weights.append(r)
    grid_aware = any(r.fit is not None and r.fit.on_grid for r in report.weights)
    for r in report.weights:
        if r.node == head:
            r.group = "head"
        elif grid_aware:
            r.group = "grid" if r.fit is not None and r.fit.on_grid else "off-grid"
        else:
            r.group = "ordinary"

    ordinary = [r.node for r in report.weights if r.group == "ordinary"]
    if ordinary:  # before our rewrite, so that it sees only the MatMuls it is meant to quantize
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in ordinary]
        level = grid_format.accuracy_level
        _ordinary_int4(model, others, block, ordinary_symmetric, level)
        kind = "symmetric" if ordinary_symmetric else "asymmetric (uint8 zero points)"
        report.formats["layers"] = f"4-bit MatMulNBitsQuantizer, {kind}, block {block}, accuracy_level {level}"

    rw = Rewriter(model)
    nodes = {n.name: n for n in model.graph.node}
    by_input: dict[str, list[WeightReport]] = {}
    for r in report.weights:
        if r.group == "grid":
            by_input.setdefault(nodes[r.node].input[0], []).append(r)
    for group in by_input.values():
        rw.replace_group([nodes[r.node] for r in group], [r.fit.codes for r in group], grid_format)
    for r in report.weights:
        if r.group in ("head", "off-grid"):
            fmt = next((replace(head_format, block=b) for b in (head_format.block, block) if r.shape[0] % b == 0), None)
            if fmt is None:
                continue  # stays fp32
            rw.replace(nodes[r.node], minmax_codes(rw.weight(nodes[r.node]), fmt.bits, fmt.block), fmt)
            r.format = fmt
    rw.apply()
    if grid_aware:
        own = "4-bit exact (the checkpoint's own codes, scales and minima), "
        report.formats["layers"] = own + grid_format.describe(block)
    off = [r for r in report.weights if r.group == "off-grid"]
    if off:
        report.formats[f"{len(off)} off-grid MatMuls"] = _described(off[0].format)
    for r in report.weights:
        if r.node == head:
            report.formats["lm_head"] = _described(r.format)
    return report


def _described(fmt: Format | None) -> str:
    return f"{fmt.bits}-bit min/max codes, {fmt.describe()}" if fmt else "fp32 (K is no multiple of the block)"


def _ordinary_int4(model, exclude: list[str], block: int, symmetric: bool, accuracy_level: int) -> None:
    """onnxruntime's own 4-bit quantizer on every MatMul but ``exclude``, in place."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs every node at INFO on the root logger
    try:
        q = MatMulNBitsQuantizer(model, block_size=block, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                 nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",))
        q.process()
    finally:
        root.setLevel(level)
    if q.model.model is not model:
        model.CopyFrom(q.model.model)
