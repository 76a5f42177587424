"""Channel means where axis 1 is no channel axis: sequence-first tensors (T, B, E) whose batch varies between runs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibrate.collect import ChannelMeans
from onnxq.config import ActivationConfig, QuantizeConfig
from onnxq.pipeline import quantize_with_report


def test_means_per_axis_1_against_numpy_and_none_where_its_length_varies():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4, 5)), rng.standard_normal((2, 4, 5))
    means = ChannelMeans()
    means.add(a)
    means.add(b)
    np.testing.assert_allclose(means.mean(), np.concatenate([a, b]).mean(axis=(0, 2)))
    ragged = ChannelMeans()
    ragged.add(a)
    ragged.add(rng.standard_normal((3, 5, 5)))  # (T, B, E) with another batch
    assert ragged.mean() is None
    ragged.add(a)  # stays without means
    assert ragged.mean() is None
    left, right = ChannelMeans(), ChannelMeans()
    left.add(a)
    right.add(rng.standard_normal((3, 5, 5)))
    left.merge(right)
    assert left.mean() is None


def test_a_sequence_first_layer_with_a_varying_batch_calibrates():
    """x [B, T, E] -> Transpose to (T, B, E) -> MatMul -> y: runs of 3 and 4 samples, W4A8 (it failed on a broadcast)."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array((rng.standard_normal((8, 8)) * 0.3).astype(np.float32), "w")
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name="first", perm=[1, 0, 2]), helper.make_node("MatMul", ["t", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 5, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, "B", 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = [{"x": rng.standard_normal((n, 5, 8)).astype(np.float32)} for n in (3, 4, 3)]
    result = quantize_with_report(model, QuantizeConfig(bits=4, first_last_bits=None, activations=ActivationConfig(samples=10)), data)
    assert [layer.tensor for layer in result.layers] == ["w"]
    onnx.checker.check_model(result.model)
