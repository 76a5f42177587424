"""What a model's weights are: format, bits, granularity and stored size per weighted node, for any ONNX model.

Reads only the graph and tensor headers (dtypes, dims, external-data lengths), never the weight
values, so it describes models of any size and from any tool: onnxq's QDQ and IntConv/PostConv
output, onnxruntime's QDQ, QOperator (QLinearConv, ConvInteger, ...), MatMulNBits and GatherBlockQuantized models, and
float models.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
from onnx import numpy_helper

from onnxq.model.graph import all_graphs, attribute, subgraphs
from onnxq.model.load import read_model_file
from onnxq.model.prepare import name_nodes
from onnxq.native.domain import DOMAIN
from onnxq.plan.handlers import CODE_TYPES, CONTRIB_DOMAIN, CONTRIB_WEIGHTS, RECURRENT_WEIGHTS, TABLE_OPS
from onnxq.rewrite.gemm import has_pixel_steps

#: Bits per element of each ONNX tensor type (strings have none).
_DTYPE_BITS = {
    **dict.fromkeys(("FLOAT", "INT32", "UINT32"), 32),
    **dict.fromkeys(("DOUBLE", "INT64", "UINT64", "COMPLEX64"), 64),
    **dict.fromkeys(("FLOAT16", "BFLOAT16", "INT16", "UINT16"), 16),
    **dict.fromkeys(("INT8", "UINT8", "BOOL", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0"), 8),
    **dict.fromkeys(("FLOAT6E2M3", "FLOAT6E3M2"), 6),
    **dict.fromkeys(("INT4", "UINT4", "FLOAT4E2M1"), 4),
    **dict.fromkeys(("INT2", "UINT2"), 2),
    "COMPLEX128": 128,
}
#: Domains onnxruntime runs without an extra library.
_BUILTIN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "com.microsoft", "com.microsoft.nchwc")
#: Ops between a stored weight and its reader that only change layout or type.
_PASS_THROUGH = {"Identity", "Transpose", "Reshape", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Slice"}
#: Element types of codes that a Cast and a Mul by a scale decode, and the scale's float types.
_INTEGER_CODES = CODE_TYPES | {onnx.TensorProto.INT16}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
#: Ops that produce quantized activations.
_QUANTIZERS = {"QuantizeLinear", "DynamicQuantizeLinear", "QuantizeDynamicU8"}


def dtype_name(data_type: int) -> str:
    """An ONNX tensor type as people write it: float32, float16, int8, int4, ..."""
    name = onnx.TensorProto.DataType.Name(data_type).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def dtype_bits(data_type: int) -> int:
    """Bits per element of an ONNX tensor type; 0 for types without a fixed size (strings)."""
    return _DTYPE_BITS.get(onnx.TensorProto.DataType.Name(data_type), 0)


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's values, from its header alone: external length, raw data, or dims x element size."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        entries = {e.key: e.value for e in tensor.external_data}
        if entries.get("length", "").isdigit():
            return int(entries["length"])
    elif tensor.raw_data:
        return len(tensor.raw_data)
    bits = dtype_bits(tensor.data_type)
    if not bits:
        return len(tensor.SerializeToString())
    return (math.prod(tensor.dims) * bits + 7) // 8


@dataclass(frozen=True)
class WeightedNode:
    """One node that reads a weight, and how that weight is stored.

    ``weight`` names the stored tensor (codes or float values) and ``shape`` is its shape as
    stored (packed ops store (rows, bytes)). ``bits`` is the code width: the op's ``bits``
    attribute where it has one, else the stored type's width. ``granularity`` is tensor,
    channel or block; ``activations`` says how the node's input is quantized (float, or e.g.
    "uint8 static", "uint8 dynamic", "uint8 dynamic per row": a step per row of a Gemm's input). ``weight_bytes``
    counts the codes, ``scale_bytes`` the weight's scales and zero points.
    """

    node: str
    op_type: str
    domain: str
    weight: str
    shape: tuple[int, ...]
    format: str
    bits: int
    granularity: str | None
    sqrt: bool
    activations: str
    weight_bytes: int
    scale_bytes: int
    axis: int | None = None
    block_size: int | None = None
    scales: tuple[str, ...] = ()

    @property
    def quantized(self) -> bool:
        """Whether the weight is stored as codes rather than floats."""
        return not self.format.startswith(("float", "bfloat"))


@dataclass
class Inventory:
    """Everything ``onnxq inspect`` says about a model."""

    path: str | None
    file_bytes: int
    external_files: dict[str, int | None]
    opsets: dict[str, int]
    nodes: list[WeightedNode] = field(default_factory=list)
    initializer_bytes: int = 0

    @property
    def custom_domains(self) -> list[str]:
        """Imported domains onnxruntime does not know by itself."""
        return sorted(d for d in self.opsets if d not in _BUILTIN_DOMAINS)

    @property
    def needs_onnxq_library(self) -> bool:
        """Whether running the model needs onnxq's op library."""
        return DOMAIN in self.opsets or any(n.domain == DOMAIN for n in self.nodes)

    def _distinct(self) -> list[WeightedNode]:
        """One entry per stored weight tensor (shared weights are read by several nodes)."""
        return list({n.weight: n for n in self.nodes}.values())

    @property
    def weight_bytes_by_format(self) -> dict[str, int]:
        """Stored bytes of the weights, by format, each tensor counted once."""
        out: dict[str, int] = {}
        for n in self._distinct():
            out[n.format] = out.get(n.format, 0) + n.weight_bytes
        return dict(sorted(out.items()))

    @property
    def scale_bytes(self) -> int:
        """Stored bytes of weight scales and zero points, each tensor counted once."""
        by_tensors = {n.scales: n.scale_bytes for n in self._distinct() if n.scales}
        return sum(by_tensors.values())

    def to_dict(self) -> dict[str, object]:
        """The inventory as plain JSON-ready values."""
        return {
            "path": self.path,
            "file_bytes": self.file_bytes,
            "external_files": self.external_files,
            "opsets": self.opsets,
            "custom_domains": self.custom_domains,
            "needs_onnxq_library": self.needs_onnxq_library,
            "initializer_bytes": self.initializer_bytes,
            "weight_bytes_by_format": self.weight_bytes_by_format,
            "scale_bytes": self.scale_bytes,
            "nodes": [{**asdict(n), "shape": list(n.shape), "scales": list(n.scales)} for n in self.nodes],
        }


