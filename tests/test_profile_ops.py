"""tools/profile_ops.py --against: which profiled node does which layer's work, in a float and a quantized model.

The graphs are written here by hand, with the names onnxruntime's profiler and onnxq's rewrite give their nodes, and
the expected layer of each profiled name is written out beside it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.profile_ops import compare_layers, layer_of, layer_shape, producers_of  # noqa: E402


def float_graph():
    """conv1 -> BN -> Clip -> dw (group 4, stride 2) -> Add(residual from a MaxPool) -> Relu."""
    inits = [numpy_helper.from_array(np.zeros((4, 1, 3, 3), np.float32), "w1"),
             numpy_helper.from_array(np.zeros((4, 1, 3, 3), np.float32), "w2")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["bn1"], name="bn1"),
        helper.make_node("Clip", ["bn1"], ["clip1"], name="clip1"),
        helper.make_node("Conv", ["clip1", "w2"], ["c2"], name="dw", group=4, strides=[2, 2]),
        helper.make_node("MaxPool", ["clip1"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Add", ["pool", "c2"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["y"], name="relu"),
    ]
    value = helper.make_tensor_value_info
    return helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, [1, 4, 8, 8])], [value("y", TensorProto.FLOAT, None)], inits)


def test_nodes_map_to_the_layer_that_starts_their_chain() -> None:
    graph, layers = float_graph(), {"conv1", "dw"}
    cases = {
        "conv1": "conv1",  # kept its name
        "clip1_nchwc": "conv1",  # fused Conv+BN+Clip, named after its output: back through Clip and BN
        "bn1": "conv1",
        "y_nchwc": "dw",  # Conv+Add+Relu: the sum's input that reaches a layer (not the MaxPool's)
        "pool": None,  # a node of no layer
        "pool_nchwc": None,
        "ReorderOutput": None,
    }
    producers = producers_of(graph)
    assert {name: layer_of(producers, name, layers) for name in cases} == cases
    assert layer_of(producers, "y_nchwc", layers, depth=1) is None  # Relu, Add: two steps back


def test_layer_shape_says_weight_group_and_stride() -> None:
    graph = float_graph()
    assert layer_shape(graph, "conv1") == "4x1x3x3"
    assert layer_shape(graph, "dw") == "4x1x3x3 g4 /2"


def test_compare_layers_adds_each_side_to_its_layer() -> None:
    graph, layers = float_graph(), {"conv1", "dw"}
    quantized = helper.make_graph([
        helper.make_node("IntConvQ", ["x", "w1"], ["q1"], name="conv1", domain="ai.onnxq"),
        helper.make_node("IntConvQ", ["q1", "w2"], ["q2"], name="dw", domain="ai.onnxq"),
        helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"], name="y_dequantize"),
    ], "q", [], [])
    float_nodes = {"clip1_nchwc": ("Conv", 10.0), "pool_nchwc": ("MaxPool", 1.0), "y_nchwc": ("Conv", 4.0), "ReorderOutput": ("ReorderOutput", 0.5)}
    quantized_nodes = {"conv1": ("IntConvQ", 5.0), "dw": ("IntConvQ", 8.0), "y_dequantize": ("DequantizeLinear", 0.25)}
    rows, float_rest, quantized_rest = compare_layers(graph, quantized, float_nodes, quantized_nodes, layers)
    assert [(r.layer, r.float_us, r.quantized_us) for r in rows] == [("conv1", 10.0, 5.0), ("dw", 4.0, 8.0)]
    assert (float_rest, quantized_rest) == (1.5, 0.25)
