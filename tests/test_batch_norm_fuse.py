"""BatchNormalizations behind onnxq's ops fused into the ops' affine maps (onnxq/rewrite/chains.py, _fuse_batch_norms).

Conv -> Relu -> BatchNormalization (CREPE's blocks; a BatchNormalization straight after a Conv is folded into its
weights earlier) quantized W4A8 in the int format: the BatchNormalization and the quantize-dequantize pair in front of
it are gone, the op's post_scale/post_bias give the BatchNormalization's values (its definition, evaluated in numpy),
its clip holds the pair's range (the dropped Relu's clamp), and the outputs stay within a few code steps of the graph
without the fusion (which quantizes the Relu's output before normalizing it). The op's affine map itself is checked bit
for bit against numpy in tests/test_int_conv_u8.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq.rewrite.chains
from onnxq.config import ActivationConfig, QuantizeConfig, WeightFormat
from onnxq.model.graph import attribute
from onnxq.native.domain import DOMAIN
from onnxq.native.session import session
from onnxq.pipeline import quantize_with_report

C = 8
EPSILON = 1e-3


def _network(relu_output: bool = False) -> onnx.ModelProto:
    """x[N,3,12,12] -> 2 x (Conv 3x3, Relu, BatchNormalization, MaxPool 2x2) -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(21)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    x, c_in = "x", 3
    for i in range(2):
        inits += [numpy_helper.from_array((rng.standard_normal((C, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((rng.standard_normal(C) * 0.1).astype(np.float32), f"b{i}"),
                  numpy_helper.from_array(rng.uniform(0.3, 3, C).astype(np.float32), f"gamma{i}"),
                  numpy_helper.from_array((rng.standard_normal(C) * 0.5).astype(np.float32), f"beta{i}"),
                  numpy_helper.from_array((rng.standard_normal(C) * 0.3).astype(np.float32), f"mean{i}"),
                  numpy_helper.from_array(rng.uniform(0.2, 3, C).astype(np.float32), f"var{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("BatchNormalization", [f"r{i}", f"gamma{i}", f"beta{i}", f"mean{i}", f"var{i}"], [f"n{i}"],
                                   name=f"bn{i}", epsilon=EPSILON),
                  helper.make_node("MaxPool", [f"n{i}"], [f"m{i}"], name=f"pool{i}", kernel_shape=[2, 2], strides=[2, 2])]
        x, c_in = f"m{i}", C
    inits.append(numpy_helper.from_array((rng.standard_normal((5, C)) * 0.5).astype(np.float32), "fc_w"))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fc_w"], ["y"], transB=1)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])]
    if relu_output:
        outputs.append(helper.make_tensor_value_info("r1", TensorProto.FLOAT, ["N", C, 6, 6]))
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


CONFIG = QuantizeConfig(bits=4, format=WeightFormat.INT, first_last_bits=None, activations=ActivationConfig())


def _data() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(6)
    return [{"x": rng.standard_normal((8, 3, 12, 12)).astype(np.float32)} for _ in range(4)]


def _both(model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch):
    fused = quantize_with_report(model, CONFIG, _data())
    with monkeypatch.context() as patch:
        patch.setattr(onnxq.rewrite.chains, "_fuse_batch_norms", lambda graph: 0)
        plain = quantize_with_report(model, CONFIG, _data())
    return fused, plain


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return session(model.SerializeToString()).run(None, {"x": x})


def test_a_relu_batch_norm_goes_into_the_op_as_its_affine_map(monkeypatch):
    fused, plain = _both(_network(), monkeypatch)
    assert not any(n.op_type == "BatchNormalization" for n in fused.model.graph.node)
    assert sum(n.op_type == "BatchNormalization" for n in plain.model.graph.node) == 2
    assert fused.chains.affines == 2 and "2 BatchNormalizations fused into the ops" in fused.chains.line()
    inits = {t.name: numpy_helper.to_array(t) for t in fused.model.graph.initializer}
    float_inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in _network().graph.initializer}
    probe = np.linspace(-3, 5, 17)[:, None]
    for i in range(2):
        op = next(n for n in fused.model.graph.node if n.name == f"conv{i}")
        assert op.domain == DOMAIN and op.op_type == "IntConvQ" and len(op.input) == 13
        scale, bias = inits[op.input[11]], inits[op.input[12]]
        assert scale.dtype == bias.dtype == np.float32 and scale.shape == bias.shape == (C,)
        gamma, beta, mean, var = (float_inits[f"{name}{i}"] for name in ("gamma", "beta", "mean", "var"))
        want = (probe - mean) / np.sqrt(var + EPSILON) * gamma + beta  # BatchNormalization's definition
        np.testing.assert_allclose(probe * scale.astype(np.float64) + bias, want, rtol=1e-6, atol=1e-6)
        # the dropped pair's range: the Relu (dropped earlier: its quantization clamps at 0) and the top code
        pair = next(n for n in plain.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == _writer(plain, f"conv{i}"))
        s, z = float(inits_of(plain)[pair.input[1]]), int(inits_of(plain)[pair.input[2]])
        assert attribute(op, "clip_min") == pytest.approx(max(0.0, -z * s), abs=1e-7) and z == 0
        assert attribute(op, "clip_max") == pytest.approx((255 - z) * s, rel=1e-6)
    x = np.random.default_rng(9).standard_normal((64, 3, 12, 12)).astype(np.float32)
    got, want = _run(fused.model, x)[0], _run(plain.model, x)[0]
    assert not np.array_equal(got, want)  # the map is applied to the op's exact output now, not its Relu's codes
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.9


def _writer(model, name: str) -> str:
    """The output of node ``name``."""
    return next(n for n in model.model.graph.node if n.name == name).output[0]


def inits_of(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.model.graph.initializer}


def test_a_batch_norm_whose_input_is_a_graph_output_stays(monkeypatch):
    fused, plain = _both(_network(relu_output=True), monkeypatch)
    assert fused.chains.affines == 1  # conv0's; conv1's Relu output is read by the graph's user
    kept = [n for n in fused.model.graph.node if n.op_type == "BatchNormalization"]
    assert [n.name for n in kept] == ["bn1"]
    conv1 = next(n for n in fused.model.graph.node if n.name == "conv1")
    assert conv1.output[0] == "r1" and len(conv1.input) <= 11  # no affine map: the graph output is the Relu's
    x = np.random.default_rng(4).standard_normal((8, 3, 12, 12)).astype(np.float32)
    for got, want in zip(_run(fused.model, x), _run(plain.model, x), strict=True):
        assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()
