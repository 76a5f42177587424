"""Small helpers over ONNX graphs shared by the passes: lookups, names, uses."""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from onnxq.model.external import to_array
from onnxq.model.opset import is_default_domain

__all__ = ["to_array"]  # a tensor's values, read from its external file if it has one (onnxq.model.external)


def attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """The value of a node attribute, or ``default`` when the node does not set it."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def text_attribute(node: onnx.NodeProto, name: str, default: str = "") -> str:
    """A string attribute's value as text (onnx gives bytes), or ``default`` when the node does not set it."""
    value = attribute(node, name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def is_op(node: onnx.NodeProto | None, *op_types: str) -> bool:
    """Whether ``node`` is one of the ONNX ops ``op_types`` (default domain); False for None."""
    return node is not None and node.op_type in op_types and is_default_domain(node.domain)


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """Graphs held in a node's attributes (the bodies of If, Loop, Scan)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in it (If/Loop/Scan bodies, their bodies, ...)."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from all_graphs(sub)


def all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``graph``: initializers and tensor attributes (Constant values), subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
        for sub in subgraphs(node):
            yield from all_tensors(sub)


def defined_names(graph: onnx.GraphProto) -> frozenset[str]:
    """Names this graph itself defines: inputs, initializers, node outputs (not its subgraphs').

    Inside a body they hide values of the same name in the graphs around it.
    """
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names.update(out for node in graph.node for out in node.output)
    names.discard("")
    return frozenset(names)


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by the graph's nodes or returned as an output, subgraphs included (a body may return an outer value)."""
    names: set[str] = set()
    for g in all_graphs(graph):
        names.update(out.name for out in g.output)
        for node in g.node:
            names.update(node.input)
    names.discard("")
    return names


def float_outputs(graph: onnx.GraphProto) -> list[str]:
    """The graph's outputs of float32 or float16 type: what sensitivity compares with the float model's."""
    return [o.name for o in graph.output if o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]


def constant_initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers a caller cannot override: those not also listed as graph inputs."""
    inputs = {i.name for i in graph.input}
    return {t.name: t for t in graph.initializer if t.name not in inputs}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """For each tensor name, the nodes of this graph (not subgraphs) that read it."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                out.setdefault(name, []).append(node)
    return out


def remove_unused_initializers(graph: onnx.GraphProto) -> None:
    """Drop initializers nothing reads any more (after folding or rewriting)."""
    used = used_names(graph) | {i.name for i in graph.input}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Point every reader of ``old`` (subgraphs included, unless they shadow it) at ``new``."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for sub in subgraphs(node):
            if old not in defined_names(sub):
                rename_input(sub, old, new)


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names the graph's subgraphs (If/Loop/Scan bodies, nested ones included) read or return, outer ones among them."""
    return {name for node in graph.node for body in subgraphs(node) for name in used_names(body)}


Dim = int | str | None  # a dimension: known, symbolic, or unknown


Shape = list[Dim]


def declared_shapes(graph: onnx.GraphProto, element_type: int = onnx.TensorProto.FLOAT) -> dict[str, Shape]:
    """The shapes the graph declares for its tensors of ``element_type`` (float; inputs, outputs, value_info), by name."""
    shapes = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type == element_type and tensor_type.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
    return shapes


class NameSource:
    """Hands out tensor and node names not yet used anywhere in a graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._taken: set[str] = set()
        for g in all_graphs(graph):
            self._taken.update(defined_names(g))
            self._taken.update(o.name for o in g.output)
            self._taken.update(node.name for node in g.node)

    def fresh(self, base: str) -> str:
        """``base`` itself if free, else ``base_1``, ``base_2``, ..."""
        name, i = base, 0
        while name in self._taken:
            i += 1
            name = f"{base}_{i}"
        self._taken.add(name)
        return name


def insert_after(graph: onnx.GraphProto, after: dict[int, list[onnx.NodeProto]]) -> None:
    """Put the nodes of ``after[id(node)]`` right behind ``node`` (which keeps the graph's order topological)."""
    nodes = [n for node in graph.node for n in (node, *after.get(id(node), []))]
    del graph.node[:]
    graph.node.extend(nodes)


def import_domain(model: onnx.ModelProto, domain: str, version: int = 1) -> None:
    """Add ``domain`` to the model's opset imports (once)."""
    if not any(imp.domain == domain for imp in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def finish_node_rewrite(model: onnx.ModelProto, after: dict[int, list[onnx.NodeProto]], domain: str | None) -> None:
    """The end of a rewrite that turned nodes into ``domain``'s ops.

    New nodes go behind theirs, unused constants are dropped, the domain is imported (None: no node was turned).
    """
    insert_after(model.graph, after)
    remove_unused_initializers(model.graph)
    if domain is not None:
        import_domain(model, domain)


def drop_inferred_shapes(graph: onnx.GraphProto, declared: frozenset[str]) -> int:
    """Remove the value_info of standard ops' outputs that the source did not declare; returns how many went.

    onnxq infers shapes to plan (onnxq/model/prepare.py), but the shapes left in a written model change what
    onnxruntime does with it: with them it fused a SkipLayerNormalization and ran the fmnist ViT 12 % slower, the float
    model itself included (one-off, 2026-12-05; onnxruntime infers what it needs on its own). Custom ops' outputs keep
    theirs: onnx cannot infer them (onnxq/rewrite/ops.py declares them on purpose).
    """
    standard = {output for node in graph.node if is_default_domain(node.domain) for output in node.output}
    kept = [info for info in graph.value_info if info.name in declared or info.name not in standard]
    dropped = len(graph.value_info) - len(kept)
    if dropped:
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return dropped
