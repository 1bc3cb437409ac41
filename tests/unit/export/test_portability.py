"""export.portability: an int8 graph's numerics must not depend on the CPU that runs it.

The verdict on a format comes from its weights (a worst case over every uint8 input), so
these tests fail for the U8S8 format on every machine, VNNI or not; and the int8 graph
kiln builds is compared with a saturation-free reference computed in numpy."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.parity import add_portability
from export.portability import (
    integer_matmuls,
    matmul_exact,
    matmul_u8s8_avx2,
    portability_problems,
    u8s8_can_saturate,
    worst_pair_sums,
)
from kiln_core.judge import at_most
from kiln_core.manifest import ParityReport
from kiln_runtime.ort import open_session

K, N = 64, 24


def test_a_pair_of_large_same_sign_int8_weights_can_saturate_int16():
    w = np.zeros((4, 1), np.int8)
    w[0, 0], w[1, 0] = 127, 127  # 255 * 254 = 64770 > 32767
    assert worst_pair_sums(w) == (64770, 0)
    assert u8s8_can_saturate(w)


def test_seven_bit_weights_and_opposite_signs_cannot():
    w = np.array([[64], [64], [127], [-127]], np.int8)  # reduce_range pair: 255 * 128 = 32640
    assert worst_pair_sums(w) == (255 * 128, 255 * -127)
    assert not u8s8_can_saturate(w)


def test_the_avx2_emulation_saturates_where_the_exact_product_does_not():
    rng = np.random.default_rng(0)
    a = rng.integers(200, 256, (3, K), dtype=np.int64).astype(np.uint8)
    b = rng.integers(100, 128, (K, N), dtype=np.int64).astype(np.int8)
    exact = matmul_exact(a, b)
    emulated = matmul_u8s8_avx2(a, b)
    assert (emulated < exact).all()  # every pair sum was clipped at 32767
    small = (b // 2).astype(np.int8)  # 7-bit weights: nothing to clip
    np.testing.assert_array_equal(matmul_u8s8_avx2(a, small), matmul_exact(a, small))


def _one_matmul(path, w):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    w[::7] *= 6  # a few outlier rows, as real FFN weights have
    return w


def _quantize(src, dst, weight_type):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=getattr(QuantType, weight_type), per_channel=True)
    return dst


def test_yesterdays_u8s8_format_is_flagged_as_cpu_dependent_on_any_machine(tmp_path, weights):
    src = _one_matmul(tmp_path / "fp32.onnx", weights)
    u8s8 = _quantize(src, tmp_path / "u8s8.onnx", "QInt8")
    found = integer_matmuls(u8s8)
    assert [(m.activation, m.weight, m.saturates) for m in found] == [("uint8", "int8", True)]
    problems = portability_problems(u8s8)
    assert problems and "saturate" in problems[0]


def _passing_report() -> ParityReport:
    return ParityReport.judged("the fp32 graph", 8, {"ppl_ratio": 1.0}, [at_most("ppl_ratio", 1.1)])


def test_a_saturating_graph_fails_its_gate_with_the_count_and_the_fix(tmp_path, weights):
    from export.variants import quantize_int8_dynamic

    src = _one_matmul(tmp_path / "fp32.onnx", weights)
    u8s8 = _quantize(src, tmp_path / "u8s8.onnx", "QInt8")
    failed = add_portability(_passing_report(), u8s8)
    assert not failed.passed and failed.figures["saturating_int8_matmuls"] == 1.0
    assert failed.failures == [f"saturating_int8_matmuls = 1, needs <= 0 (off by 1): {portability_problems(u8s8)[0]}"]
    assert [str(t) for t in failed.limits] == ["ppl_ratio <= 1.1", "saturating_int8_matmuls <= 0"]
    quantize_int8_dynamic(src, tmp_path / "int8.onnx")
    assert add_portability(_passing_report(), tmp_path / "int8.onnx").passed


def test_kilns_int8_format_is_portable(tmp_path, weights):
    from export.variants import quantize_int8_dynamic

    src = _one_matmul(tmp_path / "fp32.onnx", weights)
    dst = tmp_path / "int8.onnx"
    quantize_int8_dynamic(src, dst)
    found = integer_matmuls(dst)
    assert [(m.weight, m.saturates) for m in found] == [("uint8", False)]
    assert portability_problems(dst) == []


def _dynamic_quantize(x):
    """onnx DynamicQuantizeLinear, in numpy."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((hi - lo) / 255)
    zp = np.clip(np.round(-lo / scale), 0, 255)
    q = np.clip(np.round(x / scale) + zp, 0, 255).astype(np.int64)
    return q, scale, int(zp)


def test_kilns_int8_graph_matches_a_saturation_free_numpy_reference(tmp_path, weights):
    """What onnxruntime computes for kiln's int8 graph on this CPU equals integer maths with no
    saturation, on inputs that reach the extremes of the uint8 range."""
    from export.variants import quantize_int8_dynamic

    src = _one_matmul(tmp_path / "fp32.onnx", weights)
    dst = tmp_path / "int8.onnx"
    quantize_int8_dynamic(src, dst)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer}
    qw = next(v for v in inits.values() if v.dtype == np.uint8 and v.shape == (K, N)).astype(np.int64)
    zw = next(v for k, v in inits.items() if v.dtype == np.uint8 and v.shape == (N,)).astype(np.int64)
    sw = next(v for v in inits.values() if v.dtype == np.float32 and v.shape == (N,))
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (5, K)).astype(np.float32)
    x[:, ::5] = 8.0  # large activations: uint8 codes near 255
    qa, sa, za = _dynamic_quantize(x)
    reference = ((qa - za) @ (qw - zw)).astype(np.float64) * (np.float64(sa) * sw.astype(np.float64))
    got = open_session(str(dst)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
