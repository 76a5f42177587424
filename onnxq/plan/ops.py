"""Which op each planned weight's readers become: onnxq's IntConv/PostConv, onnxruntime's embedding lookup, or QDQ.

The choice is made once, at plan time, from the graph as the planner saw it (its declared shapes give the rank of each
MatMul's input, which activation QDQ pairs later hide); calibration, the weight codes and the rewrite all follow it.
``OpChoice.reason`` says why a layer stays QDQ although ``--format int``/``post`` asked for the ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxq.config import NBITS_AUTO_WEIGHTS, NBitsMode, QuantizeConfig, SqrtMode, WeightFormat
from onnxq.model.graph import attribute, constant_initializers, declared_shapes, is_op, subgraphs, text_attribute, used_names
from onnxq.native.domain import CONV_OPS, INT_CONV, LOOKUP_OP, MATMUL_NBITS, POST_CONV
from onnxq.numerics.uniform import storage_bits
from onnxq.plan.handlers import CONTRIB_DOMAIN, RECURRENT_WEIGHTS, TABLE_OPS
from onnxq.plan.weights import WeightPlan
from onnxq.rewrite.gemm import GEMM_TYPES, unsupported, weight_is_rows


def runs_as_lookup(plan: WeightPlan, rank: int) -> bool:
    """Whether every reader of the weight is a main-graph Gather of rows from a 2-D table (what the lookup op runs)."""
    return rank == 2 and all(u.op_type in TABLE_OPS and u.channel_axis == 0 and not u.body_of for u in plan.uses)


#: The shortest K MatMulNBits takes (its smallest block).
NBITS_MIN_K = 16


def runs_as_nbits(plan: WeightPlan, rank: int, targets: OpTargets, config: QuantizeConfig) -> bool:
    """Whether a weight-only weight runs as onnxruntime's MatMulNBits (onnxq/rewrite/matmul_nbits.py).

    As ``--matmul-nbits`` says (by default weights of 2^20 values or more), where every reader is a main-graph MatMul
    x @ W or Gemm (transA 0, a constant C or none) of a 2-D float32 weight with K of 16 at least, activations float.
    The op takes plain codes only: 2-4-bit weights that run as it get plain codes unless ``--sqrt on`` asks for sqrt
    codes (then they are decoded at load).
    """
    if config.activations is not None or not plan.is_float32 or plan.in_body or rank != 2 or config.matmul_nbits is NBitsMode.OFF:
        return False
    if storage_bits(plan.bits) == 4 and config.sqrt is SqrtMode.ON:
        return False
    dims = targets.consts[plan.tensor].dims
    if config.matmul_nbits is NBitsMode.AUTO and dims[0] * dims[1] < NBITS_AUTO_WEIGHTS:
        return False
    for use in plan.uses:
        node = targets.nodes.get(use.node)
        if node is None or use.body_of or use.input_index != 1 or node.op_type not in GEMM_TYPES or node.domain:
            return False
        if dims[1 if weight_is_rows(node) else 0] < NBITS_MIN_K:
            return False
        computed_bias = len(node.input) > 2 and node.input[2] and node.input[2] not in targets.consts
        if node.op_type == "Gemm" and (attribute(node, "transA", 0) or computed_bias):
            return False
    return True


def convertible(node: onnx.NodeProto, weight_rank: int) -> bool:
    """Whether a Conv node can run as IntConv/PostConv: 2-D, explicit padding."""
    auto_pad = text_attribute(node, "auto_pad", "NOTSET")
    return is_op(node, "Conv") and weight_rank == 4 and auto_pad in ("NOTSET", "VALID")


@dataclass(frozen=True)
class OpTargets:
    """What the op choice reads off a graph: nodes by name, first inputs' ranks, constants, each tensor's readers.

    The ranks are known where the graph declares the shape; a tensor's readers are the main-graph nodes that read it,
    in their bodies too.
    """

    nodes: dict[str, onnx.NodeProto]
    ranks: dict[str, int]
    consts: dict[str, onnx.TensorProto]
    readers: dict[str, set[str]]

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> OpTargets:
        """The targets of ``graph`` as it is now (ranks from its declared shapes)."""
        return cls({node.name: node for node in graph.node}, input_ranks(graph), constant_initializers(graph), tensor_readers(graph))


def tensor_readers(graph: onnx.GraphProto) -> dict[str, set[str]]:
    """For each tensor, the names of the main-graph nodes that read it: as an input, or inside their bodies."""
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in {n for n in node.input if n} | {n for body in subgraphs(node) for n in used_names(body)}:
            readers.setdefault(name, set()).add(node.name)
    return readers


def other_reader(plan: WeightPlan, targets: OpTargets) -> onnx.NodeProto | None:
    """A main-graph node that reads the plan's weight but is none of its quantized layers (a Shape, a ReduceMean), or None.

    Such a node needs the float tensor under its name: the QDQ rewrite gives it the decoded weight, while onnxq's ops,
    the lookup and MatMulNBits take the codes in the layers' place and leave no float tensor for it.
    """
    layers = {use.top_node for use in plan.uses}
    name = next((n for n in sorted(targets.readers.get(plan.tensor, ())) if n not in layers), None)
    return None if name is None else targets.nodes[name]


def input_ranks(graph: onnx.GraphProto) -> dict[str, int]:
    """The rank of each node's first input, by node name, where the graph declares its shape."""
    shapes = declared_shapes(graph)
    return {node.name: len(shapes[node.input[0]]) for node in graph.node if node.input and node.input[0] in shapes}


