"""onnxq/rewrite/integer_matmuls.py: QDQ MatMuls with a float output as onnxruntime's MatMulIntegerToFloat, bias inside.

The written op's output is checked against numpy's own arithmetic on the codes (the input quantized as ONNX's
QuantizeLinear defines it: x / s rounded half to even, plus z, saturated; integer products; the two steps; the bias),
and the graphs it must leave alone are listed with the reason each stays.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq.pipeline
from onnxq.config import ActivationConfig, QuantizeConfig, WeightFormat
from onnxq.native.domain import MATMUL_INTEGER_TO_FLOAT
from onnxq.native.session import session
from onnxq.pipeline import quantize_with_report
from onnxq.report.summary import summary
from onnxq.rewrite.integer_matmuls import write_integer_matmuls

RNG = np.random.default_rng(5)
K, N = 16, 8
X = RNG.standard_normal((2, 5, K)).astype(np.float32)
CODES = RNG.integers(-8, 8, size=(K, N)).astype(np.int8)
W_SCALE = (RNG.random(N) * 0.1 + 0.02).astype(np.float32)
BIAS = RNG.standard_normal(N).astype(np.float32)
A_SCALE, A_ZERO = np.float32(0.03), np.uint8(120)


def qdq_matmul(bias: str = "vector", weight: str = "int8", reader: str | None = None, w_axis: int = 1) -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul(DequantizeLinear(W)) [-> Add(bias)] [-> reader] -> y.

    ``bias``: "vector" (constant, one per column), "row" (constant (1, N)), "input" (a residual, not constant) or
    "none"; ``weight``: "int8" codes, or "int4" codes widened by a Cast (as onnxq writes 4-bit weights beside uint8
    activations); ``reader``: an op reading the MatMul's output before the Add (QuantizeLinear: a QLinearMatMul group).
    """
    opset = 21 if weight == "int4" else 17
    inits = [numpy_helper.from_array(np.array(A_SCALE), "a_scale"), numpy_helper.from_array(np.array(A_ZERO), "a_zero"),
             numpy_helper.from_array(W_SCALE if w_axis == 1 else np.full(K, 0.05, np.float32), "w_scale")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "a_scale", "a_zero"], ["xd"])]
    if weight == "int4":
        inits.append(helper.make_tensor("w_codes", TensorProto.INT4, [K, N], CODES.reshape(-1).tolist()))
        nodes.append(helper.make_node("Cast", ["w_codes"], ["w_int8"], to=TensorProto.INT8))
        codes = "w_int8"
    else:
        inits.append(numpy_helper.from_array(CODES, "w_codes"))
        codes = "w_codes"
    nodes += [helper.make_node("DequantizeLinear", [codes, "w_scale"], ["wd"], axis=w_axis),
              helper.make_node("MatMul", ["xd", "wd"], ["m"], name="mm")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, K])]
    out = "m"
    if reader == "QuantizeLinear":
        nodes.append(helper.make_node("QuantizeLinear", ["m", "a_scale", "a_zero"], ["mq"]))
        nodes.append(helper.make_node("DequantizeLinear", ["mq", "a_scale", "a_zero"], ["md"]))
        out = "md"
    if bias != "none":
        if bias == "input":
            inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 5, N]))
        else:
            inits.append(numpy_helper.from_array(BIAS if bias == "vector" else BIAS.reshape(1, N), "r"))
        nodes.append(helper.make_node("Add", [out, "r"], ["y"], name="add"))
        out = "y"
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, 5, N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def numpy_reference(bias: np.ndarray | None) -> np.ndarray:
    """The op's result by numpy: QuantizeLinear's codes, integer products, the two steps, then the bias."""
    q = np.clip(np.round(X.astype(np.float64) / np.float64(A_SCALE)) + int(A_ZERO), 0, 255).astype(np.int64)
    sums = (q - int(A_ZERO)) @ CODES.astype(np.int64)
    y = sums * (np.float64(A_SCALE) * W_SCALE.astype(np.float64))
    return y + bias if bias is not None else y


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return session(model.SerializeToString()).run(None, feeds)[0]


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


@pytest.mark.parametrize("weight", ["int8", "int4"])
def test_bias_goes_inside_and_the_result_is_numpy_s(weight):
    model = qdq_matmul(weight=weight)
    assert write_integer_matmuls(model) == {"mm"}
    assert MATMUL_INTEGER_TO_FLOAT in op_types(model) and "Add" not in op_types(model) and "DequantizeLinear" not in op_types(model)
    node = next(n for n in model.graph.node if n.op_type == MATMUL_INTEGER_TO_FLOAT)
    assert node.name == "mm" and node.output[0] == "y" and node.input[6] == "r"
    assert any(imp.domain == "com.microsoft" for imp in model.opset_import)
    onnx.checker.check_model(model)
    want = numpy_reference(BIAS)
    np.testing.assert_allclose(run(model, {"x": X}), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_residual_add_stays_and_the_product_is_still_written():
    model = qdq_matmul(bias="input")
    assert write_integer_matmuls(model) == {"mm"}
    assert op_types(model).count("Add") == 1
    r = RNG.standard_normal((2, 5, N)).astype(np.float32)
    want = numpy_reference(None) + r
    np.testing.assert_allclose(run(model, {"x": X, "r": r}), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_bias_of_another_shape_stays_an_add():
    model = qdq_matmul(bias="row")
    assert write_integer_matmuls(model) == {"mm"}
    assert "Add" in op_types(model)
    want = numpy_reference(BIAS)
    np.testing.assert_allclose(run(model, {"x": X}), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("case", ["quantized output", "per-row weight steps"])
def test_left_alone(case):
    """A quantized output is onnxruntime's QLinearMatMul group; steps per row of W (axis 0) the op does not take."""
    model = qdq_matmul(reader="QuantizeLinear") if case == "quantized output" else qdq_matmul(w_axis=0)
    before = model.SerializeToString()
    assert write_integer_matmuls(model) == set()
    assert model.SerializeToString() == before


def test_the_pipeline_writes_it_and_keeps_the_outputs(monkeypatch, tmp_path):
    """The int format's small MatMuls (outputs left float) become the op; the same model without the rewrite gives the
    same outputs to float32 rounding."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((32, 32)) * 0.2).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((32, 32)) * 0.2).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]), helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = [{"x": np.random.default_rng(s).standard_normal((8, 6, 32)).astype(np.float32)} for s in range(3)]
    config = QuantizeConfig(bits=4, format=WeightFormat.INT, first_last_bits=None, activations=ActivationConfig())
    result = quantize_with_report(model, config, data)
    written = result.model
    assert op_types(written).count(MATMUL_INTEGER_TO_FLOAT) == 2 and "Add" not in op_types(written)
    assert {layer.nodes: layer.op for layer in result.layers} == {("mm1",): MATMUL_INTEGER_TO_FLOAT, ("mm2",): MATMUL_INTEGER_TO_FLOAT}
    onnx.save(written, tmp_path / "mlp.q4.onnx")
    text = summary(result, None, tmp_path / "mlp.q4.onnx")
    assert "mm1 (onnxruntime's MatMulIntegerToFloat, bias inside)" in text and "onnxq ops:" not in text
    monkeypatch.setattr(onnxq.pipeline, "write_integer_matmuls", lambda model: set())
    plain = quantize_with_report(model, config, data).model
    assert MATMUL_INTEGER_TO_FLOAT not in op_types(plain)
    x = np.random.default_rng(9).standard_normal((4, 6, 32)).astype(np.float32)
    want = run(plain, {"x": x})
    np.testing.assert_allclose(run(written, {"x": x}), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