class _Scope:
    """Constants and producers visible in one graph (a subgraph also sees its parents')."""

    def __init__(self, graph: onnx.GraphProto, parent: _Scope | None = None) -> None:
        self.constants: dict[str, onnx.TensorProto] = dict(parent.constants) if parent else {}
        self.producers: dict[str, onnx.NodeProto] = dict(parent.producers) if parent else {}
        self.constants.update((t.name, t) for t in graph.initializer)
        for node in graph.node:
            self.producers.update((out, node) for out in node.output)
            value = attribute(node, "value") if node.op_type == "Constant" else None
            if isinstance(value, onnx.TensorProto):
                self.constants[node.output[0]] = value

    def tensor(self, node: onnx.NodeProto, index: int) -> onnx.TensorProto | None:
        """The constant a node reads at input ``index``, if it reads one there."""
        return self.constants.get(node.input[index]) if len(node.input) > index and node.input[index] else None


@dataclass(frozen=True)
class _Source:
    """Where a weight input comes from: a stored tensor, perhaps dequantized (and squared) on the way.

    ``decoder`` is the node that turns the codes into values: a DequantizeLinear, or the Mul of Cast(codes) by a
    constant scale (onnxq's weights decoded at load); ``scale``, ``zero_point`` and ``axis``/``block`` are what it reads.
    """

    codes: onnx.TensorProto
    decoder: onnx.NodeProto | None
    sqrt: bool
    chain: tuple[onnx.NodeProto, ...]
    scale: onnx.TensorProto | None = None
    zero_point: onnx.TensorProto | None = None
    axis: int | None = None
    block: int | None = None


