"""Calibration inside If bodies: the branch each If takes on the data, inlined into a copy of the model.

onnxruntime cannot hand back a value computed inside a control-flow body, so the layers there got no second moments
and their weights were rounded for their own error. Most Ifs of exported models take one branch for a given use
(Silero VAD's sample rate, an exporter's "was a state given?"): in a copy of the model where such an If is replaced
by the nodes of the branch the data take, the body's layers are main-graph nodes whose inputs a calibration pass
fetches like any other. The copy computes what the model computes wherever the data take those branches.

Which branch: the If's condition on the first calibration samples, round after round as the nested Ifs of an inlined
branch come up. That the data keep to it is checked in the pass itself: each inlined condition is fetched with the
layers' inputs (a :class:`~onnxq.calibrate.moments.Guard`), and where any run took the other branch the statistics of
the layers that came from it are dropped (those weights are then rounded for their own error, as before). Loop and
Scan bodies run many times per sample and stay as they are. The copy holds the model's weights a second time while
the pass runs; models without weighted layers inside an If are not copied.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxq.calibrate.collect import exposing
from onnxq.calibrate.moments import Guard, MomentCollector, layer_inputs
from onnxq.errors import OnnxqError, first_line
from onnxq.model.graph import all_graphs, attribute, defined_names, is_op
from onnxq.plan.weights import WeightPlan

logger = logging.getLogger(__name__)

#: Samples whose conditions choose the branches (the pass then checks the rest).
BRANCH_SAMPLES = 16


@dataclass(frozen=True)
class InlinedBranch:
    """One If replaced by a branch: its condition tensor, the branch (then: True), the names of the nodes it brought.

    ``skipped``: the names of the other branch's nodes (gone from the view: the data do not reach them).
    """

    condition: str
    taken: bool
    nodes: frozenset[str]
    skipped: frozenset[str] = frozenset()


@dataclass
class BranchView:
    """A copy of the model with the taken branches of some Ifs inlined."""

    model: onnx.ModelProto
    inlined: list[InlinedBranch] = field(default_factory=list)

    def guards(self, plans: Iterable[WeightPlan]) -> tuple[Guard, ...]:
        """Per inlined If, the check a calibration pass makes: its condition, the branch, the weights read in that branch."""
        return tuple(Guard(b.condition, b.taken, frozenset(p.tensor for p in plans if any(u.node in b.nodes for u in p.uses)))
                     for b in self.inlined)

    def unreached(self) -> frozenset[str]:
        """Names of the nodes of the branches not taken: a weight they read gets its statistics from its other readers."""
        return frozenset().union(*(b.skipped for b in self.inlined))


def body_readers(plans: Iterable[WeightPlan]) -> set[str]:
    """Names of the nodes inside control-flow bodies that read a planned weight (those a branch view is for)."""
    return {u.node for p in plans for u in p.uses if u.body_of}


#: Depthwise convolutions that the depthwise rule keeps at this many bits or more (qdq format) keep the data-free codes
#: and skip the moments: on the orientation classifier's 5x5 depthwise layers those took half the quantization time
#: (18.4 -> 5.7 s without them, the same fidelity). The 8-bit first/last layers keep theirs: MiniLM's last layer
#: without them cost 0.0006 of embedding cosine (tools/eval_real_models.py).
OUTPUT_AWARE_DEPTHWISE_BITS = 8


def needs_moments(plan: WeightPlan) -> bool:
    """Whether ``plan``'s weight is quantized with its H (see OUTPUT_AWARE_DEPTHWISE_BITS): all but 8-bit depthwise layers."""
    return not (plan.bits_rule == "depthwise" and plan.bits >= OUTPUT_AWARE_DEPTHWISE_BITS)


def moments_pass(model: onnx.ModelProto, plans: list[WeightPlan], samples: int, view: BranchView | None) -> tuple[onnx.ModelProto, MomentCollector]:
    """The model a pass summing the plans' H runs (the view's where there is one) and the collector it feeds.

    Through a view, readers in the branches not taken add no rows and the view's conditions are checked on every run.
    """
    if view is None:
        return model, MomentCollector(layer_inputs(model.graph, plans), samples)
    return view.model, MomentCollector(layer_inputs(view.model.graph, plans, view.unreached()), samples, view.guards(plans))


def holds_any(node: onnx.NodeProto, names: set[str]) -> bool:
    """Whether one of ``node``'s bodies (nested ones included) holds a node named in ``names``."""
    return any(n.name in names for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH
               for g in all_graphs(attr.g) for n in g.node)


