"""The registry of weighted ops: for each op type, which input holds its weight and which axis of it the output channels.

A handler looks at one node (and its weight's rank) and returns a :class:`WeightSlot`, or None when the node's weight
is of a shape onnxq does not quantize for that op. Extend :data:`HANDLERS` to quantize more kinds of node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from onnxq.model.graph import attribute, text_attribute
from onnxq.model.opset import is_default_domain
from onnxq.native.domain import ORT_DOMAIN

#: Weight dtypes we quantize. Float16 weights get float16 scales, so their DequantizeLinear gives float16 as before.
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
#: Element types of stored weight codes: a Cast of a constant of these to float decodes a quantized weight (what onnxq
#: writes to decode weights at load), which preparation leaves alone so that such a model reads as quantized.
CODE_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4})


@dataclass(frozen=True)
class WeightSlot:
    """What a handler says about one node: its weight input and that weight's output-channel axis."""

    input_index: int
    channel_axis: int


Handler = Callable[[onnx.NodeProto, int], WeightSlot | None]


def _conv(node: onnx.NodeProto, rank: int) -> WeightSlot | None:
    return WeightSlot(1, 0) if rank >= 3 else None


def _conv_transpose(node: onnx.NodeProto, rank: int) -> WeightSlot | None:
    # Weight is (C_in, C_out / group, k...): axis 1 holds output channels only when group == 1.
    if rank < 3:
        return None
    return WeightSlot(1, 1 if attribute(node, "group", 1) == 1 else 0)


def _gemm(node: onnx.NodeProto, rank: int) -> WeightSlot | None:
    return WeightSlot(1, 0 if attribute(node, "transB", 0) else 1) if rank == 2 else None


def _matmul(node: onnx.NodeProto, rank: int) -> WeightSlot | None:
    return WeightSlot(1, rank - 1) if rank >= 2 else None


def _gather(node: onnx.NodeProto, rank: int) -> WeightSlot | None:
    """An embedding lookup: the table is input 0, and each slice along the gathered axis (a token's row) gets its own scale."""
    axis = int(attribute(node, "axis", 0))
    axis = axis + rank if axis < 0 else axis
    return WeightSlot(0, axis) if rank >= 2 and 0 <= axis < rank else None


def _recurrent(node: onnx.NodeProto, rank: int) -> WeightSlot | None:
    """LSTM, GRU, RNN: W and R are (directions, gates x hidden, inputs); each gate's row of a direction is a channel."""
    return WeightSlot(1, 1) if rank == 3 else None


def _matmul_weight_first(node: onnx.NodeProto, rank: int) -> WeightSlot | None:
    """W @ x: the weight's rows (axis rank - 2) are the output channels."""
    return WeightSlot(0, rank - 2) if rank >= 2 else None


def einsum_channel_axis(equation: str, weight_index: int, rank: int) -> int | None:
    """The weight axis an Einsum keeps in its output (the last such, as for MatMul), or None where there is none to use.

    A scale along an axis the sum does not run over factors out of it, so that axis can carry per-channel scales.
    Equations with an ellipsis, repeated letters in the weight, or more than two inputs are left alone.
    """
    equation = equation.replace(" ", "")
    inputs, _, output = equation.partition("->")
    terms = inputs.split(",")
    if "." in equation or len(terms) != 2:
        return None
    weight = terms[weight_index]
    if len(weight) != rank or len(set(weight)) != rank:
        return None
    if "->" not in equation:  # implicit output: the letters that appear once, in alphabetical order
        letters = "".join(terms)
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    kept = [axis for axis, letter in enumerate(weight) if letter in output]
    return kept[-1] if kept else None


def einsum_input_axis(equation: str, weight_index: int, weight_rank: int) -> int | None:
    """The axis of the other operand a 2-D weight's rows run along, where the Einsum is a dense layer on it; else None.

    That is: two operands, no ellipsis, no letter repeated within a term; the weight's two letters one summed (it appears
    in the other operand, not in the output) and one kept; every other letter of the other operand kept in the output
    (so each output row is x @ W over the summed axis, as MatMul's rows: onnxq/calibrate/moments.py sums their H).
    """
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if "." in equation or len(terms) != 2 or not arrow or weight_rank != 2:
        return None
    weight, other = terms[weight_index], terms[1 - weight_index]
    if len(weight) != 2 or len(set(weight)) != 2 or len(set(other)) != len(other):
        return None
    summed = [letter for letter in weight if letter in other and letter not in output]
    kept = [letter for letter in weight if letter in output and letter not in other]
    if len(summed) != 1 or len(kept) != 1 or any(letter not in output for letter in other if letter != summed[0]):
        return None
    return other.index(summed[0])


