"""--format int / post on Gemm and MatMul: the rewrite runs them as IntConv/PostConv 1x1 convolutions over their rows.

The expected output is IntConv/PostConv's definition (csrc/kernels/int_conv.h) in numpy, with the numpy helpers of
tests/conv_ops.py, applied to codes computed here from the float weight with onnxq's own quantizer (so a codes
transpose, a lost alpha or beta, or a wrong row layout in the rewrite shows): bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import CAST_FORM, decoded_weights, weight_of
from conv_ops import pixel_reference, post_weights, quantize_input
from onnx import TensorProto, helper, numpy_helper

from onnxq import NBitsMode, QuantizeConfig, WeightFormat, quantize_with_report, save_model
from onnxq.analysis.inventory import inspect_model
from onnxq.config import ActivationConfig, BiasCorrection, ReduceRange, SqrtMode
from onnxq.native.session import session
from onnxq.numerics.weights import quantize_post_weight, quantize_weight
from onnxq.pipeline import BALANCED_MAX_BITS
from onnxq.report.summary import summary
from onnxq.rewrite.gemm import MIN_WEIGHTS, has_pixel_steps


def _gemm_model(k: int, m: int, rows_shape: list, op: str = "Gemm", bias_shape: tuple | None = None, **attrs) -> onnx.ModelProto:
    """x[rows_shape..., K] -> Gemm/MatMul(W[, C]) -> y; W (K, M), or (M, K) with transB=1; C of ``bias_shape``."""
    rng = np.random.default_rng(k * 1000 + m)
    w_shape = (m, k) if attrs.get("transB") else (k, m)
    inits = [numpy_helper.from_array((rng.standard_t(5, w_shape) * 0.1).astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias_shape is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "c"))
        inputs.append("c")
    node = helper.make_node(op, inputs, ["y"], name="fc", **attrs)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [*rows_shape, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [*rows_shape, m])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _reference(float_model: onnx.ModelProto, x: np.ndarray, fmt: WeightFormat, bits: int, x_step=None) -> np.ndarray:
    """Gemm/MatMul's output as the op defines it: codes (M, K) from onnxq's quantizer, scale * alpha, beta * C, X quantized once."""
    node = float_model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inits = _inits(float_model)
    rows = inits["w"] if attrs.get("transB") else inits["w"].T  # (M, K)
    balanced = bits <= BALANCED_MAX_BITS and x_step is None  # the data-free codes of a run without data (onnxq/numerics/balance.py)
    if fmt is WeightFormat.POST:
        q = quantize_post_weight(rows, bits, 0, balanced=balanced)
    else:
        q = quantize_weight(rows, bits, 0, SqrtMode.OFF, balanced=balanced)
    scale = (np.asarray(q.scale, np.float32) * np.float32(attrs.get("alpha", 1.0))).astype(np.float32)
    m = rows.shape[0]
    bias = None
    if "c" in inits:
        bias = (np.broadcast_to(inits["c"].reshape(-1), (m,)) * np.float32(attrs.get("beta", 1.0))).astype(np.float32)
    if fmt is WeightFormat.INT and x_step is None:  # IntConv quantizes each row with its own step (x_steps="pixel")
        return _per_row_reference(x, q.codes, scale, bias)
    xq, s_x, z = quantize_input(x, *(x_step or (None, None)))
    flat = xq.reshape(-1, x.shape[-1]) - z
    if fmt is WeightFormat.POST:
        w_even, w_odd, k2 = post_weights(q.codes, bits)
        c_e = s_x * scale * np.float32(2.0**-k2)
        c_o = c_e * np.float32(0.70710678118654752)
        y = (flat @ w_even.T).astype(np.float32) * c_e + (flat @ w_odd.T).astype(np.float32) * c_o
    else:
        y = (flat @ q.codes.astype(np.int64).T).astype(np.float32) * (s_x * scale)
    if bias is not None:
        y = y + bias
    assert y.dtype == np.float32
    return y.reshape(*x.shape[:-1], m)


def _per_row_reference(x: np.ndarray, codes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """IntConv on x's rows with a step per row (each row DynamicQuantizeLinear'd alone): the rows as the pixels of a
    (1, K, rows, 1) image, through conv_ops' numpy model of the definition."""
    k, m = x.shape[-1], codes.shape[0]
    image = np.ascontiguousarray(x.reshape(-1, k).T)[None, :, :, None]
    y = pixel_reference(image, codes, scale, bias)  # (1, M, rows, 1)
    return y[0, :, :, 0].T.reshape(*x.shape[:-1], m)


def _quantized(model: onnx.ModelProto, fmt: WeightFormat, bits: int, **config):
    """The model quantized at ``bits`` in ``fmt``, 8-bit codes kept 8-bit (--reduce-range off) unless ``config`` says."""
    config.setdefault("reduce_range", ReduceRange.OFF)
    return quantize_with_report(model, QuantizeConfig(bits=bits, format=fmt, first_last_bits=None, **config))


