"""Weight-only MatMul/Gemm weights written as onnxruntime's MatMulNBits (onnxq/rewrite/matmul_nbits.py), 8 and 2-4 bits.

The op's layout is decoded here independently (codes + 128 in blocks along K, or codes + 8 two to a byte, the first in
the low nibble; a scale per block) and must give back exactly the weight onnxq's codes stand for; the written model
must compute x @ W (+ bias) as numpy does with that weight, within the op's int8 products (accuracy level 4 quantizes
the input per block).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import CAST_FORM, DQ_FORM, decode_matmul_nbits, decoded_weight_counts, decoded_weights, weight_of
from onnx import TensorProto, helper, numpy_helper

from onnxq.config import ActivationConfig, Granularity, NBitsMode, QuantizeConfig, RangeMethod, SqrtMode
from onnxq.numerics.weights import QuantizedTensor
from onnxq.pipeline import quantize
from onnxq.rewrite.matmul_nbits import nbits_weight


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("k", [16, 200, 384])  # 200: the last block padded
@pytest.mark.parametrize("per_channel", [True, False])
def test_the_layout_holds_the_codes(k, per_channel, bits):
    rng = np.random.default_rng(0)
    n = 5
    top = 1 << (bits - 1)
    codes = rng.integers(-top + 1, top, size=(k, n)).astype(np.int8)
    codes[0, 0], codes[-1, -1] = -top + 1, top - 1  # both ends of the grid
    scale = rng.random(n).astype(np.float32) + 0.5 if per_channel else np.float32(0.75)
    q = QuantizedTensor(codes=codes, scale=scale, axis=1 if per_channel else None, bits=bits, sqrt=False, alpha=np.ones(1), mse=0.0, sqnr_db=0.0)
    blob, scales, block = nbits_weight(q)
    stored = 8 if bits == 8 else 4
    assert block & (block - 1) == 0 and 16 <= block <= 128 and blob.shape == (n, -(-k // block), block * stored // 8)
    want = (codes.astype(np.float32) * np.asarray(scale, dtype=np.float32)).T  # (N, K)
    np.testing.assert_array_equal(decode_matmul_nbits(blob, scales, k, stored), want)
    rows_blob, rows_scales, _ = nbits_weight(QuantizedTensor(codes=codes.T.copy(), scale=scale, axis=0 if per_channel else None, bits=bits,
                                                             sqrt=False, alpha=np.ones(1), mse=0.0, sqnr_db=0.0), rows_first=True, factor=2.0)
    np.testing.assert_array_equal(decode_matmul_nbits(rows_blob, rows_scales, k, stored), 2.0 * want)


def _model() -> onnx.ModelProto:
    """x[N,3,200] -> MatMul(200->48) -> Relu -> Reshape -> Gemm(48->10, transB, alpha 2, beta 0.5, C) -> y."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((200, 48)).astype(np.float32) * 0.1, "w1"),
             numpy_helper.from_array(rng.standard_normal((10, 48)).astype(np.float32) * 0.1, "w2"),
             numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "c"),
             numpy_helper.from_array(np.array([-1, 48], dtype=np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2", "c"], ["y"], name="fc", transB=1, alpha=2.0, beta=0.5)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 200])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weight(model: onnx.ModelProto, node_name: str, k: int, shape: tuple[int, int]) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
    bits = next(a.i for a in node.attribute if a.name == "bits")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rows = decode_matmul_nbits(inits[node.input[1]], inits[node.input[2]], k, bits)  # (N, K)
    return rows if rows.shape == shape else rows.T


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity", [Granularity.CHANNEL, Granularity.TENSOR])
def test_weight_only_matmul_and_gemm_run_as_matmul_nbits(granularity, bits):
    """--matmul-nbits on: these small weights (9600 and 480 values) run as MatMulNBits too (by default they are decoded at load)."""
    model = _model()
    q = quantize(model, QuantizeConfig(bits=bits, granularity=granularity, first_last_bits=None, matmul_nbits=NBitsMode.ON))
    assert [n.op_type for n in q.graph.node if n.op_type in ("MatMul", "Gemm", "MatMulNBits", "DequantizeLinear")] == ["MatMulNBits"] * 2
    assert not decoded_weights(q)
    w1 = _weight(q, "mm", 200, (200, 48))
    w2 = _weight(q, "fc", 48, (10, 48)) / 2.0  # alpha went into the scales
    floats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    steps = (1 << (bits - 1)) - 1
    assert np.linalg.norm(w1 - floats["w1"]) <= np.linalg.norm(floats["w1"]) * (0.01 if bits == 8 else 0.15)  # near the float weight
    assert all(len(np.unique(column)) <= 2 * steps + 1 for column in w1.T)  # on a grid of 2^bits - 1 values per output channel
    x = np.random.default_rng(2).standard_normal((4, 3, 200)).astype(np.float32)
    want = 2.0 * np.maximum(x @ w1, 0).reshape(-1, 48) @ w2.T + 0.5 * floats["c"]
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()  # the op's int8 products of the input


def test_not_with_quantized_activations_nor_sqrt_codes():
    """W8A8 keeps QDQ (onnxruntime runs it as QLinearMatMul); --sqrt on keeps 4-bit sqrt codes, which the op cannot hold,
    decoded at load; both even with --matmul-nbits on."""
    model = _model()
    rng = np.random.default_rng(3)
    data = [{"x": rng.standard_normal((8, 3, 200)).astype(np.float32)} for _ in range(4)]
    w8a8 = quantize(model, QuantizeConfig(bits=8, activations=ActivationConfig(), matmul_nbits=NBitsMode.ON), data)
    assert not any(n.op_type == "MatMulNBits" for n in w8a8.graph.node)
    assert decoded_weight_counts(w8a8) == {DQ_FORM: 2}
    sqrt = quantize(model, QuantizeConfig(bits=4, first_last_bits=None, sqrt=SqrtMode.ON, matmul_nbits=NBitsMode.ON))
    assert not any(n.op_type == "MatMulNBits" for n in sqrt.graph.node)
    assert [(w.form, w.sqrt) for w in decoded_weights(sqrt)] == [(CAST_FORM, True)] * 2  # sqrt codes: y * |y| after each decoding


def _square_matmul(k: int, n: int) -> onnx.ModelProto:
    """x[N,k] -> MatMul(W k x n) -> y, W drawn small so the quantizer's search is quick."""
    w = (np.random.default_rng(4).standard_normal((k, n)) * 0.05).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def square_matmuls() -> dict[str, onnx.ModelProto]:
    """A MatMul weight of exactly 2^20 values (AUTO's least), and one of 1024 fewer."""
    return {"at": _square_matmul(1024, 1024), "under": _square_matmul(1024, 1023)}


@pytest.mark.parametrize(("mode", "size", "as_nbits"), [
    (NBitsMode.AUTO, "at", True), (NBitsMode.AUTO, "under", False), (NBitsMode.OFF, "at", False), (NBitsMode.ON, "under", True),
])
def test_nbits_mode_picks_the_weights_that_run_as_matmul_nbits(square_matmuls, mode, size, as_nbits):
    """AUTO: weights of 2^20 values or more run as MatMulNBits, smaller ones are decoded at load; OFF: none; ON: every one."""
    model = square_matmuls[size]
    k, n = (d for d in model.graph.initializer[0].dims)
    q = quantize(model, QuantizeConfig(bits=4, first_last_bits=None, sqrt=SqrtMode.OFF, range=RangeMethod.ABSMAX, matmul_nbits=mode))
    (node,) = q.graph.node if as_nbits else [n for n in q.graph.node if n.name == "mm"]
    x = np.random.default_rng(5).standard_normal((3, k)).astype(np.float32)
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    if as_nbits:
        assert node.op_type == "MatMulNBits" and not decoded_weights(q)
        w = _weight(q, "mm", k, (n, k)).T  # asked for as the op's (N, K) rows: a square weight is not told apart by its shape
        assert np.abs(got - x @ w).max() <= 0.02 * np.abs(x @ w).max()  # the op's int8 products of the input
    else:
        assert node.op_type == "MatMul" and not any(m.op_type == "MatMulNBits" for m in q.graph.node)
        decoded = weight_of(q, "mm")
        assert decoded.form == CAST_FORM and decoded.codes.shape == (k, n) and decoded.axis == 1
        np.testing.assert_allclose(got, x @ decoded.values, rtol=1e-4, atol=1e-4)
    floats = numpy_helper.to_array(model.graph.initializer[0])
    w = _weight(q, "mm", k, (n, k)).T if as_nbits else decoded.values
    assert np.linalg.norm(w - floats) <= 0.15 * np.linalg.norm(floats)