def _trace(name: str, scope: _Scope) -> _Source | None:
    """Follow a node input back to the constant it is computed from, through a decoder, y*|y| and layout ops."""
    sqrt, chain = False, []
    while name not in scope.constants:
        node = scope.producers.get(name)
        if node is None:
            return None
        if node.op_type == "DequantizeLinear":
            codes = scope.tensor(node, 0)
            widen = scope.producers.get(node.input[0])
            if codes is None and widen is not None and widen.op_type == "Cast":  # int4 codes widened to int8 at load
                codes = scope.tensor(widen, 0)
                chain.append(widen)
            if codes is None:
                return None
            return _Source(codes, node, sqrt, tuple(chain), scope.tensor(node, 1), scope.tensor(node, 2), int(attribute(node, "axis", 1)),
                           int(attribute(node, "block_size", 0)))
        if (decoded := _cast_times_scale(node, scope)) is not None:
            codes, cast, scale, block = decoded
            view = [d for d in scale.dims]
            axis = next((i for i, d in enumerate(view) if d > 1), None) if math.prod(view) > 1 else None
            return _Source(codes, node, sqrt, (*chain, cast), scale, None, axis, block)
        squared = _squared(node, scope)
        if squared is not None and not sqrt:
            sqrt, name = True, squared
            chain += [node, scope.producers[next(i for i in node.input if i != squared)]]
        elif node.op_type in _PASS_THROUGH and node.input:
            name = node.input[0]
            chain.append(node)
        else:
            return None
    return _Source(scope.constants[name], None, sqrt, tuple(chain))


def _cast_times_scale(node: onnx.NodeProto, scope: _Scope) -> tuple[onnx.TensorProto, onnx.NodeProto, onnx.TensorProto, int] | None:
    """For ``Mul(Cast(codes), scale)`` with integer constant codes and a float constant scale: (codes, the Cast, scale, 0).

    4-bit codes stored as uint8 halves (onnxq/rewrite/qdq.py) count as the int4 tensor they unpack to, the unpacking's
    last node in the Cast's place. Scales per block of inputs (onnxq's --block-size): (channel, block, 1) times codes
    (channel, block, input), or, for rows that end in a shorter block, through an Expand over the block (whose shape's
    last element is the block size), a Reshape and a Slice; from float16 through a Cast.
    """
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    for value, scale_name in (node.input, reversed(node.input)):
        cast = scope.producers.get(value)
        scale, block = _block_scale(scale_name, scope)
        if cast is None or scale is None or scale.data_type not in _FLOAT_TYPES:
            continue
        codes = scope.tensor(cast, 0) if cast.op_type == "Cast" else _halves_codes(cast, scope)
        if codes is not None and codes.data_type in _INTEGER_CODES:
            view = list(scale.dims)
            if not block and len(codes.dims) == 3 and len(view) == 3 and view[0] > 1 and view[1] > 1 and view[2] == 1:
                block = int(codes.dims[2])  # (channel, block, input) codes: a scale per channel and block
            return codes, cast, scale, block
    return None


_SCALE_SPREAD = {"Cast", "Expand", "Reshape", "Slice"}


def _block_scale(name: str, scope: _Scope) -> tuple[onnx.TensorProto | None, int]:
    """The constant scale tensor ``name`` is computed from through Cast/Expand/Reshape/Slice, and the block an Expand gives."""
    block = 0
    while name not in scope.constants:
        node = scope.producers.get(name)
        if node is None or node.op_type not in _SCALE_SPREAD or not node.input:
            return None, 0
        if node.op_type == "Expand" and (shape := scope.tensor(node, 1)) is not None:
            block = int(numpy_helper.to_array(shape).reshape(-1)[-1])
        name = node.input[0]
    return scope.constants[name], block


def _halves_codes(signed: onnx.NodeProto, scope: _Scope) -> onnx.TensorProto | None:
    """The int4 codes that onnxq's unpacking of 4-bit halves ends in at ``signed``, as a tensor header (no values).

    The unpacking: ``Sub(Cast(Reshape(Concat(Mod(packed, 16), BitShift(packed, 4)) [Slice], shape)), offset)``; the
    header has the codes' shape and the packed bytes' name, whose place it takes.
    """
    cast = scope.producers.get(signed.input[0]) if signed.op_type == "Sub" and signed.input else None
    reshape = scope.producers.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
    shape = scope.tensor(reshape, 1) if reshape is not None and reshape.op_type == "Reshape" else None
    halves = scope.producers.get(reshape.input[0]) if shape is not None else None
    if halves is not None and halves.op_type == "Slice":
        halves = scope.producers.get(halves.input[0])
    if halves is None or halves.op_type != "Concat" or len(halves.input) != 2:
        return None
    shift = scope.producers.get(halves.input[1])
    packed = scope.tensor(shift, 0) if shift is not None and shift.op_type == "BitShift" else None
    if packed is None or packed.data_type != onnx.TensorProto.UINT8:
        return None
    dims = [int(d) for d in numpy_helper.to_array(shape)]
    return onnx.TensorProto(name=packed.name, data_type=onnx.TensorProto.INT4, dims=dims)


