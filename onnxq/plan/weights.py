"""Which weights get quantized, along which axis, at how many bits.

The handlers (onnxq/plan/handlers.py) say, per node, which input is its weight and which axis of it the output
channels; ``plan_weights`` turns those answers into one typed plan per weight tensor (a tensor shared by several nodes
is planned, and quantized, once), with the bits the rules give it: the first/last rule, per-node and per-tensor
overrides, and 7-bit weights where onnxruntime's integer kernels could saturate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import onnx

from onnxq.config import QuantizeConfig, ReduceRange, WeightFormat
from onnxq.model.graph import attribute, constant_initializers, defined_names, is_op, subgraphs
from onnxq.model.opset import is_default_domain
from onnxq.native.cpu import has_vnni
from onnxq.native.domain import CONV_OPS, LOOKUP_OP
from onnxq.plan.boundary import boundary_nodes
from onnxq.plan.handlers import (
    CODE_TYPES,
    CONTRIB_TABLES,
    CONTRIB_WEIGHTS,
    FLOAT_TYPES,
    RECURRENT_WEIGHTS,
    TABLE_OPS,
    WEIGHT_FIRST,
    Handler,
    handler_of,
    is_contrib,
    weight_input,
)

#: The reason given for a weight that a DequantizeLinear computes from integer codes.
ALREADY_QUANTIZED = "weight is already quantized (decoded from integer codes: DequantizeLinear, or Cast and Mul)"


@dataclass(frozen=True)
class WeightUse:
    """One node reading a weight tensor as its weight."""

    node: str
    op_type: str
    channel_axis: int
    input_index: int = 1  # which input of the node the weight is (0: a MatMul W @ x, a Gather's table)
    body_of: str = ""  # the main-graph node (If, Loop, Scan) whose body holds this reader; "" for the main graph

    @property
    def data_input(self) -> int | None:
        """The input holding the activation multiplied with the weight, or None (a Gather's indices, a recurrent layer's sequence)."""
        if self.op_type in TABLE_OPS or self.op_type in RECURRENT_WEIGHTS or self.op_type == "Einsum" or is_contrib(self.op_type):
            return None  # Einsum, onnxruntime's fused ops: onnxruntime has no integer kernel to fuse a pair in front of them into
        return 1 - self.input_index

    @property
    def top_node(self) -> str:
        """The main-graph node this use belongs to: the reader itself, or the control-flow node around it."""
        return self.body_of or self.node


@dataclass(frozen=True)
class WeightPlan:
    """How one weight tensor will be quantized.

    ``channel_axis`` is None when the users of a shared tensor disagree on it, in which
    case the tensor is quantized per tensor whatever the granularity asked for.
    """

    tensor: str
    uses: tuple[WeightUse, ...]
    channel_axis: int | None
    bits: int
    first_or_last: bool
    dtype: int = onnx.TensorProto.FLOAT  # the float weight's element type (TensorProto enum)
    bits_rule: str = ""  # which rule gave other bits than -b: "first/last", "depthwise", "per node", "mixed precision", "reduced range"

    @property
    def is_float32(self) -> bool:
        """Whether the weight (and so the layer) is float32: only those get quantized activations or onnxq's ops."""
        return self.dtype == onnx.TensorProto.FLOAT

    @property
    def nodes(self) -> tuple[str, ...]:
        """Names of the nodes that read this weight."""
        return tuple(u.node for u in self.uses)

    @property
    def in_body(self) -> bool:
        """Whether a reader sits inside a control-flow body (such weights stay weight-only QDQ)."""
        return any(u.body_of for u in self.uses)


@dataclass(frozen=True)
class Skipped:
    """A weighted node left in float, and why."""

    node: str
    reason: str


@dataclass(frozen=True)
class _Names:
    """What the planner looks names up in: the main graph's constants, initializers, inputs and outputs."""

    consts: dict[str, onnx.TensorProto]
    initializers: set[str]
    inputs: set[str]
    outputs: set[str]
    dequantized: set[str]  # tensors computed from integer codes only (DequantizeLinear or Cast, then e.g. a scale, sqrt mode's Abs/Mul)

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> _Names:
        consts = constant_initializers(graph)
        return cls(consts, {t.name for t in graph.initializer}, {i.name for i in graph.input}, {o.name for o in graph.output},
                   _dequantized(graph, consts))


def _dequantized(graph: onnx.GraphProto, consts: dict[str, onnx.TensorProto]) -> set[str]:
    """Tensors decoded from constants, and those computed from them and constants alone (in one pass).

    Decoded: by a DequantizeLinear, or a Cast (or Mod and BitShift: 4-bit halves) of 4/8-bit integer codes (what onnxq
    writes to decode weights at load).
    """
    found: set[str] = set()
    for node in graph.node:
        inputs = [name for name in node.input if name]
        decodes = is_op(node, "DequantizeLinear") or (is_op(node, "Cast", "BitShift", "Mod") and bool(inputs) and inputs[0] in consts
                                                      and consts[inputs[0]].data_type in CODE_TYPES)
        if decodes and all(name in consts for name in inputs):
            found.update(node.output)
        elif inputs and all(name in consts or name in found for name in inputs) and any(name in found for name in inputs):
            found.update(node.output)
    return found


