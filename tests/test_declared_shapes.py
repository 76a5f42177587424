"""The written model declares the shapes its source declared, and its custom ops' outputs, nothing onnxq inferred.

onnxq infers every tensor's shape to plan; left in the written model, those shapes made onnxruntime fuse and run the
fmnist ViT 12 % slower, the float model with them included (onnxq/model/graph.py, drop_inferred_shapes).
"""

from __future__ import annotations

import onnx
import pytest
from onnx import helper

from models import conv_bn_relu_gemm
from onnxq import QuantizeConfig, WeightFormat, quantize


def _standard_outputs(model: onnx.ModelProto) -> set[str]:
    return {out for node in model.graph.node if node.domain in ("", "ai.onnx") for out in node.output}


def test_weight_only_model_declares_no_inferred_shapes():
    source = conv_bn_relu_gemm()
    assert not source.graph.value_info
    inferred = onnx.shape_inference.infer_shapes(source)
    assert inferred.graph.value_info  # shapes that onnxq's own inference finds, and must not write
    written = quantize(source, QuantizeConfig(bits=4))
    assert [info.name for info in written.graph.value_info] == []


def test_shapes_the_source_declared_stay():
    source = conv_bn_relu_gemm()
    relu = next(n for n in source.graph.node if n.op_type == "Relu")
    declared = onnx.shape_inference.infer_shapes(source)
    kept = next(info for info in declared.graph.value_info if info.name == relu.output[0])
    source.graph.value_info.append(kept)
    written = quantize(source, QuantizeConfig(bits=4))
    assert [info.name for info in written.graph.value_info] == [relu.output[0]]


@pytest.mark.parametrize("fmt", [WeightFormat.INT, WeightFormat.POST])
def test_custom_ops_outputs_keep_their_declared_shapes(fmt):
    written = quantize(conv_bn_relu_gemm(), QuantizeConfig(bits=4, format=fmt))
    custom = {out for node in written.graph.node if node.domain not in ("", "ai.onnx") for out in node.output}
    declared = {info.name for info in written.graph.value_info}
    assert custom and custom <= declared  # onnx cannot infer them: the rewrite declares them (onnxq/rewrite/ops.py)
    assert not declared & _standard_outputs(written)


def test_helper_values_are_what_the_rule_drops():
    """drop_inferred_shapes on a hand-made graph: declared and custom outputs stay, inferred standard ones go."""
    from onnxq.model.graph import drop_inferred_shapes

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Thing", ["b"], ["c"], domain="custom")]
    infos = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1]) for name in ("a", "b", "c")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1])], value_info=infos)
    assert drop_inferred_shapes(graph, frozenset({"a"})) == 1
    assert [info.name for info in graph.value_info] == ["a", "c"]


def test_control_flow_bodies_declare_no_inferred_shapes_either():
    from models import network_in_if
    from onnxq.model.graph import all_graphs

    source = network_in_if()
    inferred = onnx.shape_inference.infer_shapes(source)
    assert any(g.value_info for g in list(all_graphs(inferred.graph))[1:])  # onnx infers shapes inside the branches
    written = quantize(source, QuantizeConfig(bits=4))
    assert [(g.name, info.name) for g in all_graphs(written.graph) for info in g.value_info] == []
