"""uint8 chains between onnxq's ops (onnxq/rewrite/chains.py), on models quantized W4A8 in the int format.

The reference is the same model quantized without the chain rewrite (each op quantizing its float input itself with
the calibrated step): a link alone must give the same outputs bit for bit (the op's output quantization is its
reader's input quantization); a fused residual Add forms the sum from the op's exact output instead of its quantized
copy, so the outputs move by about a code step there, no more.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq.pipeline
from onnxq.config import ActivationConfig, CalibrationMethod, QuantizeConfig, WeightFormat
from onnxq.native.session import session
from onnxq.pipeline import quantize_with_report
from onnxq.report.summary import summary

C = 8


def _conv(rng: np.random.Generator, name: str, x: str, out: str, inits: list[onnx.TensorProto], c_in: int = C) -> onnx.NodeProto:
    inits.append(numpy_helper.from_array((rng.standard_t(5, size=(C, c_in, 3, 3)) * 0.2).astype(np.float32), f"{name}_w"))
    inits.append(numpy_helper.from_array((rng.standard_normal(C) * 0.1).astype(np.float32), f"{name}_b"))
    return helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [out], name=name, pads=[1, 1, 1, 1])


def _network(residual: bool, conv_output: bool = False) -> onnx.ModelProto:
    """x[N,3,10,10] -> conv0 -> Relu -> conv1 -> Relu -> conv2 [-> Add(conv0's Relu)] -> Relu -> conv3 -> Relu -> GAP -> Gemm.

    ``conv_output``: conv1's Relu is a graph output too.
    """
    rng = np.random.default_rng(4)
    inits: list[onnx.TensorProto] = []
    nodes = [_conv(rng, "conv0", "x", "c0", inits, 3), helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             _conv(rng, "conv1", "r0", "c1", inits), helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             _conv(rng, "conv2", "r1", "c2", inits)]
    if residual:
        nodes.append(helper.make_node("Add", ["c2", "r0"], ["s2"], name="add"))
    nodes += [helper.make_node("Relu", ["s2" if residual else "c2"], ["r2"], name="relu2"), _conv(rng, "conv3", "r2", "c3", inits),
              helper.make_node("Relu", ["c3"], ["r3"], name="relu3"), helper.make_node("GlobalAveragePool", ["r3"], ["p"], name="gap"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten")]
    inits.append(numpy_helper.from_array((rng.standard_normal((5, C)) * 0.3).astype(np.float32), "fc_w"))
    nodes.append(helper.make_node("Gemm", ["f", "fc_w"], ["y"], name="fc", transB=1))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])]
    if conv_output:
        outputs.append(helper.make_tensor_value_info("r1", TensorProto.FLOAT, ["N", C, 10, 10]))
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _data(seed: int = 5, batches: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 3, 10, 10)).astype(np.float32)} for _ in range(batches)]


CONFIG = QuantizeConfig(bits=4, format=WeightFormat.INT, first_last_bits=None, activations=ActivationConfig())


def _both(model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch, config: QuantizeConfig = CONFIG):
    """The model quantized with the chain rewrite, and without it (the reference)."""
    chained = quantize_with_report(model, config, _data())
    with monkeypatch.context() as patch:
        patch.setattr(onnxq.pipeline, "link_chains", lambda graph: None)
        plain = quantize_with_report(model, config, _data())
    return chained, plain


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return session(model.SerializeToString()).run(None, {"x": x})


def test_a_chain_without_residuals_gives_the_same_outputs_bit_for_bit(monkeypatch):
    chained, plain = _both(_network(residual=False), monkeypatch)
    ops = [n.op_type for n in chained.model.graph.node if n.domain == "ai.onnxq"]
    assert ops == ["IntConvQ"] * 4, ops  # every conv writes uint8: conv3's codes go to the pooling's QDQ pair
    linked = {n.name: n for n in chained.model.graph.node if n.op_type == "IntConvQ"}
    assert linked["conv2"].input[0] == linked["conv1"].output[0]  # no float tensor, no QuantizeLinear between them
    assert chained.chains is not None and chained.chains.linked == 4 and chained.chains.residuals == 0
    x = np.random.default_rng(9).standard_normal((16, 3, 10, 10)).astype(np.float32)
    np.testing.assert_array_equal(_run(chained.model, x)[0], _run(plain.model, x)[0])


def test_a_residual_add_goes_into_the_op_and_moves_the_output_by_about_a_step(monkeypatch):
    chained, plain = _both(_network(residual=True), monkeypatch)
    assert not any(n.op_type == "Add" for n in chained.model.graph.node)
    conv2 = next(n for n in chained.model.graph.node if n.name == "conv2")
    conv0 = next(n for n in chained.model.graph.node if n.name == "conv0")
    assert conv2.op_type == "IntConvQ" and conv2.input[8] == conv0.output[0]  # R: conv0's uint8 codes, with their step
    inits = {t.name: numpy_helper.to_array(t) for t in chained.model.graph.initializer}
    assert inits[conv2.input[9]] == inits[conv0.input[6]] and inits[conv2.input[10]] == inits[conv0.input[7]]
    assert not any(n.op_type == "Relu" for n in chained.model.graph.node)
    clip = next((a.f for a in conv2.attribute if a.name == "clip_min"), None)
    assert clip == 0.0 or inits[conv2.input[7]] == 0  # the Relu after the Add: a clip, or the output's zero point 0
    assert chained.chains.residuals == 1 and chained.chains.linked == 4
    x = np.random.default_rng(9).standard_normal((64, 3, 10, 10)).astype(np.float32)
    got, want = _run(chained.model, x)[0], _run(plain.model, x)[0]
    assert not np.array_equal(got, want)  # the sum is formed from the exact output now
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.9


def test_the_summary_says_where_a_chain_breaks_and_why(monkeypatch, tmp_path):
    result = quantize_with_report(_network(residual=False, conv_output=True), CONFIG, _data())
    report = result.chains
    assert report.float_outputs == {"conv1": "a graph output"} and report.linked == 3
    path = tmp_path / "m.onnx"
    onnx.save_model(result.model, path)
    text = summary(result, None, path)
    assert "uint8 chains: 3 of 4 onnxq op outputs go to the next ops as uint8; float after conv1: a graph output" in text
    x = np.random.default_rng(2).standard_normal((4, 3, 10, 10)).astype(np.float32)
    _, plain = _both(_network(residual=False, conv_output=True), monkeypatch)
    for got, want in zip(_run(result.model, x), _run(plain.model, x), strict=True):
        np.testing.assert_array_equal(got, want)


def test_with_asq_an_op_read_by_a_float_node_writes_float_and_no_pair_simulates_quantization(monkeypatch):
    """ASQ in the int format: the pooling's input, its output and the classifier's input (a Gemm under onnxq's op size)
    are read by no onnxq op, so they stay float (placement.sites_integer_kernels_read): conv3 writes float for the pooling,
    and no Div/QuantizeLinear/DequantizeLinear/Mul chain simulates per-channel steps. The qdq format keeps them."""
    asq = ActivationConfig(method=CalibrationMethod.ASQ)
    config = QuantizeConfig(bits=4, format=WeightFormat.INT, first_last_bits=None, activations=asq)
    chained, plain = _both(_network(residual=False), monkeypatch, config)
    assert chained.float_activations == ["r3", "p", "f"]
    assert {a.tensor for a in chained.activations} == {"x", "r0", "r1", "r2"}
    assert chained.chains.float_outputs == {"conv3": "read by GlobalAveragePool gap"}
    conv3 = next(n for n in chained.model.graph.node if n.name == "conv3")
    assert conv3.op_type == "IntConv" and [n.op_type for n in chained.model.graph.node if conv3.output[0] in n.input] == ["GlobalAveragePool"]
    nodes = {n.name: n for n in chained.model.graph.node}
    assert nodes["flatten"].input[0] == nodes["gap"].output[0] and nodes["fc"].input[0] == nodes["flatten"].output[0]  # no pair between
    x = np.random.default_rng(3).standard_normal((8, 3, 10, 10)).astype(np.float32)
    got, want = _run(chained.model, x)[0], _run(plain.model, x)[0]
    # the chained ops' per-sample steps are summed in double, the reference's in float32: a code moves next to a tie only
    assert np.mean(np.abs(got - want) <= 1e-5 * np.abs(want).max()) > 0.9
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
    qdq = quantize_with_report(_network(residual=False), QuantizeConfig(bits=4, first_last_bits=None, activations=asq), _data())
    assert qdq.float_activations == [] and {"r3", "p", "f"} <= {a.tensor for a in qdq.activations}
    pairs = [n for n in qdq.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0].startswith("r3")]
    assert len(pairs) == 1 and qdq.activations[[a.tensor for a in qdq.activations].index("r3")].adapter is not None


def test_the_summary_names_the_activations_asq_leaves_float(tmp_path):
    config = QuantizeConfig(bits=4, format=WeightFormat.INT, first_last_bits=None, activations=ActivationConfig(method=CalibrationMethod.ASQ))
    result = quantize_with_report(_network(residual=False), config, _data())
    path = tmp_path / "m.onnx"
    onnx.save_model(result.model, path)
    text = summary(result, None, path)
    assert "quantized 4 activation tensors" in text
    assert "left float: 3 activation tensors no onnxq op reads (r3, p, f)" in text


def _conv_then_small_matmuls() -> onnx.ModelProto:
    """x -> conv0 -> Relu -> GAP -> Flatten f -> MatMul(16x16) m -> Add(m, f) s -> Mul(2) t -> MatMul(16x4) y: a conv the
    ops run, then a transformer-like tail whose weights are under the ops' size (they stay QDQ: onnxruntime's
    QLinearMatMul)."""
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32), "w0"),
             numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((16, 4)) * 0.3).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("GlobalAveragePool", ["r0"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w1"], ["m"], name="mm1"), helper.make_node("Add", ["m", "f"], ["s"], name="add"),
             helper.make_node("Mul", ["s", "two"], ["t"], name="mul"), helper.make_node("MatMul", ["t", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "tail", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("fmt", [WeightFormat.INT, WeightFormat.POST])
def test_fixed_steps_leave_float_what_only_float_kernels_and_small_matmuls_read(fmt):
    """In an op format, the outputs of Gemm/MatMul layers that stay QDQ (and the residual Add joining them) stay float:
    QLinearMatMuls and their pairs ran the ViT at 0.84x float, MatMulIntegerToFloat (quantized input, float output)
    0.95-1.05x. The MatMuls' inputs, the conv's input and its output, which QLinearGlobalAveragePool reads as codes,
    stay quantized; the qdq format quantizes every site."""
    data = [{"x": np.random.default_rng(s).standard_normal((8, 3, 8, 8)).astype(np.float32)} for s in range(3)]
    config = QuantizeConfig(bits=4, format=fmt, first_last_bits=None, activations=ActivationConfig())
    result = quantize_with_report(_conv_then_small_matmuls(), config, data)
    assert {layer.tensor: layer.op for layer in result.layers}["w0"] in ("IntConv", "PostConv")
    assert {"m", "s"} <= set(result.float_activations)  # mm1's output and the Add joining it
    quantized = {a.tensor for a in result.activations}
    assert {"x", "r0", "f", "t"} <= quantized and not {"m", "s"} & quantized  # the MatMuls' inputs: MatMulIntegerToFloat
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in ("m", "s") for n in result.model.graph.node)
    qdq = quantize_with_report(_conv_then_small_matmuls(), QuantizeConfig(bits=4, first_last_bits=None, activations=ActivationConfig()), data)
    assert qdq.float_activations == [] and {"f", "m", "s", "t"} <= {a.tensor for a in qdq.activations}
    x = np.random.default_rng(7).standard_normal((16, 3, 8, 8)).astype(np.float32)
    want = session(_conv_then_small_matmuls().SerializeToString()).run(None, {"x": x})[0]
    got = session(result.model.SerializeToString()).run(None, {"x": x})[0]
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()