#: onnxruntime's blocked-layout ops, which only a model saved after its ORT_ENABLE_ALL optimizations holds.
NCHWC_DOMAIN = "com.microsoft.nchwc"
NCHWC_REASON = ("onnxruntime's NCHWc layout Conv (com.microsoft.nchwc, its weight reordered for this CPU: a model saved at "
                "ORT_ENABLE_ALL); quantize the model before onnxruntime's optimizations, or one saved at ORT_ENABLE_EXTENDED")


def find_weight_uses(graph: onnx.GraphProto) -> tuple[dict[str, list[WeightUse]], list[Skipped]]:
    """Map each quantizable weight tensor to the nodes that use it as a weight."""
    names = _Names.of(graph)
    uses: dict[str, list[WeightUse]] = {}
    skipped: list[Skipped] = []
    for node, body_of, hidden in _all_nodes(graph):
        handler = handler_of(node)
        if node.domain == NCHWC_DOMAIN and node.op_type == "Conv":
            skipped.append(Skipped(node.name, NCHWC_REASON))
            continue
        if handler is None or len(node.input) < 2:
            continue
        contrib = CONTRIB_WEIGHTS.get(node.op_type) if is_contrib(node.op_type) and not is_default_domain(node.domain) else None
        indices = contrib or RECURRENT_WEIGHTS.get(node.op_type) or (weight_input(node, names.consts, names.initializers, hidden),)
        for index in indices:
            found = _weight_use(node, index, handler, body_of, hidden, names) if index < len(node.input) and node.input[index] else None
            if isinstance(found, Skipped):
                skipped.append(found)
            elif found is not None:
                uses.setdefault(node.input[index], []).append(found)
    return uses, skipped


def _weight_use(
    node: onnx.NodeProto, index: int, handler: Handler, body_of: str, hidden: frozenset[str], names: _Names
) -> WeightUse | Skipped | None:
    """How ``node`` reads its input ``index`` as a weight: a use, the reason it stays float, or None (not a weight)."""
    name = node.input[index]
    tensor = names.consts.get(name) if name not in hidden else None
    if node.op_type in TABLE_OPS and (tensor is None or tensor.data_type not in FLOAT_TYPES or len(tensor.dims) < 2):
        return None
    if tensor is None:
        if name in hidden:
            reason = _body_reason(node)
        elif name in names.initializers:
            reason = ("weight is an initializer also listed as a graph input, which callers may override (older exporters' "
                      "habit: drop such names from graph.input to have them quantized)")
        elif name in names.inputs:
            reason = "weight is a graph input, not a constant"
        elif name in names.dequantized:
            reason = ALREADY_QUANTIZED
        elif node.op_type in WEIGHT_FIRST:
            reason = "multiplies two activations (no weight; e.g. attention scores)"
        else:
            reason = "weight is computed, not a constant"
        return Skipped(node.name, reason)
    if tensor.data_type not in FLOAT_TYPES:
        return Skipped(node.name, f"weight dtype {onnx.TensorProto.DataType.Name(tensor.data_type)} is not float32 or float16")
    if name in names.outputs:
        return Skipped(node.name, "weight is also a graph output")
    slot = (WEIGHT_FIRST[node.op_type] if index == 0 and node.op_type in WEIGHT_FIRST else handler)(node, len(tensor.dims))
    if slot is None and node.op_type == "Einsum":
        return Skipped(node.name, "Einsum equation without a weight axis kept in the output (or with an ellipsis or a repeated letter)")
    if slot is None:
        return Skipped(node.name, f"weight of rank {len(tensor.dims)} is not supported for {node.op_type}")
    return WeightUse(node.name, node.op_type, slot.channel_axis, index, body_of)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[tuple[onnx.NodeProto, str, frozenset[str]]]:
    """Each node of the graph and of its control-flow bodies, with the main-graph node around it and the names its bodies define.

    The node around a main-graph node is ""; names the bodies define hide main-graph tensors of the same name.
    """
    for node in graph.node:
        yield node, "", frozenset()
        for body in subgraphs(node):
            yield from _body_nodes(body, node.name, frozenset())


def _body_nodes(body: onnx.GraphProto, top: str, outer: frozenset[str]) -> Iterator[tuple[onnx.NodeProto, str, frozenset[str]]]:
    hidden = outer | defined_names(body)
    for node in body.node:
        yield node, top, hidden
        for inner in subgraphs(node):
            yield from _body_nodes(inner, top, hidden)


def _body_reason(node: onnx.NodeProto) -> str:
    """Why a node whose weight is a value of its own control-flow body stays float."""
    if node.op_type in WEIGHT_FIRST:
        return "multiplies two activations (no weight; e.g. attention scores)"
    return "weight is computed inside a control-flow body, not a constant"


