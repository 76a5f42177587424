"""onnxruntime's FusedMatMul with a constant weight rewritten as the standard MatMul the planner quantizes.

Models saved after onnxruntime's graph optimizations (its transformer optimizer, an ``optimized_model_filepath``) carry
``com.microsoft`` FusedMatMul nodes: a MatMul with its operands optionally transposed and the product scaled by alpha.
The planner reads weights from standard ops only, so such a layer was left float. With the weight B constant and A
neither transposed nor batch-transposed, ``MatMul(A, alpha * op(B))`` computes the same, and every stage handles it;
onnxruntime fuses it again when it loads the written model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.model.external import to_array
from onnxq.model.graph import NameSource, attribute, constant_initializers, remove_unused_initializers
from onnxq.native.domain import ORT_DOMAIN
from onnxq.plan.handlers import FLOAT_TYPES


def fused_matmuls_to_matmul(graph: onnx.GraphProto) -> int:
    """Replace each main-graph FusedMatMul of a computed A and a constant float B (rank >= 2) by MatMul(A, alpha * op(B))."""
    consts = constant_initializers(graph)
    names = NameSource(graph)
    rewritten = 0
    for i, node in enumerate(graph.node):
        if _plain_with_weight(node, consts):
            graph.node[i].CopyFrom(_as_matmul(node, consts, names, graph))
            rewritten += 1
    if rewritten:
        remove_unused_initializers(graph)
    return rewritten


def _plain_with_weight(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> bool:
    """A FusedMatMul whose B is a float constant of rank 2 or more, A computed and not transposed, no batch transposes."""
    if node.op_type != "FusedMatMul" or node.domain != ORT_DOMAIN or len(node.input) != 2:
        return False
    weight = consts.get(node.input[1])
    plain = not any(attribute(node, name, 0) for name in ("transA", "transBatchA", "transBatchB"))
    return plain and weight is not None and weight.data_type in FLOAT_TYPES and len(weight.dims) >= 2 and node.input[0] not in consts


def _as_matmul(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto], names: NameSource, graph: onnx.GraphProto) -> onnx.NodeProto:
    """The MatMul computing ``node``'s output; its weight, alpha * op(B), goes into ``graph`` under a new name."""
    weight = to_array(consts[node.input[1]])
    if attribute(node, "transB", 0):
        weight = np.swapaxes(weight, -1, -2)
    weight = (weight * np.asarray(attribute(node, "alpha", 1.0), weight.dtype)).astype(weight.dtype)
    weight_name = names.fresh(f"{node.input[1]}_matmul")
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), weight_name))
    return helper.make_node("MatMul", [node.input[0], weight_name], list(node.output), name=node.name)