def _squared(node: onnx.NodeProto, scope: _Scope) -> str | None:
    """For ``Mul(y, Abs(y))`` (onnxq's sqrt mode), the name of y; else None."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    for y, other in (node.input, reversed(node.input)):
        abs_node = scope.producers.get(other)
        if abs_node is not None and abs_node.op_type == "Abs" and list(abs_node.input) == [y]:
            return y
    return None


def _activations(name: str, scope: _Scope) -> str:
    """How a node's data input is quantized: float, or '<dtype> static|dynamic' from the quantizer that feeds it."""
    node = scope.producers.get(name)
    if node is not None and node.op_type == "DequantizeLinear" and node.input[0] not in scope.constants:
        node = scope.producers.get(node.input[0])
        if node is None:
            return "quantized input"
    if node is None or node.op_type not in _QUANTIZERS:
        return "float"
    if node.op_type != "QuantizeLinear":
        return "uint8 dynamic"
    zero_point = scope.tensor(node, 2)
    dtype = dtype_name(zero_point.data_type) if zero_point is not None else dtype_name(int(attribute(node, "output_dtype", 0)) or 2)
    return f"{dtype} {'static' if scope.tensor(node, 1) is not None else 'dynamic'}"


def _granularity(scale: onnx.TensorProto | None, axis: int | None, block: int | None) -> tuple[str | None, int | None, int | None]:
    """Granularity, axis and block size of a weight from its scale (or zero point) tensor."""
    if scale is None:
        return None, None, None
    if block:
        return "block", axis, block
    if math.prod(scale.dims) <= 1:
        return "tensor", None, None
    return "channel", axis, None


def _scale_bytes(*tensors: onnx.TensorProto | None) -> tuple[int, tuple[str, ...]]:
    present = [t for t in tensors if t is not None]
    return sum(stored_bytes(t) for t in present), tuple(t.name for t in present)


def _float_op(node: onnx.NodeProto, scope: _Scope, slots: tuple[int, ...]) -> tuple[WeightedNode, _Source] | None:
    """Conv, Gemm, MatMul and other float ops: float weights, or weights decoded from codes (DequantizeLinear, Cast and Mul)."""
    for index in slots:
        source = _trace(node.input[index], scope) if len(node.input) > index and node.input[index] else None
        if source is not None:
            break
    else:
        return None
    data = next((node.input[i] for i in range(len(node.input)) if i != index and node.input[i]), "")
    return _from_source(node, source, _activations(data, scope) if data else "float", scope), source


def _from_source(node: onnx.NodeProto, source: _Source, activations: str, scope: _Scope) -> WeightedNode:
    codes = source.codes
    granularity, axis, block = _granularity(source.scale, source.axis, source.block)
    if source.decoder is not None and granularity is None:
        granularity = "computed scale"
    scale_bytes, scales = _scale_bytes(source.scale, source.zero_point)
    return _node(node, codes, dtype_name(codes.data_type), dtype_bits(codes.data_type), granularity, source.sqrt, activations,
                 scale_bytes, scales, axis, block)


def _node(node: onnx.NodeProto, codes: onnx.TensorProto, fmt: str, bits: int, granularity: str | None, sqrt: bool, activations: str,
          scale_bytes: int, scales: tuple[str, ...], axis: int | None = None, block: int | None = None) -> WeightedNode:
    return WeightedNode(node.name, node.op_type, node.domain, codes.name, tuple(codes.dims), fmt, bits, granularity, sqrt, activations,
                        stored_bytes(codes), scale_bytes, axis, block, scales)


def _qlinear(node: onnx.NodeProto, scope: _Scope) -> WeightedNode | None:
    """QLinearConv, QLinearMatMul, QGemm: inputs x, x_scale, x_zp, w, w_scale, w_zp, ..."""
    codes = scope.tensor(node, 3)
    if codes is None:
        return None
    scale, zero_point, x_zp = scope.tensor(node, 4), scope.tensor(node, 5), scope.tensor(node, 2)
    dtype = dtype_name(x_zp.data_type) if x_zp is not None else "uint8"
    activations = f"{dtype} {'static' if scope.tensor(node, 1) is not None else 'dynamic'}"
    granularity, axis, _ = _granularity(scale, 0 if node.op_type == "QLinearConv" else None, None)
    fmt, bits = dtype_name(codes.data_type), dtype_bits(codes.data_type)
    return _node(node, codes, fmt, bits, granularity, False, activations, *_scale_bytes(scale, zero_point), axis)


