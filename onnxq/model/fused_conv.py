"""onnxruntime's FusedConv and FusedGemm with a constant weight rewritten as the Conv or Gemm and the activation they compute.

A model saved after onnxruntime's graph optimizations (an ``optimized_model_filepath`` at the extended level, as users
save a model "optimized for CPU") carries ``com.microsoft`` FusedConv nodes, act(Conv(X, W, B) + Z), and FusedGemm
nodes, act(Gemm(A, B, C)): the ResNet-20 we ship came back with 10 of its 21 convolutions fused, which the planner (it
reads weights from standard ops) left float, 0.539x at -b 4 instead of 0.17x. Written back as the standard ops, every
stage handles them, and onnxruntime fuses them again when it loads the written model. Activations onnxruntime fuses:
Relu, Tanh, Sigmoid, LeakyRelu (alpha), HardSigmoid (alpha, beta), Clip (min, max; FusedConv's activation_params, or
FusedGemm's activation_alpha/beta). A node with another activation stays as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.model.graph import NameSource, attribute, constant_initializers, insert_after, text_attribute
from onnxq.native.domain import ORT_DOMAIN
from onnxq.plan.handlers import FLOAT_TYPES

#: Activation -> how many parameters it takes (in order: LeakyRelu alpha; HardSigmoid alpha, beta; Clip min, max).
ACTIVATIONS = {"": 0, "Relu": 0, "Tanh": 0, "Sigmoid": 0, "LeakyRelu": 1, "HardSigmoid": 2, "Clip": 2}
#: The standard op each fused op computes before its activation.
FUSED = {"FusedConv": "Conv", "FusedGemm": "Gemm"}


def fused_ops_to_standard(graph: onnx.GraphProto) -> int:
    """Replace each main-graph FusedConv/FusedGemm with a constant float weight by the standard ops; how many were."""
    consts = constant_initializers(graph)
    names = NameSource(graph)
    after: dict[int, list[onnx.NodeProto]] = {}
    nodes = list(graph.node)  # held, so that each node keeps its id until insert_after has matched them
    for node in nodes:
        if _unfusable(node, consts):
            dtype = helper.tensor_dtype_to_np_dtype(consts[node.input[1]].data_type)
            after[id(node)] = _unfuse(node, names, graph, dtype)
    insert_after(graph, after)
    return len(after)


def _activation(node: onnx.NodeProto) -> tuple[str, list[float]]:
    """The fused activation's name ("" for none) and parameters."""
    name = text_attribute(node, "activation")
    if node.op_type == "FusedConv":
        return name, [float(v) for v in attribute(node, "activation_params", [])]
    params = [attribute(node, f"activation_{key}", None) for key in ("alpha", "beta")]
    return name, [float(v) for v in params if v is not None]


def _unfusable(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> bool:
    """A FusedConv/FusedGemm with a constant float weight (input 1) and an activation written back exactly."""
    if node.domain != ORT_DOMAIN or node.op_type not in FUSED or len(node.input) < 2:
        return False
    weight = consts.get(node.input[1])
    name, params = _activation(node)
    return weight is not None and weight.data_type in FLOAT_TYPES and name in ACTIVATIONS and len(params) >= ACTIVATIONS[name]


def _unfuse(node: onnx.NodeProto, names: NameSource, graph: onnx.GraphProto, dtype: np.dtype) -> list[onnx.NodeProto]:
    """Turn ``node`` into its standard op in place; the nodes that follow it (an Add of Z, the activation).

    ``dtype``: the weight's, which Clip's bounds take.
    """
    name, params = _activation(node)
    inputs = list(node.input)
    z = inputs[3] if node.op_type == "FusedConv" and len(inputs) > 3 and inputs[3] else ""
    kept = [a for a in node.attribute if not a.name.startswith("activation")]
    output = node.output[0]
    steps = [("Add", z)] if z else []
    if name:
        steps.append((name, ""))
    current = names.fresh(f"{output}_{FUSED[node.op_type].lower()}") if steps else output
    standard = helper.make_node(FUSED[node.op_type], inputs[:3], [current], name=node.name)
    standard.attribute.extend(kept)
    node.CopyFrom(standard)
    following = []
    for i, (op, operand) in enumerate(steps):
        last = i == len(steps) - 1
        out = output if last else names.fresh(f"{output}_{op.lower()}")
        following.append(_step(op, current, operand, out, params, names, graph, node.name, dtype))
        current = out
    return following


def _step(op: str, x: str, operand: str, out: str, params: list[float], names: NameSource, graph: onnx.GraphProto,
          base: str, dtype: np.dtype) -> onnx.NodeProto:
    """One node after the standard op: the Add of Z or the activation with its parameters (Clip's as constant inputs)."""
    node_name = names.fresh(f"{base}_{op.lower()}")
    if op == "Add":
        return helper.make_node("Add", [x, operand], [out], name=node_name)
    if op == "LeakyRelu":
        return helper.make_node(op, [x], [out], name=node_name, alpha=params[0])
    if op == "HardSigmoid":
        return helper.make_node(op, [x], [out], name=node_name, alpha=params[0], beta=params[1])
    if op == "Clip":
        bounds = []
        for value, which in zip(params[:2], ("min", "max"), strict=True):
            bound = names.fresh(f"{base}_clip_{which}")
            graph.initializer.append(numpy_helper.from_array(np.array(value, dtype), bound))
            bounds.append(bound)
        return helper.make_node(op, [x, *bounds], [out], name=node_name)
    return helper.make_node(op, [x], [out], name=node_name)
