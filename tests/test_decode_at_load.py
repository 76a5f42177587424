"""Weight-only models decode their weights at load: Cast(codes) * scale [-> y*|y|], which onnxruntime folds into float weights.

Read here without onnxq's helpers (conftest.decoded_weights): the codes are INT4/INT8 constants, the scale has the
weight's float type, shaped to broadcast along the channel axis (or a scalar per tensor), and the Cast gives that float
type. onnxruntime's optimized graph (basic level) must hold no decoding node any more, only float weights bit for bit
equal to the decoding done here in numpy, and the model must compute what numpy computes with those weights.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import CAST_FORM, decoded_weights, float_equivalent, run
from onnx import TensorProto, helper, numpy_helper
from test_float16 import half

from models import conv_bn_relu_gemm, depthwise_convtranspose, streaming_lstm_in_if
from onnxq import Granularity, QuantizeConfig, SqrtMode, quantize

CODE_TYPES = {4: TensorProto.INT4, 8: TensorProto.INT8}
DECODING = {"Cast", "DequantizeLinear", "Abs"}


def _conv_gemm_matmul(seed: int = 0) -> onnx.ModelProto:
    """x[N,3,6,6] -> Conv(w1 4x3x3x3, pads 1) -> Relu -> Flatten -> Gemm(w2 10x144, transB) -> MatMul(w3 10x7) -> y[N,7]."""
    rng = np.random.default_rng(seed)
    weights = {"w1": rng.standard_t(5, (4, 3, 3, 3)) * 0.3, "w2": rng.standard_t(5, (10, 144)) * 0.1, "w3": rng.standard_t(5, (10, 7)) * 0.3}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w2"], ["g"], name="fc", transB=1),
        helper.make_node("MatMul", ["g", "w3"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7])],
                              [numpy_helper.from_array(w.astype(np.float32), k) for k, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _numpy_forward(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, w3: np.ndarray) -> np.ndarray:
    """_conv_gemm_matmul in float64 numpy: the 3x3 convolution as a sum over the kernel's offsets."""
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    c = sum(np.einsum("nchw,oc->nohw", padded[:, :, i:i + 6, j:j + 6], w1[:, :, i, j].astype(np.float64)) for i in range(3) for j in range(3))
    f = np.maximum(c, 0).reshape(len(x), -1)
    return (f @ w2.astype(np.float64).T) @ w3.astype(np.float64)