def _integer(node: onnx.NodeProto, scope: _Scope) -> WeightedNode | None:
    """ConvInteger, MatMulInteger: inputs x, w, x_zp, w_zp; the scales are applied by later nodes."""
    codes = scope.tensor(node, 1)
    if codes is None:
        return None
    zero_point = scope.tensor(node, 3)
    source = scope.producers.get(node.input[0])
    if source is not None and source.op_type in _QUANTIZERS:
        activations = _activations(node.input[0], scope)
    else:
        x_zp = scope.tensor(node, 2)
        activations = f"{dtype_name(x_zp.data_type)} static" if x_zp is not None else "integer input"
    granularity = _granularity(zero_point, None, None)[0] if zero_point is not None else "scale outside the op"
    return _node(node, codes, dtype_name(codes.data_type), dtype_bits(codes.data_type), granularity, False, activations, *_scale_bytes(zero_point))


def _matmul_nbits(node: onnx.NodeProto, scope: _Scope) -> WeightedNode | None:
    """MatMulNBits (onnxruntime's): unsigned b-bit codes in blocks along K, float activations."""
    codes = scope.tensor(node, 1)
    if codes is None:
        return None
    bits, block = int(attribute(node, "bits", 4)), int(attribute(node, "block_size", 0))
    return _node(node, codes, f"uint{bits}", bits, "block", False, "float", *_scale_bytes(scope.tensor(node, 2), scope.tensor(node, 3)), None, block)


def _gather_block_quantized(node: onnx.NodeProto, scope: _Scope) -> WeightedNode | None:
    """GatherBlockQuantized (onnxruntime's): a table of b-bit codes (uint8-packed or int4) in blocks along its rows."""
    codes = scope.tensor(node, 0)
    if codes is None:
        return None
    bits, block = int(attribute(node, "bits", 4)), int(attribute(node, "block_size", 128))
    fmt = f"uint{bits}" if codes.data_type == onnx.TensorProto.UINT8 else dtype_name(codes.data_type)
    return _node(node, codes, fmt, bits, "block", False, "float", *_scale_bytes(scope.tensor(node, 2), scope.tensor(node, 3)), None, block)


def _onnxq_conv(node: onnx.NodeProto, scope: _Scope) -> WeightedNode | None:
    """IntConv/PostConv (onnxq's): packed per-channel codes; activations quantized inside (or with given x_scale)."""
    codes = scope.tensor(node, 1)
    if codes is None:
        return None
    bits = int(attribute(node, "bits", 0))
    fmt = "POST" if node.op_type == "PostConv" else f"int{4 if bits <= 4 else 8}"
    activations = "uint8 static" if len(node.input) > 4 and node.input[4] else "uint8 dynamic"
    if has_pixel_steps(node):
        activations = "uint8 dynamic per row"
    return _node(node, codes, fmt, bits, "channel", False, activations, *_scale_bytes(scope.tensor(node, 2)), 0)


#: Ops whose weights are constants the op reads directly; each handler describes one node.
_HANDLERS: dict[tuple[str, str], Callable[[onnx.NodeProto, _Scope], WeightedNode | None]] = {
    ("", "QLinearConv"): _qlinear,
    ("", "QLinearMatMul"): _qlinear,
    ("com.microsoft", "QGemm"): _qlinear,
    ("", "ConvInteger"): _integer,
    ("", "MatMulInteger"): _integer,
    ("com.microsoft", "MatMulNBits"): _matmul_nbits,
    ("com.microsoft", "GatherBlockQuantized"): _gather_block_quantized,
    (DOMAIN, "IntConv"): _onnxq_conv,
    (DOMAIN, "PostConv"): _onnxq_conv,
}
#: Float ops and the inputs that may hold their weight (the first constant one is it).
_FLOAT_WEIGHT_SLOTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1, 0), "MatMul": (1, 0), "Gather": (0,), "Einsum": (1, 0)}


_FLOAT_TABLES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE})