FORMATS = [(WeightFormat.INT, 4), (WeightFormat.INT, 8), (WeightFormat.INT, 7), (WeightFormat.INT, 3), (WeightFormat.POST, 4), (WeightFormat.POST, 3)]
SHAPES = [  # (K, M, rows shape, op, bias shape, attributes): odd K and M, each C form, both weight layouts; K * M >= MIN_WEIGHTS
    (387, 341, [5], "Gemm", (341,), {"transB": 1}),
    (387, 341, [5], "Gemm", (1, 341), {"alpha": 0.75, "beta": -1.5}),
    (385, 343, [1], "Gemm", (1,), {"transB": 1, "alpha": 2.0}),
    (384, 345, [3], "Gemm", None, {}),
    (389, 341, [7], "MatMul", None, {}),
    (391, 339, [2, 9], "MatMul", None, {}),
    (383, 347, [2, 3, 4], "MatMul", None, {}),
]


@pytest.mark.parametrize("fmt, bits", FORMATS, ids=lambda v: getattr(v, "value", v))
@pytest.mark.parametrize("k, m, rows, op, bias, attrs", SHAPES, ids=lambda v: str(v))
def test_gemm_and_matmul_run_as_the_op_bit_for_bit(fmt, bits, k, m, rows, op, bias, attrs):
    float_model = _gemm_model(k, m, rows, op, bias, **attrs)
    result = _quantized(float_model, fmt, bits)
    op_type = "PostConv" if fmt is WeightFormat.POST else "IntConv"
    assert [layer.op for layer in result.layers] == [op_type] and not result.layers[0].qdq_reason
    assert {n.op_type for n in result.model.graph.node} >= {op_type, "Transpose"} and "Gemm" not in {n.op_type for n in result.model.graph.node}
    x = (np.random.default_rng(1).standard_normal((*rows, k)) * 1.5 + 0.3).astype(np.float32)
    out = session(result.model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, _reference(float_model, x, fmt, bits))


def test_op_output_is_declared_and_the_model_checks():
    result = _quantized(_gemm_model(391, 339, [2, 9], "MatMul"), WeightFormat.INT, 4)
    onnx.checker.check_model(result.model)
    declared = {v.name: [d.dim_value or d.dim_param or None for d in v.type.tensor_type.shape.dim] for v in result.model.graph.value_info}
    op = next(n for n in result.model.graph.node if n.op_type == "IntConv")
    assert op.name == "fc" and declared[op.output[0]] == [1, 339, 18, 1]
    inferred = onnx.shape_inference.infer_shapes(result.model, strict_mode=True)
    assert [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim] == [2, 9, 339]


def test_calibrated_step_goes_to_the_op():
    """With quantized activations the layout reads X and the op takes the Q/DQ pair's (s, z): the same codes, no float round trip."""
    float_model = _gemm_model(387, 341, ["N"], "Gemm", (341,), transB=1)
    rng = np.random.default_rng(3)
    calibration = [{"x": rng.standard_normal((8, 387)).astype(np.float32)} for _ in range(4)]
    act = ActivationConfig(bias_correction=BiasCorrection.OFF)
    # (weights by their own error: the reference quantizes them that way; with data they would be chosen for the output)
    config = QuantizeConfig(bits=4, format=WeightFormat.INT, first_last_bits=None, activations=act, output_aware=False)
    result = quantize_with_report(float_model, config, calibration)
    ops = [n.op_type for n in result.model.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops, ops
    op = next(n for n in result.model.graph.node if n.op_type == "IntConv")
    assert not has_pixel_steps(op)  # (the op allows x_steps="pixel" only without x_scale)
    inits = _inits(result.model)
    step = (np.float32(inits[op.input[4]]), np.uint8(inits[op.input[5]]))
    x = rng.standard_normal((6, 387)).astype(np.float32)
    out = session(result.model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, _reference(float_model, x, WeightFormat.INT, 4, step))


def _kept(result) -> dict[str, tuple[str, str]]:
    """Layers onnxq's ops do not run: (the op they run as, why)."""
    return {",".join(layer.nodes): (layer.op, layer.qdq_reason) for layer in result.layers if layer.qdq_reason}


@pytest.mark.parametrize("nbits", [NBitsMode.AUTO, NBitsMode.ON], ids=lambda mode: mode.value)
@pytest.mark.parametrize(
    "model, reason, nbits_runs_it",
    [
        (_gemm_model(131, 127, [5], "Gemm", (127,), transA=1), "transA=1", False),
        (_gemm_model(131, 127, [5], "Gemm", (5, 127)), "bias C is not a constant row", True),  # C in an Add after it
        (_gemm_model(64, 10, [5], "Gemm", (10,)), f"under {MIN_WEIGHTS} weights", True),
        (_gemm_model(255, 514, [5], "Gemm", (514,)), f"under {MIN_WEIGHTS} weights", True),
    ],
    ids=["transA", "matrix C", "small", "just under"],
)
def test_unsupported_gemm_runs_outside_the_ops_and_says_why(model, reason, nbits_runs_it, nbits, tmp_path):
    """A Gemm the ops cannot run stays a Gemm of a weight decoded at load, or (weight-only, a form MatMulNBits runs, and
    --matmul-nbits on: these weights are all far under AUTO's 2^20 values) becomes onnxruntime's MatMulNBits."""
    if reason == "transA=1":  # x is (K, rows) for transA
        model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [131, 5]))
    result = _quantized(model, WeightFormat.INT, 4, matmul_nbits=nbits)
    op, why = _kept(result)["fc"]
    assert reason in why
    ops = {n.op_type for n in result.model.graph.node}
    assert "IntConv" not in ops
    as_nbits = nbits_runs_it and nbits is NBitsMode.ON
    if as_nbits:
        assert "MatMulNBits" in ops and "Gemm" not in ops and not decoded_weights(result.model)
    else:
        assert "MatMulNBits" not in ops and weight_of(result.model, "fc").form == CAST_FORM
    onnx.save_model(result.model, tmp_path / "m.onnx")
    shown = "onnxruntime's MatMulNBits" if as_nbits else "decoded at load"  # weight-only
    assert op == ("MatMulNBits" if as_nbits else "DequantizeLinear")
    assert f"not run by onnxq's ops: 1 layers (fc ({shown}): " in summary(result, None, tmp_path / "m.onnx")


