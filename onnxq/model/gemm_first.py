"""Gemm layers whose weight is their first input (A @ x) rewritten as the MatMul W @ x that the planner quantizes.

Exporters put a Gemm's weight in B; some hand-written and converted graphs compute W @ x as Gemm(W, x) instead. The
planner reads a Gemm's weight from B only, so such a layer was left float (or the model refused as having no weights).
As ``MatMul(alpha * op(A), op(B))`` plus ``beta * C`` it computes the same and is a MatMul with its weight first, which
every stage already handles.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.model.external import to_array
from onnxq.model.graph import NameSource, attribute, constant_initializers, is_op, remove_unused_initializers
from onnxq.model.opset import is_default_domain
from onnxq.plan.handlers import FLOAT_TYPES


def gemm_weight_first_to_matmul(graph: onnx.GraphProto) -> int:
    """Replace each main-graph Gemm with a constant float A, a computed B and a constant C (or none) by MatMul (+ Add)."""
    consts = constant_initializers(graph)
    names = NameSource(graph)
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in graph.node:
        if _weight_first(node, consts):
            nodes.extend(_as_matmul(node, consts, names, graph))
            rewritten += 1
        else:
            nodes.append(node)
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        remove_unused_initializers(graph)
    return rewritten


def _weight_first(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> bool:
    """Whether ``node`` is a Gemm whose A is a 2-D float constant, B is computed, and C is a constant or absent."""
    if not (is_op(node, "Gemm") and is_default_domain(node.domain)) or len(node.input) < 2:
        return False
    a, b = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 else ""
    weight = consts.get(a)
    return (weight is not None and weight.data_type in FLOAT_TYPES and len(weight.dims) == 2 and b not in consts
            and (not c or c in consts))


def _as_matmul(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto], names: NameSource,
               graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes computing ``node``'s output as MatMul(alpha * op(A), op(B)) (+ beta * C); new constants go into ``graph``."""
    a, b = node.input[0], node.input[1]
    weight = to_array(consts[a])
    weight = weight.T if attribute(node, "transA", 0) else weight
    weight = (weight * np.asarray(attribute(node, "alpha", 1.0), weight.dtype)).astype(weight.dtype)
    weight_name = names.fresh(f"{a}_first")
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), weight_name))
    out: list[onnx.NodeProto] = []
    if attribute(node, "transB", 0):
        transposed = names.fresh(f"{b}_transposed")
        out.append(helper.make_node("Transpose", [b], [transposed], name=names.fresh(f"{node.name}/Transpose"), perm=[1, 0]))
        b = transposed
    c = node.input[2] if len(node.input) > 2 else ""
    if not c:
        return [*out, helper.make_node("MatMul", [weight_name, b], [node.output[0]], name=node.name)]
    product = names.fresh(f"{node.output[0]}_product")
    bias = to_array(consts[c])
    bias_name = names.fresh(f"{c}_beta")
    graph.initializer.append(numpy_helper.from_array((bias * np.asarray(attribute(node, "beta", 1.0), bias.dtype)).astype(bias.dtype), bias_name))
    return [*out, helper.make_node("MatMul", [weight_name, b], [product], name=node.name),
            helper.make_node("Add", [product, bias_name], [node.output[0]], name=names.fresh(f"{node.name}/Add"))]
