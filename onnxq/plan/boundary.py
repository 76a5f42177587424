"""The first and last weighted layers, which REQuant keeps at higher precision, found by data flow through every graph.

A weighted node is *first* when no weighted node lies before it on any path from the model's inputs, and *last* when
none lies after it on any path to the outputs. The paths run through the bodies of If, Loop and Scan: a body reads the
values of the graphs around it by name and its formal inputs from its node's inputs (Loop: iteration count, condition,
carried values; Scan: states, then scanned inputs), and hands its outputs to the node's outputs (Loop: after the
condition). So when a whole network sits in one branch of an If, its own first and last layers are the boundary, not
every layer of the branch. A Loop's values carried to the next iteration are not followed round the loop.

A weighted node whose data inputs are all zeros whatever the input (a zero state made with ConstantOfShape, as torch's
dynamo export writes a recurrent network's first step with a dynamic batch) processes nothing, and is not first: the
weight it reads (the hidden-to-hidden one, shared by every step) would otherwise keep 8 bits for a product that is zero.
Its output still counts as downstream of a weighted node.

Node order in an ONNX graph is topological, so one pass each way suffices.
"""

from __future__ import annotations

from collections.abc import Collection

import onnx
from onnx import numpy_helper

from onnxq.model.graph import defined_names, subgraphs


def boundary_nodes(graph: onnx.GraphProto, weighted: Collection[str]) -> set[str]:
    """Names of the weighted nodes (of ``graph`` or of its bodies) that are first or last on some path."""
    first: set[str] = set()
    last: set[str] = set()
    _forward(graph, set(), set(weighted), first)
    _backward(graph, set(), set(weighted), last)
    return first | last


#: Ops whose output is all zeros when their data input (the first) is.
_ZERO_PRESERVING = frozenset({"Identity", "Cast", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Transpose", "Flatten", "Slice", "Tile"})


def _forward(graph: onnx.GraphProto, after: set[str], weighted: set[str], first: set[str]) -> None:
    """Walk ``graph`` in order, adding to ``after`` the tensors downstream of a weighted node, to ``first`` the first ones."""
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    zeros = {t.name for t in graph.initializer if _small_zeros(t)}  # tensors that are zeros whatever the input
    for node in graph.node:
        if _makes_zeros(node, zeros):
            zeros.update(name for name in node.output if name)
        upstream = any(name in after for name in node.input if name)
        data = [name for name in node.input if name and name not in constants]
        if node.name in weighted and not upstream and not (data and all(name in zeros for name in data)):
            first.add(node.name)
        from_bodies = False
        for body in subgraphs(node):
            inner = after - defined_names(body)  # a body's own names hide the outer ones
            inner.update(formal.name for formal, actual in _formal_inputs(node, body) if actual in after)
            _forward(body, inner, weighted, first)
            from_bodies |= any(out.name in inner for out in body.output)
        if upstream or from_bodies or node.name in weighted:
            after.update(name for name in node.output if name)


#: Elements of a constant read to see whether it is all zeros (a zero state is a scalar or a small tensor to expand).
ZERO_CHECK_ELEMENTS = 1024


def _small_zeros(tensor: onnx.TensorProto) -> bool:
    """Whether a small constant tensor (ZERO_CHECK_ELEMENTS at most, held in the file) is all zeros."""
    count = 1
    for d in tensor.dims:
        count *= d
    if count > ZERO_CHECK_ELEMENTS or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return False
    return not numpy_helper.to_array(tensor).any()


def _makes_zeros(node: onnx.NodeProto, zeros: set[str]) -> bool:
    """Whether ``node``'s output is all zeros whatever the model's input.

    ConstantOfShape of zero, a zero Constant, or a reshaping of zeros.
    """
    if node.op_type in ("ConstantOfShape", "Constant"):
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "ConstantOfShape" and value is None:
            return True  # the default value is zero
        return value is not None and _small_zeros(value)
    return node.op_type in _ZERO_PRESERVING and bool(node.input) and node.input[0] in zeros


def _backward(graph: onnx.GraphProto, before: set[str], weighted: set[str], last: set[str]) -> None:
    """Walk ``graph`` in reverse, adding to ``before`` the tensors upstream of a weighted node, to ``last`` the last ones."""
    for node in reversed(graph.node):
        downstream = any(name in before for name in node.output if name)
        if node.name in weighted and not downstream:
            last.add(node.name)
        for body in subgraphs(node):
            inner = {result.name for result, actual in _formal_outputs(node, body) if actual in before}
            _backward(body, inner, weighted, last)
            own = defined_names(body)
            before.update(name for name in inner if name not in own)  # outer values the body's weighted layers read
            before.update(actual for formal, actual in _formal_inputs(node, body) if formal.name in inner)
        if downstream or node.name in weighted:
            before.update(name for name in node.input if name)


def _formal_inputs(node: onnx.NodeProto, body: onnx.GraphProto) -> list[tuple[onnx.ValueInfoProto, str]]:
    """(body input, the node input that feeds it): Loop and Scan pass their inputs in order; an If's branches take none."""
    return [(formal, actual) for formal, actual in zip(body.input, node.input, strict=False) if actual]


def _formal_outputs(node: onnx.NodeProto, body: onnx.GraphProto) -> list[tuple[onnx.ValueInfoProto, str]]:
    """(body output, the node output it becomes): a Loop body's first output is the loop condition, not a node output."""
    results = list(body.output)[1:] if node.op_type == "Loop" else list(body.output)
    return [(result, actual) for result, actual in zip(results, node.output, strict=False) if actual]