def _optimized(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    """The graph onnxruntime runs after its basic optimizations (constant folding among them), as it writes it out."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(tmp_path / "optimized.onnx")


def _nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes and those of its If/Loop/Scan bodies."""
    found = []
    for node in graph.node:
        found.append(node)
        for attr in node.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                found += _nodes(body)
    return found


def _check_decoded_at_load(quantized: onnx.ModelProto, float_type: int, bits: int | dict[str, int], sqrt: bool, granularity: Granularity,
                           axes: dict[str, int], tmp_path, folds: bool = True) -> dict[str, np.ndarray]:
    """The checks every weight-only model passes (``bits`` per weight where they differ); returns the decoded weights by
    float weight name. ``folds``: also that onnxruntime folds the decoding into float weights equal to these."""
    weights = decoded_weights(quantized)
    assert {w.codes_name.removesuffix("_quantized") for w in weights} == set(axes)
    assert not any(n.op_type == "DequantizeLinear" for n in _nodes(quantized.graph))
    for w in weights:
        name = w.codes_name.removesuffix("_quantized")
        width = bits[name] if isinstance(bits, dict) else bits
        assert w.form == CAST_FORM and w.codes_type == CODE_TYPES[width] and w.zero_point is None and w.sqrt is sqrt, name
        assert [a.i for a in w.nodes[0].attribute if a.name == "to"] == [TensorProto.FLOAT], name  # decoded in float32
        assert w.scale.dtype == np.float32 and w.values.dtype == helper.tensor_dtype_to_np_dtype(float_type), name
        if float_type != TensorProto.FLOAT:  # then cast to the weight's type
            assert w.nodes[-1].op_type == "Cast" and [a.i for a in w.nodes[-1].attribute if a.name == "to"] == [float_type], name
        if granularity is Granularity.CHANNEL:
            shape = [1] * w.codes.ndim
            shape[axes[name]] = w.codes.shape[axes[name]]
            assert (w.axis, w.scale_shape) == (axes[name], tuple(shape)), name
        else:
            assert (w.axis, w.scale_shape) == (None, ()), name
        top = (1 << (width - 1)) - 1
        assert np.abs(w.codes).max() <= top and len(np.unique(w.codes)) > 2, name
    decoded = {w.codes_name.removesuffix("_quantized"): w.values for w in weights}
    if not folds:
        return decoded
    optimized = _optimized(quantized, tmp_path)
    nodes = _nodes(optimized.graph)
    if float_type == TensorProto.FLOAT:  # (float16 models get Casts around the layers with no float16 kernel on CPU)
        assert not DECODING & {n.op_type for n in nodes}, sorted({n.op_type for n in nodes})
    decoder_names = {n.name for w in weights for n in w.nodes}
    assert not decoder_names & {n.name for n in nodes}  # every Cast and Mul of the decoding folded away
    folded = {t.name: numpy_helper.to_array(t) for t in optimized.graph.initializer}
    assert not {t.data_type for t in optimized.graph.initializer} & {TensorProto.INT4, TensorProto.INT8}  # no codes left
    for w in weights:  # onnxruntime's folded weight is the decoding done here, bit for bit
        read = [n for n in nodes if w.output in n.input]
        assert read, w.output
        np.testing.assert_array_equal(folded[w.output], w.values)
        assert folded[w.output].dtype == w.values.dtype
    return decoded


@pytest.mark.parametrize("granularity", [Granularity.CHANNEL, Granularity.TENSOR])
@pytest.mark.parametrize("sqrt", [SqrtMode.OFF, SqrtMode.ON])
@pytest.mark.parametrize("bits", [4, 8])
def test_conv_gemm_and_matmul_weights_fold_and_compute_as_numpy(bits, sqrt, granularity, tmp_path):
    """Conv (axis 0), Gemm transB (axis 0), MatMul (axis 1)."""
    model = _conv_gemm_matmul()
    quantized = quantize(model, QuantizeConfig(bits=bits, sqrt=sqrt, granularity=granularity, first_last_bits=None))
    decoded = _check_decoded_at_load(quantized, TensorProto.FLOAT, bits, sqrt is SqrtMode.ON, granularity, {"w1": 0, "w2": 0, "w3": 1}, tmp_path)
    x = np.random.default_rng(1).standard_normal((3, 3, 6, 6)).astype(np.float32)
    want = _numpy_forward(x, decoded["w1"], decoded["w2"], decoded["w3"])
    got = run(quantized, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())  # float32 sums only
    floats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    reference = _numpy_forward(x, floats["w1"], floats["w2"], floats["w3"])
    assert 0 < np.linalg.norm(got - reference) / np.linalg.norm(reference) < (0.3 if bits == 4 else 0.03)  # the codes are the weights'


@pytest.mark.parametrize("sqrt", [SqrtMode.OFF, SqrtMode.ON])
def test_depthwise_conv_and_convtranspose(sqrt, tmp_path):
    """Depthwise Conv (axis 0) and ConvTranspose (axis 1), per channel."""
    quantized = quantize(depthwise_convtranspose(), QuantizeConfig(bits=4, sqrt=sqrt, first_last_bits=None))
    bits = {"dw": 8, "up": 4}  # the depthwise layer keeps 8 bits (--depthwise-bits)
    _check_decoded_at_load(quantized, TensorProto.FLOAT, bits, sqrt is SqrtMode.ON, Granularity.CHANNEL, {"dw": 0, "up": 1}, tmp_path)
    x = np.random.default_rng(2).random((2, 4, 6, 6), dtype=np.float32)
    np.testing.assert_allclose(run(quantized, {"x": x}), run(float_equivalent(quantized), {"x": x}), rtol=1e-6, atol=1e-7)


def test_lstm_in_a_branch(tmp_path):
    """The LSTM's W and R (axis 1, the gate rows) in an If body are decoded in the main graph and folded there too."""
    model = streaming_lstm_in_if()
    quantized = quantize(model, QuantizeConfig(bits=8, sqrt=SqrtMode.OFF, first_last_bits=None))
    axes = {"w_lstm": 1, "r_lstm": 1, "w_else": 1, "w_out": 1}
    _check_decoded_at_load(quantized, TensorProto.FLOAT, 8, False, Granularity.CHANNEL, axes, tmp_path)
    rng = np.random.default_rng(3)
    for cond in (True, False):
        feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32), "state": rng.standard_normal((2, 2, 16)).astype(np.float32),
                 "cond": np.array(cond)}
        np.testing.assert_allclose(run(quantized, feeds), run(float_equivalent(quantized), feeds), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sqrt", [SqrtMode.OFF, SqrtMode.ON])
def test_float16_weights_decode_in_float32_and_fold_at_load(sqrt, tmp_path):
    """Float16 weights: decoded in float32 (onnxruntime has no float16 Mul on CPU to fold), then cast to float16; the
    decoding folds at load into the float16 weights decoded here, and the model computes with them."""
    quantized = quantize(half(conv_bn_relu_gemm(with_bn=False)), QuantizeConfig(bits=4, sqrt=sqrt, first_last_bits=None))
    axes = {"w1": 0, "w2": 0, "w3": 0}
    _check_decoded_at_load(quantized, TensorProto.FLOAT16, 4, sqrt is SqrtMode.ON, Granularity.CHANNEL, axes, tmp_path)
    x = {"x": np.random.default_rng(4).random((2, 3, 8, 8)).astype(np.float16)}
    y = run(quantized, x)
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, run(float_equivalent(quantized), x))


@pytest.mark.parametrize("method", ["mse", "asq"])
def test_with_activations_only_the_weights_onnxruntime_fuses_stay_dequantizelinear(method):
    """W4A8: behind fixed steps (mse) every weight is DequantizeLinear (onnxruntime fuses it with its input's pair into
    an integer kernel); behind ASQ's per-sample steps, which no kernel takes, every weight is Cast * scale (decoded
    once at load) and no DequantizeLinear reads a weight's codes."""
    from onnxq.config import ActivationConfig, CalibrationMethod

    model = _conv_gemm_matmul()
    data = [{"x": np.random.default_rng(2).standard_normal((32, 3, 6, 6)).astype(np.float32)}]
    config = QuantizeConfig(bits=4, first_last_bits=4, activations=ActivationConfig(samples=32, method=CalibrationMethod(method)))
    written = quantize(model, config, data)
    codes = {t.name for t in written.graph.initializer if t.name.split("_")[0] in ("w1", "w2", "w3")}  # the weights' codes
    weight_dq = [n for n in written.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in codes]
    at_load = {w.codes_name for w in decoded_weights(written) if w.form == CAST_FORM}  # Cast, or the unpacking of 4-bit halves
    if method == "mse":
        assert len(weight_dq) == 3 and not at_load & codes
    else:
        assert not weight_dq and len(at_load & codes) == 3