def _weight_like(node: onnx.NodeProto, codes: onnx.TensorProto) -> bool:
    """Whether a float op's constant is a weight: any for Conv/Gemm/MatMul, a float table of rank 2+ for Gather (as the planner sees it)."""
    return node.op_type not in TABLE_OPS or (codes.data_type in _FLOAT_TABLES and len(codes.dims) >= 2)


def _weighted_nodes(graph: onnx.GraphProto) -> list[WeightedNode]:
    """Weighted nodes of the model, main graph first, without the nodes that only compute another's weight."""
    chained: set[str] = set()  # outputs of nodes that only compute a weight for another node (sqrt mode's Abs/Mul, layout ops)
    rows = _graph_nodes(graph, _Scope(graph), chained)
    return [row for row, output in rows if output not in chained]


def _graph_nodes(graph: onnx.GraphProto, scope: _Scope, chained: set[str]) -> list[tuple[WeightedNode, str]]:
    """Weighted nodes of a graph and, after them, of its subgraphs, each with its output.

    Adds to ``chained`` the outputs of nodes that only compute a weight (a body's node may read a chain of the graph around it).
    """
    found: list[tuple[WeightedNode, str]] = []
    for node in graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        handler = _HANDLERS.get((domain, node.op_type))
        if handler is not None:
            described = handler(node, scope)
            if described is not None:
                found.append((described, node.output[0]))
            continue
        if node.op_type in ("DequantizeLinear", "QuantizeLinear") and domain == "":
            continue
        slots = _FLOAT_WEIGHT_SLOTS.get(node.op_type, ()) if domain == "" else ()
        several = RECURRENT_WEIGHTS.get(node.op_type, ()) if domain == "" else ()
        if domain == CONTRIB_DOMAIN and node.op_type in CONTRIB_WEIGHTS:  # onnxruntime's Attention, EmbedLayerNormalization
            several = CONTRIB_WEIGHTS[node.op_type]
        # A recurrent layer (or a fused op with several weights) gets a row per weight (W, R). Other ops count as
        # weighted only when they read a dequantized constant (not e.g. Reshape's shape).
        for candidates in [(index,) for index in several] or [slots or tuple(range(len(node.input)))]:
            traced = _float_op(node, scope, candidates)
            if traced is not None and (traced[1].decoder is not None or ((slots or several) and _weight_like(node, traced[1].codes))):
                found.append((traced[0], node.output[0] or f"{node.name}:{candidates[0]}"))
                chained.update(n.output[0] for n in traced[1].chain)
    for node in graph.node:
        for sub in subgraphs(node):
            found += _graph_nodes(sub, _Scope(sub, scope), chained)
    return found


def _all_initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    return [t for g in all_graphs(graph) for t in g.initializer]


def _external_files(model: onnx.ModelProto, folder: Path | None) -> dict[str, int | None]:
    """External-data files the model refers to, with their sizes (None when missing)."""
    locations = sorted({e.value for t in _all_initializers(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL
                        for e in t.external_data if e.key == "location"})
    if folder is None:
        return dict.fromkeys(locations)
    return {loc: (folder / loc).stat().st_size if (folder / loc).is_file() else None for loc in locations}


def inspect_model(source: str | os.PathLike[str] | onnx.ModelProto) -> Inventory:
    """Describe the weights of a model file (read without its external data) or of a ModelProto (not modified).

    Unnamed nodes are named as the quantizer names them (onnxq.model.prepare.name_nodes), so both say the same names.
    """
    if isinstance(source, onnx.ModelProto):
        model, path = onnx.ModelProto(), None
        model.CopyFrom(source)
    else:
        path = Path(source)
        model = read_model_file(path)
    name_nodes(model.graph)
    external = _external_files(model, path.parent if path else None)
    file_bytes = path.stat().st_size if path else model.ByteSize()
    opsets = {("" if imp.domain == "ai.onnx" else imp.domain): imp.version for imp in model.opset_import}
    return Inventory(
        path=os.fspath(path) if path else None,
        file_bytes=file_bytes + sum(size or 0 for size in external.values()),
        external_files=external,
        opsets={("ai.onnx" if d == "" else d): v for d, v in sorted(opsets.items())},
        nodes=_weighted_nodes(model.graph),
        initializer_bytes=sum(stored_bytes(t) for t in _all_initializers(model.graph)),
    )