def _einsum(node: onnx.NodeProto, rank: int, index: int = 1) -> WeightSlot | None:
    axis = einsum_channel_axis(text_attribute(node, "equation"), index, rank)
    return WeightSlot(index, axis) if axis is not None else None


def _einsum_weight_first(node: onnx.NodeProto, rank: int) -> WeightSlot | None:
    return _einsum(node, rank, 0)


def weight_input(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto], initializers: set[str], hidden: frozenset[str] = frozenset()) -> int:
    """Which input of a weighted node holds its weight: 1, or 0 for a table op and for a MatMul/Einsum W @ x (constant first).

    ``hidden``: names a control-flow body around the node defines, which hide the main graph's tensors of that name.
    """
    if node.op_type in TABLE_OPS:
        return 0
    first, second = node.input[0], node.input[1]
    second_is_activation = second in hidden or (second not in consts and second not in initializers)
    if node.op_type in WEIGHT_FIRST and first in consts and first not in hidden and second_is_activation:
        return 0
    return 1


#: Op type -> handler. Extend this to quantize more kinds of node.
HANDLERS: dict[str, Handler] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Gather": _gather,
    "LSTM": _recurrent,
    "GRU": _recurrent,
    "RNN": _recurrent,
    "Einsum": _einsum,
}


#: onnxruntime's fused transformer ops, saved by its transformer optimizer (com.microsoft domain).
CONTRIB_DOMAIN = ORT_DOMAIN


def _attention(node: onnx.NodeProto, rank: int) -> WeightSlot | None:
    """Attention's packed q, k, v weight (hidden, 3 x hidden): x @ W, so its columns are the output channels."""
    return WeightSlot(1, 1) if rank == 2 else None


def _embedding_tables(node: onnx.NodeProto, rank: int) -> WeightSlot | None:
    """EmbedLayerNormalization's word, position and segment tables: a row looked up per token, a scale per row."""
    return WeightSlot(2, 0) if rank == 2 else None


#: com.microsoft op type -> handler. Their weights are written decoded at load (onnxruntime folds the decode into a
#: constant before the op pre-packs it); their inputs stay float, as no onnxruntime kernel takes them quantized.
CONTRIB_HANDLERS: dict[str, Handler] = {"Attention": _attention, "EmbedLayerNormalization": _embedding_tables}
#: The inputs of those ops that hold weights.
CONTRIB_WEIGHTS: dict[str, tuple[int, ...]] = {"Attention": (1,), "EmbedLayerNormalization": (2, 3, 4)}
#: Those of them that look their weights' rows up (tables) rather than multiply an input with them.
CONTRIB_TABLES = frozenset({"EmbedLayerNormalization"})


def handler_of(node: onnx.NodeProto) -> Handler | None:
    """The handler of a node's op (an ONNX op, or one of onnxruntime's fused ops), or None: no weight onnxq quantizes."""
    if is_default_domain(node.domain):
        return HANDLERS.get(node.op_type)
    return CONTRIB_HANDLERS.get(node.op_type) if node.domain == CONTRIB_DOMAIN else None


def is_contrib(op_type: str) -> bool:
    """Whether a weight reader's op type is one of onnxruntime's fused ops (:data:`CONTRIB_HANDLERS`)."""
    return op_type in CONTRIB_HANDLERS


#: Handlers for ops whose weight may come first (W @ x), used when input 0 is the constant.
WEIGHT_FIRST: dict[str, Handler] = {"MatMul": _matmul_weight_first, "Einsum": _einsum_weight_first}


#: Ops with more than one weight: the inputs holding them (the input weights W and the recurrence weights R).
RECURRENT_WEIGHTS: dict[str, tuple[int, ...]] = {"LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}


#: Ops whose weight, when they have one, is a table they look values up in (input 0). They are weighted layers only
#: when that table is a float constant of rank 2 or more; reading anything else they are ordinary ops, not reported.
TABLE_OPS = frozenset({"Gather"})
