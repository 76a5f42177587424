"""The whole weight pipeline on tiny models: graph shape, semantics, bits per layer, opsets, external data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import (
    CAST_FORM,
    assert_op_counts,
    decoded_weight,
    decoded_weight_counts,
    decoded_weights,
    float_equivalent,
    random_feeds,
    run,
    weight_of,
)

from models import conv_bn_relu_gemm, depthwise_convtranspose, shared_weight_matmuls, weight_with_other_reader
from onnxq import Granularity, NBitsMode, OnnxqError, QuantizeConfig, SqrtMode, WeightFormat, quantize, quantize_with_report, save_model
from onnxq.config import ActivationConfig
from onnxq.model.opset import default_opset


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize("builder", [conv_bn_relu_gemm, shared_weight_matmuls, depthwise_convtranspose])
@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("sqrt", [SqrtMode.OFF, SqrtMode.ON])
def test_quantized_graph_computes_dequantized_weights(builder, bits, sqrt):
    # The rewritten graph must compute exactly the float model with weights replaced by codes*scale
    # (squared with sign in sqrt mode), decoded here independently of onnxq.
    quantized = quantize(builder(), QuantizeConfig(bits=bits, sqrt=sqrt, first_last_bits=None))
    onnx.checker.check_model(quantized)
    feeds = random_feeds(quantized, batch=2)
    np.testing.assert_allclose(run(quantized, feeds), run(float_equivalent(quantized), feeds), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_close_to_float(bits):
    model = conv_bn_relu_gemm()
    feeds = random_feeds(model, batch=4)
    ref = run(model, feeds)
    out = run(quantize(model, QuantizeConfig(bits=bits, first_last_bits=None)), feeds)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < {4: 0.25, 8: 0.02}[bits]


def test_weight_only_int4_keeps_the_opset_and_packs_two_codes_a_byte():
    """Weight-only 4-bit codes are plain uint8 halves (no int4 type): the model keeps its opset and IR version."""
    source = conv_bn_relu_gemm()
    quantized = quantize(source, QuantizeConfig(bits=4, first_last_bits=None))
    assert default_opset(quantized) == 17 and quantized.ir_version == source.ir_version
    codes = _init(quantized, "w2_quantized")
    assert codes.data_type == onnx.TensorProto.UINT8
    assert len(codes.raw_data) == (8 * 8 * 3 * 3 + 1) // 2
    assert weight_of(quantized, "conv2").codes_type == onnx.TensorProto.INT4  # read back by the tests' own decoder
    assert "w2" not in {t.name for t in quantized.graph.initializer}
    assert not any(t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) for t in quantized.graph.initializer)


def test_int4_with_quantized_activations_takes_opset_21():
    """int4 DequantizeLinear (fused with the activations into onnxruntime's integer kernels) needs opset 21."""
    data = [{"x": np.random.default_rng(i).standard_normal((1, 3, 8, 8)).astype(np.float32)} for i in range(4)]
    quantized = quantize(conv_bn_relu_gemm(), QuantizeConfig(bits=4, first_last_bits=None, activations=ActivationConfig()), data)
    assert default_opset(quantized) == 21 and quantized.ir_version >= 10
    assert _init(quantized, "w2_quantized").data_type == onnx.TensorProto.INT4


def test_opset_conversion_keeps_the_nodes_metadata():
    """Exporters (torch's dynamo) note each node's source in metadata_props; onnx's version converter drops them."""
    model = conv_bn_relu_gemm()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    onnx.helper.set_metadata_props(relu, {"pkg.torch.onnx.fx_node": "relu(x)", "namespace": "stem"})
    name = relu.name
    model.opset_import[0].version = 11  # below onnxq's oldest (13): converted
    quantized = quantize(model, QuantizeConfig(bits=4, first_last_bits=None))
    assert default_opset(quantized) == 13
    (node,) = (n for n in quantized.graph.node if n.name == name)
    assert {p.key: p.value for p in node.metadata_props} == {"pkg.torch.onnx.fx_node": "relu(x)", "namespace": "stem"}


def test_int8_keeps_opset():
    quantized = quantize(conv_bn_relu_gemm(), QuantizeConfig(bits=8))
    assert default_opset(quantized) == 17
    assert all(_init(quantized, f"{w}_quantized").data_type == onnx.TensorProto.INT8 for w in ("w1", "w2", "w3"))


def test_first_and_last_layers_stay_8_bit():
    result = quantize_with_report(conv_bn_relu_gemm(), QuantizeConfig(bits=4))
    bits = {layer.nodes[0]: layer.bits for layer in result.layers}
    assert bits == {"conv1": 8, "conv2": 4, "fc": 8}
    types = {name: weight_of(result.model, name).codes_type for name in ("conv1", "conv2", "fc")}
    assert types == {"conv1": onnx.TensorProto.INT8, "conv2": onnx.TensorProto.INT4, "fc": onnx.TensorProto.INT8}


def test_per_channel_axes_follow_the_op():
    model = quantize(depthwise_convtranspose(), QuantizeConfig(bits=4, first_last_bits=None, sqrt=SqrtMode.OFF))
    decoded = {w.codes_name: w for w in decoded_weights(model)}
    # depthwise Conv weight (4,1,3,3): output channels on axis 0; ConvTranspose (4,6,2,2), group 1: axis 1.
    assert {k: w.axis for k, w in decoded.items()} == {"dw_quantized": 0, "up_quantized": 1}
    assert weight_of(model, "depthwise").codes_name == "dw_quantized" and weight_of(model, "up").codes_name == "up_quantized"
    # decoded at load: the scale is shaped to broadcast along that axis
    assert {k: w.scale_shape for k, w in decoded.items()} == {"dw_quantized": (4, 1, 1, 1), "up_quantized": (1, 6, 1, 1)}


def test_per_tensor_has_scalar_scales():
    model = quantize(conv_bn_relu_gemm(), QuantizeConfig(bits=4, granularity=Granularity.TENSOR))
    decoded = decoded_weights(model)
    assert [(w.form, w.scale_shape, w.axis) for w in decoded] == [(CAST_FORM, (), None)] * 3


def test_shared_weight_is_quantized_once():
    """Decoded at load (plain or sqrt codes): one decoding feeds the three MatMuls; --matmul-nbits on, plain codes: three
    MatMulNBits read one copy of the codes."""
    for sqrt in (SqrtMode.OFF, SqrtMode.ON):
        result = quantize_with_report(shared_weight_matmuls(), QuantizeConfig(bits=4, first_last_bits=None, sqrt=sqrt))
        assert len(result.layers) == 1 and result.layers[0].nodes == ("mm1", "mm2", "mm3")
        assert_op_counts(result.model, DequantizeLinear=0, MatMul=3, MatMulNBits=0)
        (decoded,) = decoded_weights(result.model)
        assert decoded.form == CAST_FORM and decoded.sqrt is (sqrt is SqrtMode.ON)
        assert [n.input[1] for n in result.model.graph.node if n.op_type == "MatMul"] == [decoded.output] * 3
    result = quantize_with_report(shared_weight_matmuls(), QuantizeConfig(bits=4, first_last_bits=None, sqrt=SqrtMode.OFF, matmul_nbits=NBitsMode.ON))
    assert len(result.layers) == 1 and result.layers[0].nodes == ("mm1", "mm2", "mm3")
    assert_op_counts(result.model, DequantizeLinear=0, MatMul=0, MatMulNBits=3)
    assert len({(n.input[1], n.input[2]) for n in result.model.graph.node if n.op_type == "MatMulNBits"}) == 1
    assert not decoded_weights(result.model)


def test_shared_weight_gets_the_higher_bits_of_its_users():
    # mm1 is first and mm3 is last, so the one shared tensor must stay at 8 bits.
    result = quantize_with_report(shared_weight_matmuls(), QuantizeConfig(bits=4))
    assert [layer.bits for layer in result.layers] == [8]


def test_constant_node_weights_quantize_like_initializers():
    config = QuantizeConfig(bits=4, first_last_bits=None)
    a = quantize(conv_bn_relu_gemm(as_constants=True), config)
    b = quantize(conv_bn_relu_gemm(as_constants=False), config)
    assert_op_counts(a, Constant=0)
    assert decoded_weight_counts(a) == {CAST_FORM: 3}
    feeds = random_feeds(a)
    np.testing.assert_array_equal(run(a, feeds), run(b, feeds))


def test_exclude_leaves_node_in_float():
    result = quantize_with_report(conv_bn_relu_gemm(), QuantizeConfig(bits=4, exclude=frozenset({"conv2"})))
    assert [layer.nodes for layer in result.layers] == [("conv1",), ("fc",)]
    assert "w2" in {t.name for t in result.model.graph.initializer}
    assert any(s.node == "conv2" for s in result.skipped)


def _matmul_chain():
    """x[16,3] -> W @ x (weight first) -> h @ h^T (two activations) -> p @ v (weight second) -> y @ x2 (graph-input weight)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in (("w", (8, 16)), ("v", (8, 4)))]
    nodes = [
        helper.make_node("MatMul", ["w", "x"], ["h"], name="w_first"),
        helper.make_node("Transpose", ["h"], ["ht"], name="transpose"),
        helper.make_node("MatMul", ["h", "ht"], ["p"], name="two_activations"),
        helper.make_node("MatMul", ["p", "v"], ["y"], name="weighted"),
        helper.make_node("MatMul", ["y", "x2"], ["z"], name="input_weight"),
    ]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "g", [value("x", TensorProto.FLOAT, [16, 3]), value("x2", TensorProto.FLOAT, [4, 4])], [value("z", TensorProto.FLOAT, [8, 4])], inits
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_matmuls_left_float_say_why():
    """A product of two activations and a graph-input weight each get their own reason."""
    result = quantize_with_report(_matmul_chain(), QuantizeConfig(bits=8))
    reasons = {s.node: s.reason for s in result.skipped}
    assert set(reasons) == {"two_activations", "input_weight"}
    assert "two activations" in reasons["two_activations"] and "graph input" in reasons["input_weight"]


def test_a_weight_first_matmul_is_quantized_per_output_row():
    """W @ x: W's rows are the output channels, so its per-channel scales run along axis 0."""
    model = _matmul_chain()
    result = quantize_with_report(model, QuantizeConfig(bits=8))
    assert [layer.nodes for layer in result.layers] == [("w_first",), ("weighted",)]
    decoded = weight_of(result.model, "w_first", 0)
    assert decoded.scale.shape == (8,) and decoded.axis == 0 and decoded.scale_shape == (8, 1)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((16, 3)).astype(np.float32), "x2": rng.standard_normal((4, 4)).astype(np.float32)}
    got, want = run(result.model, feeds), run(model, feeds)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02


