"""export/lm_quant: a checkpoint's own 4-bit grid is found (and a random one is not), codes
pack the way MatMulNBits reads them, and the rewritten MatMul reproduces numpy."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import lm_quant

RNG = np.random.default_rng(0)


def ggml_q4_1(x: np.ndarray, block: int = 32) -> np.ndarray:
    """ggml's quantize_row_q4_1_ref then dequantize_row_q4_1, blocks along axis 0 of x [K, N]:
    d = (max - min) / 15 and m = min stored as fp16, q = min(15, int(x' + 0.5))."""
    k, n = x.shape
    b = x.reshape(k // block, block, n).astype(np.float32)
    lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
    d = (hi - lo) / 15
    inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.minimum(15, ((b - lo) * inv + np.float32(0.5)).astype(np.int8)).astype(np.float32)
    return (q * d.astype(np.float16).astype(np.float32) + lo.astype(np.float16).astype(np.float32)).reshape(k, n)


def ggml_q4_0(x: np.ndarray, block: int = 32) -> np.ndarray:
    """ggml's Q4_0: d = (signed absmax) / -8 as fp16, value = (q - 8) * d."""
    k, n = x.shape
    b = x.reshape(k // block, block, n).astype(np.float32)
    extreme = np.take_along_axis(b, np.abs(b).argmax(1)[:, None, :], 1)
    d = extreme / -8
    inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.minimum(15, (b * inv + np.float32(8.5)).astype(np.int8)).astype(np.float32)
    return ((q - 8) * d.astype(np.float16).astype(np.float32)).reshape(k, n)


def one_matmul(w: np.ndarray, name: str = "mm") -> onnx.ModelProto:
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name=name)], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", "s", n])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(model: onnx.ModelProto, **feeds) -> list[np.ndarray]:
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# --- grid detection -----------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [ggml_q4_1, ggml_q4_0], ids=["Q4_1", "Q4_0"])
def test_a_ggml_4bit_weight_is_found_on_its_grid_and_reproduced_exactly(quantize):
    w = quantize(RNG.normal(0, 0.05, (256, 96)).astype(np.float32))
    fit = lm_quant.fit_grid(w)
    assert fit.on_grid and fit.max_abs_error == 0.0 and fit.max_rel_error == 0.0
    assert np.array_equal(fit.codes.dequantize(), w)
    assert fit.codes.codes.max() <= 15 and fit.codes.scales.shape == (256 // 32, 96)
    assert sum(fit.scale_kinds.values()) == 8 * 96


def test_a_grid_with_unrounded_fp32_scales_is_found_too():
    k, n = 128, 16
    q = RNG.integers(0, 16, (k, n)).astype(np.float32)
    q[::32] = 0
    q[1::32] = 15  # every block spans its grid, as a min/max quantizer's blocks do
    d = RNG.uniform(1e-3, 1e-2, (k // 32, n)).astype(np.float32)  # not representable in fp16
    m = RNG.uniform(-0.1, 0.0, (k // 32, n)).astype(np.float32)
    w = (np.repeat(d, 32, 0) * q + np.repeat(m, 32, 0)).astype(np.float32)
    fit = lm_quant.fit_grid(w)
    assert fit.on_grid and fit.max_rel_error <= lm_quant.GRID_RTOL
    assert any("fp32" in kind for kind in fit.scale_kinds)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bfloat16"])
def test_ordinary_random_weights_are_not_on_a_grid(dtype):
    w = RNG.normal(0, 0.02, (256, 64)).astype(np.float32)
    if dtype == "bfloat16":
        w = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)  # bf16 truncation
    else:
        w = w.astype(dtype).astype(np.float32)
    fit = lm_quant.fit_grid(w)
    assert not fit.on_grid
    assert fit.max_rel_error > 1e-3  # the nearest grid is off by a sizeable fraction of a step


def test_one_off_grid_block_is_enough_to_reject_a_weight():
    w = ggml_q4_1(RNG.normal(0, 0.05, (128, 32)).astype(np.float32))
    w[40, 7] += 1e-3 * np.abs(w[32:64, 7]).max()
    assert not lm_quant.fit_grid(w).on_grid


def test_constant_blocks_have_scale_zero_and_fit():
    w = np.full((64, 8), 0.25, np.float32)
    fit = lm_quant.fit_grid(w)
    assert fit.on_grid and (fit.codes.scales == 0).all() and np.array_equal(fit.codes.dequantize(), w)


def test_k_must_be_a_whole_number_of_blocks():
    with pytest.raises(ValueError, match="multiple of the block size"):
        lm_quant.fit_grid(np.zeros((48, 4), np.float32))


# --- packing ------------------------------------------------------------------------------


def test_4bit_codes_pack_low_nibble_first_per_column_block():
    codes = np.zeros((64, 2), np.uint8)
    codes[:, 0] = np.arange(64) % 16
    codes[:, 1] = 15 - np.arange(64) % 16
    packed = lm_quant.pack_codes(codes, 4, 32)
    assert packed.shape == (2, 2, 16) and packed.dtype == np.uint8
    assert packed[0, 0, 0] == 0x10 and packed[0, 0, 1] == 0x32  # elements 0, 1 -> low, high nibble
    assert packed[1, 1, 0] == (15 | 14 << 4)
    assert np.array_equal(lm_quant.unpack_codes(packed, 4, 64), codes)


def test_8bit_codes_and_zero_points_round_trip():
    codes = RNG.integers(0, 256, (96, 5)).astype(np.uint8)
    assert np.array_equal(lm_quant.unpack_codes(lm_quant.pack_codes(codes, 8, 32), 8, 96), codes)
    zp = RNG.integers(0, 16, (3, 5))  # 3 blocks: the last byte of each column is half filled
    packed = lm_quant.pack_zero_points(zp, 4)
    assert packed.shape == (5, 2)
    assert np.array_equal(packed[:, 0], zp[0] | zp[1] << 4) and np.array_equal(packed[:, 1], zp[2])
    assert np.array_equal(lm_quant.pack_zero_points(zp, 8), zp.T)


def test_block_indicator_sums_blocks():
    a = RNG.normal(size=(3, 96)).astype(np.float32)
    np.testing.assert_allclose(a @ lm_quant.block_indicator(96, 32), a.reshape(3, 3, 32).sum(-1), rtol=1e-6)


# --- the rewrite --------------------------------------------------------------------------


@pytest.mark.parametrize("zero_point", ["zero", "default"])
def test_grid_rewrite_is_exact_at_accuracy_level_0_and_close_at_4(zero_point):
    k, n = 128, 48
    w = ggml_q4_1(RNG.normal(0, 0.05, (k, n)).astype(np.float32))
    a = RNG.normal(size=(2, 3, k)).astype(np.float32)
    expected = a.astype(np.float64) @ w.astype(np.float64)
    fit = lm_quant.fit_grid(w)
    errors = {}
    for level in (0, 4):
        model = one_matmul(w)
        rw = lm_quant.Rewriter(model)
        rw.replace(model.graph.node[0], fit.codes, lm_quant.Format(4, level, zero_point))
        rw.apply()
        assert [x.op_type for x in model.graph.node] == ["MatMul", "MatMulNBits", "MatMul", "Add"]
        assert "W" not in {t.name for t in model.graph.initializer}
        errors[level] = np.abs(run(model, A=a)[0] - expected).max() / np.abs(expected).max()
    assert errors[0] < 1e-6
    assert errors[4] < 2e-2  # activations quantized to int8 per block


def test_the_op_default_zero_point_is_what_the_correction_assumes():
    """Without a zero_points input MatMulNBits subtracts 2**(bits-1): the rewrite's offsets
    must match onnxruntime's default, for 4 and 8 bits."""
    a = RNG.normal(size=(1, 2, 64)).astype(np.float32)
    for bits in (4, 8):
        codes = lm_quant.minmax_codes(RNG.normal(size=(64, 16)).astype(np.float32), bits)
        model = one_matmul(codes.dequantize())
        rw = lm_quant.Rewriter(model)
        rw.replace(model.graph.node[0], codes, lm_quant.Format(bits, 0, "default"))
        rw.apply()
        assert len(model.graph.node[1].input) == 3  # no zero_points input
        np.testing.assert_allclose(run(model, A=a)[0], a @ codes.dequantize(), atol=1e-4)


@pytest.mark.parametrize("block", [32, 64])
def test_8bit_minmax_codes_stay_within_a_step_and_the_rewrite_reproduces_them(block):
    w = RNG.normal(0, 0.05, (128, 40)).astype(np.float32)
    codes = lm_quant.minmax_codes(w, 8, block)
    b = w.reshape(128 // block, block, 40)
    step = (b.max(1) - b.min(1)) / 255
    assert (np.abs(codes.dequantize() - w).reshape(b.shape) <= step[:, None, :] * (0.5 + 1e-4)).all()
    a = RNG.normal(size=(1, 4, 128)).astype(np.float32)
    for zero_point in ("zero", "default"):
        model = one_matmul(w)
        rw = lm_quant.Rewriter(model)
        rw.replace(model.graph.node[0], codes, lm_quant.Format(8, 0, zero_point, block=block))
        rw.apply()
        attrs = {x.name: x.i for x in model.graph.node[1].attribute}
        assert attrs["bits"] == 8 and attrs["block_size"] == block
        np.testing.assert_allclose(run(model, A=a)[0], a @ codes.dequantize(), atol=1e-5)


def _qkv_graph(k: int):
    """Three MatMuls (q, k, v) reading one activation A [s, k], weights on a Q4_1 grid."""
    ws = [ggml_q4_1(RNG.normal(0, 0.05, (k, n)).astype(np.float32)) for n in (32, 16, 16)]
    names = ["q", "k", "v"]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", f"W{x}"], [f"Y{x}"], name=x) for x in names], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["s", k])],
        [helper.make_tensor_value_info(f"Y{x}", TensorProto.FLOAT, ["s", w.shape[1]]) for x, w in zip(names, ws)],
        [numpy_helper.from_array(w, f"W{x}") for x, w in zip(names, ws)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), ws


def test_matmuls_reading_one_activation_share_its_block_sums():
    k = 64
    model, ws = _qkv_graph(k)
    rw = lm_quant.Rewriter(model)
    for node in list(model.graph.node):
        rw.replace(node, lm_quant.fit_grid(rw.weight(node)).codes, lm_quant.Format(4, 0))
    rw.apply()
    sums = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[0] == "A"]
    assert len(sums) == 1 and sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 3
    a = RNG.normal(size=(5, k)).astype(np.float32)
    for got, w in zip(run(model, A=a), ws):
        np.testing.assert_allclose(got, a @ w, atol=1e-5)


def test_a_group_reading_one_activation_becomes_one_matmulnbits_and_a_split():
    k = 64
    model, ws = _qkv_graph(k)
    rw = lm_quant.Rewriter(model)
    nodes = list(model.graph.node)
    rw.replace_group(nodes, [lm_quant.fit_grid(rw.weight(n)).codes for n in nodes], lm_quant.Format(4, 0))
    rw.apply()
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["MatMul", "MatMulNBits", "MatMul", "Add", "Split"]
    assert {a.name: a.i for a in model.graph.node[1].attribute}["N"] == 64
    a = RNG.normal(size=(5, k)).astype(np.float32)
    for got, w in zip(run(model, A=a), ws):
        np.testing.assert_allclose(got, a @ w, atol=1e-5)


# --- the whole variant --------------------------------------------------------------------


def two_layers_and_head(grid: bool) -> tuple[onnx.ModelProto, dict[str, str]]:
    """x -> up (64x128) -> down (128x64) -> head (64x200) -> logits."""
    make = (lambda s: ggml_q4_1(RNG.normal(0, 0.05, s).astype(np.float32))) if grid else (
        lambda s: RNG.normal(0, 0.05, s).astype(np.float32))
    ws = {"up": make((64, 128)), "down": make((128, 64)), "head": RNG.normal(0, 0.05, (64, 200)).astype(np.float32)}
    nodes = [
        helper.make_node("MatMul", ["x", "Wup"], ["h"], name="n_up"),
        helper.make_node("MatMul", ["h", "Wdown"], ["h2"], name="n_down"),
        helper.make_node("MatMul", ["h2", "Whead"], ["logits"], name="n_head"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 200])],
        [numpy_helper.from_array(w, f"W{k}") for k, w in ws.items()],
    )
    modules = {"n_up": "model.layers.0.mlp.up_proj", "n_down": "model.layers.0.mlp.down_proj", "n_head": ""}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), modules


def test_grid_checkpoint_gets_exact_layers_and_an_8bit_head():
    model, modules = two_layers_and_head(grid=True)
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = RNG.normal(size=(1, 3, 64)).astype(np.float32)
    report = lm_quant.quantize_lm_int4(model, modules, head_format=lm_quant.Format(8, 0, "default"),
                                grid_format=lm_quant.Format(4, 0, "default"))
    assert report.grid_aware
    assert {r.node: r.group for r in report.weights} == {"n_up": "grid", "n_down": "grid", "n_head": "head"}
    notes = report.notes()
    assert "grid detected: 2/2 layer MatMuls" in notes and "max abs error 0" in notes
    assert "lm_head: 8-bit" in notes and "4-bit exact" in notes
    # exact layers; the head is its blocks' 8-bit min/max grid
    head8 = lm_quant.minmax_codes(w["Whead"], 8).dequantize().astype(np.float64)
    expected = x.astype(np.float64) @ w["Wup"] @ w["Wdown"] @ head8
    (got,) = run(model, x=x)
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()


def test_ordinary_checkpoint_falls_back_to_onnxruntime_4bit_layers_and_an_8bit_head():
    model, modules = two_layers_and_head(grid=False)
    report = lm_quant.quantize_lm_int4(model, modules, head_format=lm_quant.Format(8, 4, "default"))
    assert not report.grid_aware
    assert {w.group for w in report.weights} == {"ordinary", "head"}
    assert report.notes().startswith("int4: no 4-bit grid in the checkpoint (0/2 layer MatMuls")
    nbits = {n.name: {a.name: a.i for a in n.attribute} for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert len(nbits) == 3 and sorted(v["bits"] for v in nbits.values()) == [4, 4, 8]
    assert {v["accuracy_level"] for v in nbits.values()} == {4}
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in ("Wup", "Wdown", "Whead")]
    run(model, x=RNG.normal(size=(1, 2, 64)).astype(np.float32))


# --- batch invariance ---------------------------------------------------------------------


def attention(heads: int = 2, dim: int = 16) -> onnx.ModelProto:
    """softmax(scores + mask) @ V, shapes [b, h, q, t] and [b, h, t, d]."""
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["s"], ["p"], axis=-1, name="sm"),
         helper.make_node("MatMul", ["p", "v"], ["y"], name="pv")],
        "g",
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["b", heads, "q", "t"]),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", heads, "t", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", heads, "q", dim])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_pad_invariant_attention_gives_a_padded_row_the_bits_of_the_unpadded_one():
    plain, model = attention(), attention()
    assert lm_quant.pad_invariant_attention(model) == 1
    assert "Softmax" not in {n.op_type for n in model.graph.node}
    masked = np.finfo(np.float32).min
    for queries in (1, 3):  # decode, prefill
        for valid in (5, 13, 37, 70):
            s = RNG.normal(size=(1, 2, queries, valid)).astype(np.float32)
            v = RNG.normal(size=(1, 2, valid, 16)).astype(np.float32)
            (alone,) = run(model, s=s, v=v)
            np.testing.assert_allclose(alone, run(plain, s=s, v=v)[0], rtol=1e-5, atol=1e-6)  # still softmax @ V
            for pads in (1, 2, 3, 7):
                sp = np.concatenate([np.full((1, 2, queries, pads), masked, np.float32), s], axis=-1)
                vp = np.concatenate([RNG.normal(size=(1, 2, pads, 16)).astype(np.float32), v], axis=-2)
                (padded,) = run(model, s=sp, v=vp)
                assert np.array_equal(padded, alone), (queries, valid, pads)