def branch_view(model: onnx.ModelProto, wanted: set[str], head: Iterable[Mapping[str, np.ndarray]]) -> BranchView | None:
    """The model with the branches ``head`` takes inlined, for every If holding a node named in ``wanted``; None if none is.

    ``head``: the first calibration runs (whole feeds). An If whose condition varies over them, or whose branch
    would reuse a name the main graph has, stays an If (its layers keep no statistics).
    """
    if not any(is_op(n, "If") and holds_any(n, wanted) for n in model.graph.node):
        return None
    runs = list(head)
    view = BranchView(onnx.ModelProto())
    view.model.CopyFrom(model)
    graph = view.model.graph
    kept: set[str] = set()  # Ifs left as they are
    while ifs := [n for n in graph.node if is_op(n, "If") and holds_any(n, wanted) and n.name not in kept]:
        taken = _conditions(view.model, sorted({n.input[0] for n in ifs}), runs)
        for node in ifs:
            branch = taken.get(node.input[0])
            nodes = inline_branch(graph, node, branch) if branch is not None else None
            if branch is None or nodes is None:
                kept.add(node.name)
                why = "takes both branches on the first samples" if branch is None else "has a branch that reuses a name of the main graph"
                logger.info("calibration: If %s %s; the layers inside keep no statistics", node.name, why)
                continue
            other = attribute(node, "else_branch" if branch else "then_branch")
            skipped = frozenset(n.name for g in all_graphs(other) for n in g.node) if isinstance(other, onnx.GraphProto) else frozenset()
            view.inlined.append(InlinedBranch(node.input[0], branch, nodes, skipped))
            _declare_bool(graph, node.input[0])
    return view if view.inlined else None


def _conditions(model: onnx.ModelProto, conditions: list[str], runs: list[Mapping[str, np.ndarray]]) -> dict[str, bool]:
    """Per condition tensor, its value where it is the same on every run (and there is one); varying ones are left out."""
    seen: dict[str, set[bool]] = {name: set() for name in conditions}
    with exposing(model, conditions) as sess:
        for run in runs:
            try:
                values = sess.run(conditions, dict(run))
            except Exception as e:  # onnxruntime's exception types are not public
                raise OnnxqError(None, f"onnxruntime cannot run the model on the calibration data: {first_line(e)}") from e
            for name, value in zip(conditions, values, strict=True):
                seen[name].update(bool(v) for v in np.asarray(value).reshape(-1))
    return {name: values.pop() for name, values in seen.items() if len(values) == 1}


def inline_branch(graph: onnx.GraphProto, node: onnx.NodeProto, branch: bool) -> frozenset[str] | None:
    """Replace the If ``node`` of ``graph`` by the nodes of its ``branch`` (then: True); the names of the nodes it brought.

    The branch's outputs reach the If's outputs through Identity nodes; its initializers and value types join the
    graph. None, and ``graph`` unchanged, where the branch defines a tensor or node name ``graph`` already has.
    """
    body = attribute(node, "then_branch" if branch else "else_branch")
    assert isinstance(body, onnx.GraphProto)
    tensors_clash = defined_names(body) & (defined_names(graph) - set(node.output))
    if tensors_clash or {n.name for n in body.node} & {n.name for n in graph.node}:  # tensors and nodes: two namespaces
        return None
    position = next(i for i, n in enumerate(graph.node) if n.name == node.name and is_op(n, "If"))  # not `is`: the list is rebuilt
    outputs = [onnx.helper.make_node("Identity", [inner.name], [outer], name=f"{node.name}/branch_output_{i}")
               for i, (inner, outer) in enumerate(zip(body.output, node.output, strict=True)) if outer]
    brought = frozenset(n.name for g in all_graphs(body) for n in g.node)
    nodes = [*graph.node[:position], *body.node, *outputs, *graph.node[position + 1:]]
    graph.initializer.extend(body.initializer)
    graph.value_info.extend(body.value_info)
    del graph.node[:]
    graph.node.extend(nodes)
    return brought


def _declare_bool(graph: onnx.GraphProto, name: str) -> None:
    """Give ``name`` a bool type where the graph does not declare one (it is fetched as an output: onnxruntime checks types)."""
    if not any(v.name == name for v in [*graph.value_info, *graph.input, *graph.output]):
        graph.value_info.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, None))
