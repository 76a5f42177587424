"""Relu/Clip after a Conv that becomes IntConv/PostConv is folded into the op (clip_min / clip_max, int_conv.h).

onnxruntime fuses a float Conv with its Relu/Clip but cannot fuse them into a custom op, so the rewrite does
(onnxq.rewrite.fusions.fold_clipping_into_ops): the node goes, the op writes its output name, and the model computes the same.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq.rewrite.fusions
import onnxq.rewrite.ops
from onnxq import QuantizeConfig, WeightFormat, quantize
from onnxq.native.domain import DOMAIN
from onnxq.native.session import session


def _model(opset: int) -> onnx.ModelProto:
    """x[2,4,9,9] -> Conv -> t1 -> Relu -> r1 -> Conv -> t2 -> Clip(0, 6) -> r2 -> Conv(1x1) -> t3 -> Relu -> r3
    -> Add(t3, r3) -> Conv -> t4 -> Clip(-0.5, none) -> y  (t3 has two readers: its Relu stays)
    """
    rng = np.random.default_rng(0)
    shapes = {"w1": (8, 4, 3, 3), "w2": (8, 8, 3, 3), "w3": (8, 8, 1, 1), "w4": (6, 8, 3, 3)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.4).astype(np.float32), n) for n, s in shapes.items()]
    inits += [numpy_helper.from_array((rng.standard_normal(8) * 0.3).astype(np.float32), "b1")]
    pads = dict(pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["t1"], name="conv1", **pads),
        helper.make_node("Relu", ["t1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["t2"], name="conv2", **pads),
        helper.make_node("Conv", ["r2", "w3"], ["t3"], name="conv3"),
        helper.make_node("Relu", ["t3"], ["r3"], name="relu3"),
        helper.make_node("Add", ["t3", "r3"], ["s3"], name="add3"),
        helper.make_node("Conv", ["s3", "w4"], ["t4"], name="conv4", **pads),
    ]
    if opset >= 11:
        inits += [numpy_helper.from_array(np.float32(v), n) for n, v in (("zero", 0.0), ("six", 6.0), ("lo4", -0.5))]
        nodes.insert(3, helper.make_node("Clip", ["t2", "zero", "six"], ["r2"], name="clip2"))
        nodes.append(helper.make_node("Clip", ["t4", "lo4"], ["y"], name="clip4"))
    else:
        nodes.insert(3, helper.make_node("Clip", ["t2"], ["r2"], name="clip2", min=0.0, max=6.0))
        nodes.append(helper.make_node("Clip", ["t4"], ["y"], name="clip4", min=-0.5))
    graph = helper.make_graph(
        nodes,
        "clip_fold",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6, 9, 9])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _ops(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node if n.domain == DOMAIN}


def _clip(node: onnx.NodeProto) -> tuple:
    attrs = {a.name: a.f for a in node.attribute}
    return attrs.get("clip_min"), attrs.get("clip_max")


@pytest.mark.parametrize("opset", [10, 17])
@pytest.mark.parametrize("fmt", [WeightFormat.INT, WeightFormat.POST])
def test_relu_and_clip_are_folded_into_the_ops(fmt, opset, monkeypatch):
    model = _model(opset)
    config = QuantizeConfig(bits=4, format=fmt, first_last_bits=None)
    folded = quantize(model, config)
    monkeypatch.setattr(onnxq.rewrite.ops, "fold_clipping_into_ops", lambda graph: 0)
    unfolded = quantize(model, config)

    ops = _ops(folded)
    assert len(ops) == 4
    assert [_clip(ops[n]) for n in ("conv1", "conv2", "conv3", "conv4")] == [(0.0, None), (0.0, 6.0), (None, None), (-0.5, None)]
    assert [n.output[0] for n in (ops["conv1"], ops["conv2"], ops["conv4"])] == ["r1", "r2", "y"]
    kinds = sorted(n.op_type for n in folded.graph.node if n.domain != DOMAIN)
    assert kinds == ["Add", "Relu"]  # only the Relu of t3, which Add reads too
    assert sorted(n.op_type for n in unfolded.graph.node if n.domain != DOMAIN) == ["Add", "Clip", "Clip", "Relu", "Relu"]
    assert {i.name for i in folded.graph.value_info}.isdisjoint({"t1", "t2", "t4"})  # the folded names are gone
    onnx.checker.check_model(folded)

    x = np.random.default_rng(1).standard_normal((2, 4, 9, 9)).astype(np.float32) * 2
    (want,) = session(unfolded.SerializeToString()).run(None, {"x": x})
    (got,) = session(folded.SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(got, want)
    assert (want == -0.5).mean() > 0.1  # the last clip clips
    # The float model's answer is near (4-bit weights).
    (ref,) = session(model.SerializeToString()).run(None, {"x": x})
    assert np.abs(got - ref).mean() < 0.5 * np.abs(ref).mean()


def test_graph_outputs_and_non_constant_bounds_are_left_alone():
    """A Conv output that is a graph output keeps its Relu; a Clip whose bound is a graph input stays a Clip."""
    model = _model(17)
    graph = model.graph
    graph.output.append(helper.make_tensor_value_info("t1", TensorProto.FLOAT, [None, 8, 9, 9]))
    graph.input.append(helper.make_tensor_value_info("six", TensorProto.FLOAT, []))  # overridable: not constant
    folded = quantize(model, QuantizeConfig(bits=4, format=WeightFormat.INT, first_last_bits=None))
    ops = _ops(folded)
    assert _clip(ops["conv1"]) == (None, None) and ops["conv1"].output[0] == "t1"
    assert _clip(ops["conv2"]) == (None, None) and ops["conv2"].output[0] == "t2"
    assert _clip(ops["conv4"]) == (-0.5, None)
    assert sorted(n.op_type for n in folded.graph.node if n.domain != DOMAIN) == ["Add", "Clip", "Relu", "Relu"]


def test_an_op_output_a_subgraph_returns_is_not_folded():
    """An If whose branches return the op's output y itself (no node in them reads it) still needs y: the Relu stays."""
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    branch = helper.make_graph([], "branch", [], [out])
    nodes = [
        helper.make_node("IntConv", ["x", "packed", "scale"], ["y"], name="op", domain=DOMAIN, bits=4, kernel_shape=[1, 1]),
        helper.make_node("Relu", ["y"], ["r"], name="relu"),
        helper.make_node("If", ["cond"], ["picked"], name="if", then_branch=branch, else_branch=branch),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, None), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("r", "picked")]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    assert onnxq.rewrite.fusions.fold_clipping_into_ops(graph) == 0
    assert [n.name for n in graph.node] == ["op", "relu", "if"] and graph.node[0].output[0] == "y"