def plan_weights(graph: onnx.GraphProto, config: QuantizeConfig) -> tuple[list[WeightPlan], list[Skipped]]:
    """One plan per weight tensor to quantize, and the weighted nodes left in float with the reason."""
    uses, skipped = find_weight_uses(graph)
    consts = constant_initializers(graph)
    boundary = boundary_nodes(graph, {u.node for us in uses.values() for u in us})
    convs = {n.name: n for n in graph.node if is_op(n, "Conv")}
    plans: list[WeightPlan] = []
    for tensor, tensor_uses in uses.items():
        names = [u.node for u in tensor_uses]
        excluded = [n for n in names if n in config.exclude]
        if excluded:
            skipped.extend(Skipped(n, "excluded by the user") for n in names)
            continue
        on_boundary = any(u.node in boundary for u in tensor_uses)
        depthwise = all(_is_depthwise(consts[tensor].dims, convs.get(u.node)) for u in tensor_uses)
        bits, rule = _bits_for(tensor, names, on_boundary, depthwise, config)
        axes = {u.channel_axis for u in tensor_uses}
        dtype = consts[tensor].data_type
        plans.append(WeightPlan(tensor, tuple(tensor_uses), axes.pop() if len(axes) == 1 else None, bits, on_boundary, dtype, rule))
    return plans, skipped


def _is_depthwise(dims: Sequence[int], conv: onnx.NodeProto | None) -> bool:
    """Whether ``conv`` (None: not a main-graph Conv) reads its weight of ``dims`` depthwise: one input channel per group, several groups."""
    return conv is not None and len(dims) >= 3 and dims[1] == 1 and int(attribute(conv, "group", 1)) > 1


def _bits_for(tensor: str, nodes: list[str], on_boundary: bool, depthwise: bool, config: QuantizeConfig) -> tuple[int, str]:
    """Bits for a tensor read by ``nodes``, and the rule that gave them ("" for -b).

    An explicit per-tensor choice wins, then a per-node one, then the first/last rule, then the depthwise one.
    """
    if tensor in config.tensor_bits:
        return config.tensor_bits[tensor], "mixed precision"
    explicit = [config.node_bits[n] for n in nodes if n in config.node_bits]
    if explicit:
        return max(explicit), "per node"
    if on_boundary and config.first_last_bits is not None:
        return config.first_last_bits, "first/last"
    if depthwise and config.depthwise_bits is not None and config.format is WeightFormat.QDQ and config.bits < config.depthwise_bits:
        return config.depthwise_bits, "depthwise"
    return config.bits, ""


#: Largest weight width that never saturates onnxruntime's 16-bit pair sums beside uint8 activations.
REDUCED_BITS = 7


def reduces_range(plan: WeightPlan, in_ops: bool, config: QuantizeConfig) -> bool:
    """Whether the plan's 8-bit weight becomes 7-bit codes (ReduceRange): ``in_ops``, onnxq's integer ops read it.

    Tables only looked up (Gather) keep their bits: no integer product reads them.
    """
    if plan.bits != 8 or _only_looked_up(plan) or config.reduce_range is ReduceRange.OFF:
        return False
    if config.reduce_range is ReduceRange.ON:
        return True
    integer_products = in_ops or (config.activations is not None and config.activations.bits == 8)
    return integer_products and not has_vnni()


def reduce_weight_range(plans: list[WeightPlan], integer_ops: set[str], config: QuantizeConfig) -> list[WeightPlan]:
    """The plans with each 8-bit weight that ``reduces_range`` cuts at 7 bits (``integer_ops``: tensors the ops read)."""
    return [dataclasses.replace(p, bits=REDUCED_BITS, bits_rule="reduced range") if reduces_range(p, p.tensor in integer_ops, config) else p
            for p in plans]


def _only_looked_up(plan: WeightPlan) -> bool:
    return all(use.op_type in TABLE_OPS or use.op_type in CONTRIB_TABLES for use in plan.uses)


#: Ops that only a quantized model holds: a model made of them has nothing left to quantize.
QUANTIZED_OPS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulNBits", "QGemm", LOOKUP_OP,
                           *CONV_OPS})


def nothing_to_quantize(skipped: list[Skipped], graph: onnx.GraphProto) -> str:
    """The error for a model without a weight to quantize, with the first weighted node's reason."""
    quantized_ops = sum(n.op_type in QUANTIZED_OPS for n in graph.node)
    if quantized_ops or any(s.reason == ALREADY_QUANTIZED for s in skipped):  # sqrt mode's weights come out of a Mul
        return "the model is already quantized (no float weight is left to quantize); give onnxq the float model"
    message = ("no quantizable weights (Conv, ConvTranspose, Gemm, MatMul, Einsum, LSTM/GRU/RNN with constant float32/float16 "
               "weights, or Gather from a float table)")
    if skipped:
        more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
        message += f"; left float: {skipped[0].node} ({skipped[0].reason}){more}"
    return message