def test_a_weight_first_matmul_stays_qdq_in_the_op_formats_and_says_why():
    from onnxq.config import WeightFormat

    result = quantize_with_report(_matmul_chain(), QuantizeConfig(bits=8, first_last_bits=None, format=WeightFormat.INT))
    layer = next(layer for layer in result.layers if layer.nodes == ("w_first",))
    assert layer.op == "DequantizeLinear" and "W @ x" in layer.qdq_reason


def _gemm_weight_first(trans_a: int, trans_b: int) -> onnx.ModelProto:
    """x[16, 5] (x[5, 16] with transB) -> Gemm(A=wa, B=x, C=c; alpha 0.5, beta 2) -> h[8, 5] -> Relu -> MatMul(v) -> y[8, 4].

    W @ x written as a Gemm: its constant is A.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    wa = rng.standard_normal((16, 8) if trans_a else (8, 16)).astype(np.float32)
    b_shape = [5, 16] if trans_b else [16, 5]
    inits = [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(rng.standard_normal((8, 1)).astype(np.float32), "c"),
             numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "v")]
    nodes = [
        helper.make_node("Gemm", ["wa", "x", "c"], ["h"], name="gemm_first", transA=trans_a, transB=trans_b, alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "v"], ["y"], name="weighted"),
    ]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, b_shape)], [value("y", TensorProto.FLOAT, [8, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_a_gemm_with_its_weight_first_is_quantized_as_w_at_x(trans_a, trans_b):
    """Gemm(W, x): the constant is A, so it becomes MatMul(alpha * op(W), op(x)) + beta * C, W quantized per output row."""
    model = _gemm_weight_first(trans_a, trans_b)
    result = quantize_with_report(model, QuantizeConfig(bits=8, first_last_bits=None))
    assert [layer.nodes for layer in result.layers] == [("gemm_first",), ("weighted",)]
    decoded = weight_of(result.model, "gemm_first", 0)
    wa = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "wa"))
    want_weight = 0.5 * (wa.T if trans_a else wa)
    assert decoded.axis == 0 and decoded.codes.shape == (8, 16)
    assert np.max(np.abs(decoded.values - want_weight)) <= np.max(np.abs(want_weight)) / 127
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 16) if trans_b else (16, 5)).astype(np.float32)}
    got, want = run(result.model, feeds), run(model, feeds)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02
    np.testing.assert_allclose(got, run(float_equivalent(result.model), feeds), rtol=1e-5, atol=1e-5)


def test_input_model_is_not_modified():
    model = conv_bn_relu_gemm()
    before = model.SerializeToString()
    quantize(model, QuantizeConfig(bits=4))
    assert model.SerializeToString() == before


def test_no_quantizable_weights_is_an_error():
    model = shared_weight_matmuls()
    # Make the weight a graph input: nothing constant is left to quantize.
    del model.graph.initializer[:]
    model.graph.input.append(onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [16, 16]))
    with pytest.raises(OnnxqError, match="no quantizable weights"):
        quantize(model)


def test_external_data_round_trip(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save_model(conv_bn_relu_gemm(c=32), src, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    data_before = (tmp_path / "ext.onnx.data").read_bytes()
    result = quantize_with_report(src, QuantizeConfig(bits=4))
    assert result.source.external_data
    out = save_model(result.model, tmp_path / "ext.q4.onnx", external_data=True)
    assert (tmp_path / "ext.q4.onnx.data").exists()
    assert (tmp_path / "ext.onnx.data").read_bytes() == data_before
    structure = onnx.load(out, load_external_data=False)
    assert _init(structure, "w2_quantized").data_location == onnx.TensorProto.EXTERNAL
    reloaded = onnx.load(out)
    feeds = random_feeds(reloaded)
    np.testing.assert_allclose(run(out, feeds), run(float_equivalent(reloaded), feeds), rtol=1e-5, atol=1e-6)


def test_old_opset_is_upgraded():
    model = conv_bn_relu_gemm(with_bn=False)
    model.opset_import[0].version = 11
    quantized = quantize(model, QuantizeConfig(bits=8))
    assert default_opset(quantized) >= 13
    feeds = random_feeds(model)
    np.testing.assert_allclose(run(quantized, feeds), run(float_equivalent(quantized), feeds), rtol=1e-5, atol=1e-6)


def test_codes_decode_to_reported_sqnr():
    result = quantize_with_report(conv_bn_relu_gemm(with_bn=False), QuantizeConfig(bits=4, first_last_bits=None, sqrt=SqrtMode.OFF))
    layer = next(layer for layer in result.layers if layer.tensor == "w2")
    codes = weight_of(result.model, "conv2").codes.astype(np.float32)  # the tests' own reading of the stored halves
    scale = onnx.numpy_helper.to_array(_init(result.model, "w2_scale")).reshape(-1, 1, 1, 1)
    w = onnx.numpy_helper.to_array(_init(conv_bn_relu_gemm(with_bn=False), "w2")).astype(np.float64)
    sqnr = 10 * np.log10(np.sum(w**2) / np.sum((w - codes * scale) ** 2))
    assert sqnr == pytest.approx(layer.sqnr_db, abs=1e-3)


@pytest.mark.parametrize("bits", [4, 8])
def test_control_flow_body_weights_are_quantized_and_the_model_runs(bits):
    from models import conv_then_if

    model = conv_then_if()
    result = quantize_with_report(model, QuantizeConfig(bits=bits, first_last_bits=None))
    assert [(layer.tensor, layer.nodes) for layer in result.layers] == [("w", ("conv",)), ("w2", ("branch/Conv_0",))]
    assert "w2" not in {t.name for t in result.model.graph.initializer}  # the float weight is gone, the body reads its codes
    branch = next(n for n in result.model.graph.node if n.op_type == "If")
    body_conv = next(a.g for a in branch.attribute if a.name == "then_branch").node[0]
    assert body_conv.input[1] in {out for n in result.model.graph.node for out in n.output}  # decoded in the main graph
    assert decoded_weight(result.model, body_conv.input[1]).form == CAST_FORM  # codes decoded at load (and squared in sqrt mode)
    x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        quantized = run(result.model, feeds)
        np.testing.assert_allclose(quantized, run(float_equivalent(result.model), feeds), rtol=1e-5, atol=1e-6)
        reference = run(model, feeds)
        relative = np.linalg.norm(quantized - reference) / np.linalg.norm(reference)
        assert 0 < relative < (0.25 if bits == 4 else 0.02)




def test_eight_bit_weights_take_the_full_range_without_data():
    """At 8 bits the range is max|w| per row (scale = max|w| / 127), never clipped; at 4 bits the search still clips outliers."""
    from onnxq.numerics.weights import quantize_weight

    rows = np.random.default_rng(9).standard_t(2, (16, 256)).astype(np.float32)
    eight = quantize_weight(rows, 8, 0)
    np.testing.assert_allclose(eight.scale, np.abs(rows).max(axis=1) / 127, rtol=1e-6)
    four = quantize_weight(rows, 4, 0, SqrtMode.OFF)
    assert np.median(four.scale * 7 / np.abs(rows).max(axis=1)) < 0.9


@pytest.mark.parametrize(
    ("layer", "config"),
    [
        ("conv", QuantizeConfig(bits=4, first_last_bits=None, format=WeightFormat.INT)),
        ("conv", QuantizeConfig(bits=4, first_last_bits=None, format=WeightFormat.POST)),
        ("matmul", QuantizeConfig(bits=4, first_last_bits=None, matmul_nbits=NBitsMode.ON)),
        ("gather", QuantizeConfig(bits=4, first_last_bits=None)),
    ],
    ids=["int", "post", "matmul-nbits", "lookup"],
)
def test_a_weight_another_node_reads_stays_qdq_for_it(layer, config):
    """onnxq's ops, MatMulNBits and the lookup take the codes in the layer's place; a second reader needs the float tensor."""
    model = weight_with_other_reader(layer)
    result = quantize_with_report(model, config)
    onnx.checker.check_model(result.model)
    assert [layer.tensor for layer in result.layers] == ["w"] and not result.skipped
    assert {n.op_type for n in result.model.graph.node} >= {"ReduceMean", {"conv": "Conv", "matmul": "MatMul", "gather": "Gather"}[layer]}
    feeds = {"x": np.arange(6, dtype=np.int64) * 7} if layer == "gather" else random_feeds(model, batch=3)
    want, got = run(model, feeds), run(result.model, feeds)
    assert 0 < np.linalg.norm(got - want) / np.linalg.norm(want) < 0.15  # 4-bit weights: a few percent
