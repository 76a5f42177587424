"""onnxruntime's FusedConv / FusedGemm (saved by its extended graph optimizations) back to standard ops, then quantized.

The reference is onnxruntime's own kernel for the fused op: the prepared model must compute the same (float), and the
quantized model must have the weight quantized. A ResNet-20 saved by onnxruntime at the extended level, half its
convolutions fused, must quantize as the model we ship does.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.config import QuantizeConfig
from onnxq.model.prepare import prepare
from onnxq.pipeline import quantize_with_report
from onnxq.plan.weights import plan_weights

ACTIVATIONS = [("", []), ("Relu", []), ("Tanh", []), ("Sigmoid", []), ("LeakyRelu", [0.2]), ("HardSigmoid", [0.3, 0.4]), ("Clip", [-0.5, 0.7])]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _fused_conv(activation: str, params: list[float], with_z: bool) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "b")]
    attrs = {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}
    if activation:
        attrs["activation"] = activation
    if params:
        attrs["activation_params"] = params
    inputs = ["x", "w", "b", "z"] if with_z else ["x", "w", "b"]
    node = helper.make_node("FusedConv", inputs, ["y"], name="fused", domain="com.microsoft", **attrs)
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])]
    feeds = {"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)}
    if with_z:
        graph_inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4, 6, 6]))
        feeds["z"] = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]), feeds


def _fused_gemm(activation: str, params: list[float]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array((rng.standard_normal((5, 6)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal(5) * 0.1).astype(np.float32), "c")]
    attrs = {"transB": 1, "alpha": 0.5, "beta": 2.0}
    if activation:
        attrs["activation"] = activation
        attrs |= dict(zip(("activation_alpha", "activation_beta"), params, strict=False))
    node = helper.make_node("FusedGemm", ["x", "w", "c"], ["y"], name="fused", domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model, {"x": np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)}


CASES = [("conv", a, p, z) for a, p in ACTIVATIONS for z in (False, True)] + [("gemm", a, p, False) for a, p in ACTIVATIONS if a != "Clip"]


@pytest.mark.parametrize(("op", "activation", "params", "with_z"), CASES)
def test_prepared_fused_op_computes_what_onnxruntime_fused_does_and_is_quantized(op, activation, params, with_z):
    model, feeds = _fused_conv(activation, params, with_z) if op == "conv" else _fused_gemm(activation, params)
    prepared = prepare(model)
    assert not any(n.domain == "com.microsoft" for n in prepared.graph.node)
    np.testing.assert_allclose(_run(prepared, feeds), _run(model, feeds), rtol=1e-5, atol=1e-6)
    plans, _ = plan_weights(prepared.graph, QuantizeConfig(bits=4))
    assert [p.tensor for p in plans] == ["w"]
    quantized = quantize_with_report(model, QuantizeConfig(bits=8, first_last_bits=None)).model
    assert not any(t.name == "w" and t.data_type == TensorProto.FLOAT for t in quantized.graph.initializer)
    reference, got = _run(model, feeds).astype(np.float64), _run(quantized, feeds).astype(np.float64)
    assert 10 * np.log10(np.sum(reference**2) / np.sum((reference - got) ** 2)) > 30


def test_an_unknown_activation_stays_fused():
    model, _ = _fused_conv("Relu", [], False)
    for attribute in model.graph.node[0].attribute:
        if attribute.name == "activation":
            attribute.s = b"Softsign"
    assert [n.op_type for n in prepare(model).graph.node] == ["FusedConv"]


def test_a_resnet_saved_by_onnxruntime_quantizes_as_the_shipped_one(tmp_path):
    """The shipped ResNet-20 saved at onnxruntime's extended level (10 of its convolutions FusedConv) writes as many
    weights at -b 4, and the same codes, as the model itself."""
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "models" / "fmnist_resnet20.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(shipped), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert sum(n.op_type == "FusedConv" for n in optimized.graph.node) >= 5
    ours, theirs = (quantize_with_report(m, QuantizeConfig(bits=4)) for m in (optimized, str(shipped)))
    assert len(ours.layers) == len(theirs.layers) == 22
    assert sorted(layer.quantized_bytes for layer in ours.layers) == sorted(layer.quantized_bytes for layer in theirs.layers)


def test_nchwc_convolutions_are_named_with_what_to_do():
    """A model saved at ORT_ENABLE_ALL holds com.microsoft.nchwc Convs with reordered weights: left float, saying why."""
    w = numpy_helper.from_array(np.ones((8, 8, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], [f"y{i}"], name=f"c{i}", domain="com.microsoft.nchwc") for i in range(2)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(2)], [w])
    plans, skipped = plan_weights(graph, QuantizeConfig(bits=4))
    assert plans == [] and [s.node for s in skipped] == ["c0", "c1"]
    assert all("ORT_ENABLE_EXTENDED" in s.reason for s in skipped)


def test_the_summary_names_each_reason_once():
    from onnxq.plan.weights import Skipped
    from onnxq.report.summary import _skipped_by_reason

    skipped = [Skipped("a", "r1"), Skipped("b", "r1"), Skipped("c", "r2"), Skipped("d", "r1"), Skipped("e", "r3"), Skipped("f", "r4")]
    assert _skipped_by_reason(skipped) == "a and 2 more: r1; c: r2; e: r3 ..."
    assert _skipped_by_reason(skipped[:3]) == "a and 1 more: r1; c: r2"
