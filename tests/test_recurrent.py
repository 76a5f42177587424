"""Recurrent layers (LSTM, GRU, RNN): both weights, W and R, are quantized per gate row; the layer stays float otherwise."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import CAST_FORM, float_equivalent, run, weight_of
from onnx import TensorProto, helper, numpy_helper

from onnxq import QuantizeConfig, quantize_with_report
from onnxq.config import ActivationConfig, WeightFormat

T, N, INPUTS, H = 6, 2, 5, 8  # sequence length, batch, input size, hidden size
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_then_gemm(op: str, directions: int = 1) -> onnx.ModelProto:
    """x[T, N, INPUTS] -> op(W, R, B) -> Y_h[dirs, N, H] -> Flatten -> Gemm(fc) -> y[N, 3]; the op's Y output is left unnamed."""
    rng = np.random.default_rng(0)
    gates = GATES[op]
    weights = {
        "W": rng.standard_normal((directions, gates * H, INPUTS)).astype(np.float32) * 0.4,
        "R": rng.standard_normal((directions, gates * H, H)).astype(np.float32) * 0.4,
        "B": rng.standard_normal((directions, 2 * gates * H)).astype(np.float32) * 0.1,
        "fc": rng.standard_normal((3, directions * H)).astype(np.float32),
    }
    direction = "bidirectional" if directions == 2 else "forward"
    nodes = [
        helper.make_node(op, ["x", "W", "R", "B"], ["", "h"], name="rnn", hidden_size=H, direction=direction),
        helper.make_node("Transpose", ["h"], ["ht"], perm=[1, 0, 2]),
        helper.make_node("Flatten", ["ht"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], name="fc", transB=1),
    ]
    v = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, op.lower(), [v("x", TensorProto.FLOAT, [T, N, INPUTS])], [v("y", TensorProto.FLOAT, [N, 3])],
                              [numpy_helper.from_array(w, k) for k, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((T, N, INPUTS)).astype(np.float32)


@pytest.mark.parametrize("op", sorted(GATES))
@pytest.mark.parametrize("bits", [4, 8])
def test_both_weights_are_quantized_per_gate_row_and_the_model_runs(op, bits):
    model = recurrent_then_gemm(op, directions=2 if op == "LSTM" else 1)
    result = quantize_with_report(model, QuantizeConfig(bits=bits, first_last_bits=None))
    assert sorted((layer.tensor, layer.nodes) for layer in result.layers) == [("R", ("rnn",)), ("W", ("rnn",)), ("fc", ("fc",))]
    assert all(layer.per_channel for layer in result.layers)
    assert {"W", "R"}.isdisjoint(t.name for t in result.model.graph.initializer)  # no float copy left
    dirs = 2 if op == "LSTM" else 1
    for index, cols in ((1, INPUTS), (2, H)):  # W and R decoded at load per row along the gate x hidden axis
        decoded = weight_of(result.model, "rnn", index)
        assert (decoded.form, decoded.axis, decoded.scale_shape) == (CAST_FORM, 1, (1, GATES[op] * H, 1))
        assert decoded.codes.shape == (dirs, GATES[op] * H, cols)
    x = {"x": _x()}
    quantized = run(result.model, x)
    np.testing.assert_allclose(quantized, run(float_equivalent(result.model), x), rtol=1e-5, atol=1e-5)
    reference = run(model, x)
    assert 0 < np.linalg.norm(quantized - reference) / np.linalg.norm(reference) < (0.25 if bits == 4 else 0.03)  # 8 bits: max|w| range, 0.021


def test_the_recurrent_input_stays_float_with_quantized_activations():
    """No integer kernel multiplies the sequence with W, so no QDQ pair goes in front of the layer; the Gemm gets its pair."""
    model = recurrent_then_gemm("GRU")
    data = [{"x": _x(seed)} for seed in range(4)]
    result = quantize_with_report(model, QuantizeConfig(bits=8, first_last_bits=None, activations=ActivationConfig()), data)
    assert [a.tensor for a in result.activations] == ["flat"]
    rnn = next(n for n in result.model.graph.node if n.op_type == "GRU")
    assert rnn.input[0] == "x"


def test_the_op_formats_keep_recurrent_layers_as_qdq_with_the_reason():
    result = quantize_with_report(recurrent_then_gemm("LSTM"), QuantizeConfig(bits=4, first_last_bits=None, format=WeightFormat.INT))
    reasons = {layer.tensor: layer.qdq_reason for layer in result.layers}
    assert reasons["W"] == reasons["R"] == "a recurrent layer (LSTM); the ops run Conv, Gemm and MatMul"


def test_a_tensor_width_applies_to_that_weight_only_where_a_node_width_applies_to_all():
    model = recurrent_then_gemm("LSTM")
    by_tensor = quantize_with_report(model, QuantizeConfig(bits=4, first_last_bits=None, tensor_bits={"W": 8}))
    assert {layer.tensor: layer.bits for layer in by_tensor.layers} == {"W": 8, "R": 4, "fc": 4}
    by_node = quantize_with_report(model, QuantizeConfig(bits=4, first_last_bits=None, node_bits={"rnn": 8}, tensor_bits={"R": 6}))
    assert {layer.tensor: layer.bits for layer in by_node.layers} == {"W": 8, "R": 6, "fc": 4}


def test_inspect_lists_both_weights(tmp_path):
    from onnxq.analysis.inventory import inspect_model
    from onnxq.model.save import save_model

    model = recurrent_then_gemm("LSTM")
    onnx.save(model, tmp_path / "float.onnx")
    rows = [(n.node, n.weight, n.format) for n in inspect_model(tmp_path / "float.onnx").nodes]
    assert rows == [("rnn", "W", "float32"), ("rnn", "R", "float32"), ("fc", "fc", "float32")]
    save_model(quantize_with_report(model, QuantizeConfig(bits=4, first_last_bits=None)).model, tmp_path / "q.onnx")
    rows = [(n.node, n.format, n.shape) for n in inspect_model(tmp_path / "q.onnx").nodes]
    assert rows == [("rnn", "int4", (1, 4 * H, INPUTS)), ("rnn", "int4", (1, 4 * H, H)), ("fc", "int4", (3, H))]