def test_matmul_of_unknown_rank_stays_qdq():
    """x -> Reshape(to a shape given at run time) -> MatMul: onnx cannot infer the rank, and the layout needs it."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((130, 131)) * 0.1).astype(np.float32), "w")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"), helper.make_node("MatMul", ["r", "w"], ["y"], name="fc")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 130]), helper.make_tensor_value_info("shape", TensorProto.INT64, ["R"])]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 131])
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, [y], [w]), opset_imports=[helper.make_opsetid("", 17)])
    result = _quantized(model, WeightFormat.POST, 4)
    assert "unknown rank" in _kept(result)["fc"][1]


def test_weight_read_both_ways_stays_qdq():
    """One 2-D weight read by a MatMul as (K, M) and by a Gemm with transB=1 as (M, K): no one packing serves both."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((160, 160)) * 0.1).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Gemm", ["h", "w"], ["y"], name="fc", transB=1)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 160])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 160])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)])
    result = _quantized(model, WeightFormat.INT, 4)
    assert "one node and (M, K) by another" in _kept(result)["mm,fc"][1]


def test_weight_shared_by_a_conv_and_a_matmul_stays_qdq():
    """x[1,200,1,1] -> Conv(w) -> MatMul(w): one (200, 200, 1, 1) tensor read by a Conv and a MatMul stays QDQ."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((200, 200, 1, 1)) * 0.1).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 200, 1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [200, 200, 1, 1])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)])
    result = _quantized(model, WeightFormat.INT, 4)
    assert "shared by a Conv and a Gemm/MatMul" in _kept(result)["conv,mm"][1]


def test_computed_weight_is_left_in_float():
    model = _gemm_model(387, 341, [5], "MatMul")
    model.graph.input.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [387, 341]))
    model.graph.node.append(helper.make_node("MatMul", ["x", "w2"], ["y2"], name="dynamic"))
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [5, 341]))
    result = _quantized(model, WeightFormat.INT, 4)
    assert [s.node for s in result.skipped] == ["dynamic"] and [layer.op for layer in result.layers] == ["IntConv"]


def test_last_layer_at_first_last_bits_stays_qdq_without_a_reason():
    """Default --first-last-bits 8 with -b 4: a lone Gemm is first and last, so it is 8-bit QDQ by the rule, not for want of support."""
    result = quantize_with_report(_gemm_model(131, 127, [5], "Gemm", (127,)), QuantizeConfig(bits=4, format=WeightFormat.INT))
    assert [(layer.op, layer.bits, layer.qdq_reason) for layer in result.layers] == [("DequantizeLinear", 8, "")]


@pytest.mark.parametrize("fmt", [WeightFormat.INT, WeightFormat.POST])
def test_a_large_last_gemm_runs_as_intconv_at_first_last_bits(fmt):
    """A boundary Gemm big enough for the op runs as 8-bit IntConv in either op format (weight-only QDQ dequantizes every
    run; 8-bit codes: --reduce-range off, as on a CPU with VNNI)."""
    float_model = _gemm_model(521, 263, [5], "Gemm", (263,), transB=1)
    assert 521 * 263 >= MIN_WEIGHTS
    result = quantize_with_report(float_model, QuantizeConfig(bits=4, format=fmt, reduce_range=ReduceRange.OFF))
    assert [(layer.op, layer.bits) for layer in result.layers] == [("IntConv", 8)]
    x = np.random.default_rng(1).standard_normal((5, 521)).astype(np.float32)
    (y,) = session(result.model.SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(y, _reference(float_model, x, WeightFormat.INT, 8))


def _transformer_block(k: int, hidden: int, tokens: list) -> onnx.ModelProto:
    """A MiniLM-like stack: x[batch, tokens, K] -> MatMul(W1) + b1 -> Relu -> MatMul(W2) -> y, rows of very different ranges."""
    rng = np.random.default_rng(7)
    w1 = (rng.standard_t(5, (k, hidden)) * 0.05).astype(np.float32)
    w2 = (rng.standard_t(5, (hidden, k)) * 0.05).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32) * np.float32(0.1)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [*tokens, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [*tokens, k])
    model = helper.make_model(helper.make_graph(nodes, "block", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_transformer_matmuls_quantize_each_token_with_its_own_step():
    """--format int without calibrated steps: each MatMul's op quantizes every token (row) with its own step (x_steps=
    "pixel"), so a token of large values no longer coarsens the others; the model equals numpy's per-row model of the
    definition bit for bit (codes from onnxq's quantizer), and is as close to float as the 4-bit weights alone
    (12.5 dB per token, when written; one step per tensor: 10.7 dB)."""
    k, hidden, tokens = 384, 512, [2, 7]
    float_model = _transformer_block(k, hidden, tokens)
    result = _quantized(float_model, WeightFormat.INT, 4)
    ops = [n for n in result.model.graph.node if n.op_type == "IntConv"]
    assert len(ops) == 2 and all(has_pixel_steps(op) for op in ops)
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((*tokens, k)) * np.exp(rng.uniform(-3, 3, (*tokens, 1)))).astype(np.float32)
    out = session(result.model.SerializeToString()).run(None, {"x": x})[0]

    inits = _inits(float_model)
    layers = []
    for name in ("w1", "w2"):
        q = quantize_weight(inits[name].T, 4, 0, SqrtMode.OFF, balanced=True)
        layers.append((q.codes, np.asarray(q.scale, np.float32)))
    h = _per_row_reference(x, *layers[0], None)
    r = np.maximum(h + inits["b1"], np.float32(0))
    want = _per_row_reference(r, *layers[1], None)
    np.testing.assert_array_equal(out, want)

    def float_of(codes, scale):
        return (codes.astype(np.float32) * scale[:, None]).T

    exact = np.maximum(x @ inits["w1"] + inits["b1"], 0) @ inits["w2"]
    weights_only = np.maximum(x @ float_of(*layers[0]) + inits["b1"], 0) @ float_of(*layers[1])
    per_tensor = _per_tensor_model(x, layers, inits["b1"])

    def sqnr(y):  # per token, averaged: the tokens' ranges differ by up to e^6
        return float(np.mean(10 * np.log10((exact**2).sum(-1) / ((exact - y) ** 2).sum(-1))))

    assert sqnr(out) > sqnr(per_tensor) + 1 and sqnr(out) > sqnr(weights_only) - 0.2, (sqnr(out), sqnr(per_tensor), sqnr(weights_only))


def _per_tensor_model(x: np.ndarray, layers: list, b1: np.ndarray) -> np.ndarray:
    """The same block with X quantized once per tensor (the op's x_steps="tensor"), for the fidelity comparison."""

    def layer(v, codes, scale):
        xq, s_x, z = quantize_input(v, None, None)
        return ((xq.reshape(-1, v.shape[-1]) - z) @ codes.astype(np.int64).T).astype(np.float32).reshape(*v.shape[:-1], -1) * (s_x * scale)

    return layer(np.maximum(layer(x, *layers[0]) + b1, np.float32(0)), *layers[1])


@pytest.mark.parametrize(("fmt", "activations"), [(WeightFormat.INT, "uint8 dynamic per row"), (WeightFormat.POST, "uint8 dynamic")])
def test_inventory_says_how_the_rows_are_quantized(tmp_path, fmt, activations):
    """onnxq inspect: IntConv from a Gemm quantizes each row with its own step, PostConv (no per-row steps) one per tensor."""
    path = tmp_path / "gemm.onnx"
    save_model(_quantized(_gemm_model(387, 341, [5], "Gemm", (341,), transB=1), fmt, 4).model, path)
    (row,) = [n for n in inspect_model(path).nodes if n.op_type in ("IntConv", "PostConv")]
    assert row.activations == activations