@dataclass(frozen=True)
class OpChoice:
    """The op a weight's readers become: onnxq's IntConv/PostConv, onnxruntime's lookup or MatMulNBits, or None (QDQ).

    ``reason`` says why onnxq's ops do not run them when the format asked for the ops.
    """

    op_type: str | None
    reason: str = ""

    @property
    def integer(self) -> bool:
        """Whether the readers become onnxq's integer ops (which quantize their input themselves)."""
        return self.op_type in CONV_OPS


def op_choice(plan: WeightPlan, targets: OpTargets, config: QuantizeConfig) -> OpChoice:
    """The op the readers of the plan's weight become.

    A weight that some node besides its layers reads stays QDQ (:func:`other_reader`). A table only looked up
    (main-graph Gathers of rows from a 2-D table) becomes onnxruntime's lookup, whatever the format. Otherwise
    IntConv/PostConv when the format asks for it and every reader can run as the op; else, with the reason,
    onnxruntime's MatMulNBits for weight-only Gemm/MatMul weights it runs (runs_as_nbits), or QDQ. The qdq format
    writes MatMulNBits wherever it runs.

    A first or last layer at other bits than the rest (--first-last-bits) runs as IntConv at those bits where the ops
    can run it (a Conv, or a Gemm/MatMul: a 512->1000 classifier as 8-bit IntConv runs faster than float,
    tools/bench_ops.py --skip-convs --skip-models; the first Conv then starts the model's uint8 chain), else as
    MatMulNBits where that can, else as in the qdq format, without a reason (that is the rule).
    """
    rank = len(targets.consts[plan.tensor].dims)
    if (other := other_reader(plan, targets)) is not None:
        return OpChoice(None, "" if config.format is WeightFormat.QDQ else f"also read by {other.op_type} {other.name}, which takes the float weight")
    if runs_as_lookup(plan, rank):
        return OpChoice(LOOKUP_OP)
    if config.format is WeightFormat.QDQ:
        return OpChoice(MATMUL_NBITS if runs_as_nbits(plan, rank, targets, config) else None)
    if plan.in_body:
        return OpChoice(None, "read inside a control-flow body (If, Loop, Scan); the ops replace main-graph nodes")
    if not plan.is_float32:
        return OpChoice(None, "a float16 layer; the ops take float32 inputs")
    if plan.first_or_last and plan.bits != config.bits:
        if _gemm_runs_as_op(plan, targets) or _convs_run_as_op(plan, targets, rank):
            return OpChoice(INT_CONV)
        return OpChoice(MATMUL_NBITS if runs_as_nbits(plan, rank, targets, config) else None)
    if config.format is WeightFormat.POST and plan.bits > 4:
        return OpChoice(None, f"POST takes 2-4 bits, this layer has {plan.bits}")
    readers = [targets.nodes[use.node] for use in plan.uses]
    if any(node.op_type in TABLE_OPS for node in readers):
        return OpChoice(None, "looked up by Gather (an embedding table); the ops run Conv, Gemm and MatMul")
    if (fused := next((node for node in readers if node.domain == CONTRIB_DOMAIN), None)) is not None:
        return OpChoice(None, f"onnxruntime's {fused.op_type} ({fused.domain}); the ops run Conv, Gemm and MatMul")
    if (recurrent := next((node for node in readers if node.op_type in RECURRENT_WEIGHTS), None)) is not None:
        return OpChoice(None, f"a recurrent layer ({recurrent.op_type}); the ops run Conv, Gemm and MatMul")
    kinds = {node.op_type in GEMM_TYPES for node in readers}
    if len(kinds) > 1:
        return OpChoice(None, "weight shared by a Conv and a Gemm/MatMul")
    if kinds == {True}:
        if (reason := _gemm_reason(plan, readers, targets)) is not None:
            return OpChoice(MATMUL_NBITS if runs_as_nbits(plan, rank, targets, config) else None, reason)
    elif (other := next((node for node in readers if not convertible(node, rank)), None)) is not None:
        return OpChoice(None, f"{other.op_type} {other.name}: the ops run 2-D Conv with explicit padding, Gemm and MatMul")
    return OpChoice(POST_CONV if config.format is WeightFormat.POST else INT_CONV)


def _gemm_reason(plan: WeightPlan, readers: list[onnx.NodeProto], targets: OpTargets) -> str | None:
    """Why the Gemm/MatMul ``readers`` of the plan's weight cannot run as the op (None: they can)."""
    if any(use.input_index != 1 for use in plan.uses):
        return "MatMul W @ x (the weight first): the ops run x @ W"
    if len({weight_is_rows(node) for node in readers}) > 1:
        return "weight read as (K, M) by one node and (M, K) by another"
    shape = tuple(targets.consts[plan.tensor].dims)
    return next((r for node in readers if (r := unsupported(node, shape, targets.ranks.get(node.name), targets.consts)) is not None), None)


def _convs_run_as_op(plan: WeightPlan, targets: OpTargets, rank: int) -> bool:
    """Whether every reader of the plan's weight is a main-graph Conv the ops can run (a float32 weight)."""
    readers = [targets.nodes.get(use.node) for use in plan.uses]
    return bool(readers) and plan.is_float32 and not plan.in_body and all(node is not None and convertible(node, rank) for node in readers)


def _gemm_runs_as_op(plan: WeightPlan, targets: OpTargets) -> bool:
    """Whether every reader of the plan's weight is a Gemm/MatMul the ops can run."""
    readers = [targets.nodes[use.node] for use in plan.uses]
    return bool(readers) and all(node.op_type in GEMM_TYPES for node in readers) and _gemm_reason(plan, readers, targets) is None


