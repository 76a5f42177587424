"""Rewrite Conv nodes to onnxq's integer ops (IntConv for uniform codes, PostConv for POST codes).

The ops take the float input, quantize it to uint8 inside, and run the convolution on
integer weight codes stored packed per output channel (two 4-bit codes a byte for 2-4 bits,
one byte each above). They need onnxq's op library at run time.

onnx's shape inference knows nothing of the ops (a custom domain registers no schema with it), so
the rewrite declares each op output's type and shape in the graph's value_info: the Conv output's
inferred shape where the float model had one, else computed here from the input's shape, so that
tools reading the model, and onnx's inference of the layers after the ops, see shapes.

Gemm and MatMul with a constant 2-D weight run through the same ops as 1x1 convolutions over the rows of
their input (onnxq/rewrite_gemm.py says how, and when they stay QDQ); op_choice gives, per weight, the op
or the reason it stays QDQ.

onnxruntime fuses a float Conv with the Relu or Clip after it, but cannot fuse them into a custom
op, so the rewrite does: an op whose output only a Relu or a Clip with constant bounds reads takes
the bounds as its clip_min / clip_max attributes and replaces it (fold_clipping).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.config import QuantizeConfig, WeightFormat
from onnxq.domain import DOMAIN
from onnxq.formats.packing import pack_int4
from onnxq.formats.uniform import storage_bits
from onnxq.graph import NameSource, attribute, constant_initializers, consumers, remove_unused_initializers, subgraphs, to_array, used_names
from onnxq.plan import RECURRENT_WEIGHTS, TABLE_OPS, WeightPlan
from onnxq.rewrite_gemm import GEMM_TYPES, gemm_nodes, unsupported, weight_is_rows
from onnxq.weights import QuantizedTensor

INT_CONV = "IntConv"
POST_CONV = "PostConv"
DOMAIN_VERSION = 1

#: Conv attributes the ops take over unchanged.
_CONV_ATTRIBUTES = ("strides", "pads", "dilations", "group")


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (M, K) as the ops' uint8 weight tensor: rows of ceil(K/2) nibble pairs (2-4 bits) or K bytes."""
    codes = np.asarray(codes, dtype=np.int8)
    if storage_bits(bits) == 8:
        return codes.view(np.uint8).copy()
    if codes.shape[1] % 2:  # pad each row to whole bytes; then row-major packing keeps rows apart
        codes = np.concatenate([codes, np.zeros((codes.shape[0], 1), np.int8)], axis=1)
    return np.frombuffer(pack_int4(codes), dtype=np.uint8).reshape(codes.shape[0], -1).copy()


def convertible(node: onnx.NodeProto, weight_rank: int) -> bool:
    """Whether a Conv node can run as IntConv/PostConv: 2-D, explicit padding."""
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return node.op_type == "Conv" and node.domain in ("", "ai.onnx") and weight_rank == 4 and auto_pad in ("NOTSET", "VALID")


@dataclass(frozen=True)
class OpTargets:
    """What the op choice reads off a graph: its nodes by name, the rank of each node's first input where known, its constants."""

    nodes: dict[str, onnx.NodeProto]
    ranks: dict[str, int]
    consts: dict[str, onnx.TensorProto]

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> OpTargets:
        """The targets of ``graph`` as it is now (ranks from its declared shapes)."""
        return cls({node.name: node for node in graph.node}, input_ranks(graph), constant_initializers(graph))


def input_ranks(graph: onnx.GraphProto) -> dict[str, int]:
    """The rank of each node's first input, by node name, where the graph declares its shape."""
    shapes = _known_shapes(graph)
    return {node.name: len(shapes[node.input[0]]) for node in graph.node if node.input and node.input[0] in shapes}


@dataclass(frozen=True)
class OpChoice:
    """The op a weight's readers become (None: they stay QDQ), and why not when the format asked for an op."""

    op_type: str | None
    reason: str = ""


def op_choice(plan: WeightPlan, targets: OpTargets, rank: int, config: QuantizeConfig) -> OpChoice:
    """IntConv/PostConv when the format asks for it and every reader can run as the op; else QDQ and the reason.

    A first or last layer at other bits than the rest (--first-last-bits) stays QDQ without a reason (that is the
    rule), except a Gemm/MatMul the ops can run, which runs as IntConv at those bits: onnxruntime dequantizes a
    weight-only QDQ weight on every run, which made a 512->1000 classifier 25-100x slower than float, where
    IntConv 8-bit runs it 1.7-2.6x faster than float (tools/bench_ops.py).
    """
    if config.format is WeightFormat.QDQ:
        return OpChoice(None)
    if plan.in_body:
        return OpChoice(None, "read inside a control-flow body (If, Loop, Scan); the ops replace main-graph nodes")
    if not plan.is_float32:
        return OpChoice(None, "a float16 layer; the ops take float32 inputs")
    if plan.first_or_last and plan.bits != config.bits:
        return OpChoice(INT_CONV if _gemm_runs_as_op(plan, targets) else None)
    if config.format is WeightFormat.POST and plan.bits > 4:
        return OpChoice(None, f"POST takes 2-4 bits, this layer has {plan.bits}")
    readers = [targets.nodes[use.node] for use in plan.uses]
    if any(node.op_type in TABLE_OPS for node in readers):
        return OpChoice(None, "looked up by Gather (an embedding table); the ops run Conv, Gemm and MatMul")
    if (recurrent := next((node for node in readers if node.op_type in RECURRENT_WEIGHTS), None)) is not None:
        return OpChoice(None, f"a recurrent layer ({recurrent.op_type}); the ops run Conv, Gemm and MatMul")
    kinds = {node.op_type in GEMM_TYPES for node in readers}
    if len(kinds) > 1:
        return OpChoice(None, "weight shared by a Conv and a Gemm/MatMul")
    if kinds == {True}:
        if (reason := _gemm_reason(plan, readers, targets)) is not None:
            return OpChoice(None, reason)
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


def _gemm_runs_as_op(plan: WeightPlan, targets: OpTargets) -> bool:
    """Whether every reader of the plan's weight is a Gemm/MatMul the ops can run."""
    readers = [targets.nodes[use.node] for use in plan.uses]
    return bool(readers) and all(node.op_type in GEMM_TYPES for node in readers) and _gemm_reason(plan, readers, targets) is None


def custom_op_for(plan: WeightPlan, targets: OpTargets, rank: int, config: QuantizeConfig) -> str | None:
    """IntConv/PostConv when the format asks for it and every reader can run as the op; else None (QDQ)."""
    return op_choice(plan, targets, rank, config).op_type


def conv_to_op(node: onnx.NodeProto, packed: str, scale: str, op_type: str, bits: int, kernel_shape: tuple[int, int]) -> onnx.NodeProto:
    """The IntConv/PostConv node that replaces Conv ``node`` (same input, bias and output)."""
    inputs = [node.input[0], packed, scale]
    if len(node.input) > 2 and node.input[2]:
        inputs.append(node.input[2])
    attrs = {name: attribute(node, name) for name in _CONV_ATTRIBUTES if attribute(node, name) is not None}
    return helper.make_node(op_type, inputs, list(node.output), name=node.name, domain=DOMAIN, bits=bits, kernel_shape=list(kernel_shape), **attrs)


def replace_convs(graph: onnx.GraphProto, quantized: dict[str, tuple[QuantizedTensor, str]], ranks: Mapping[str, int] | None = None) -> None:
    """Replace every Conv, Gemm or MatMul reading one of the named weights by the op given with it; drop the float weights.

    ``ranks``: the rank of each MatMul's input by node name (input_ranks, taken before activation QDQ hid the
    shapes); else read from the graph. Every op output gets a value_info entry (see the module docstring).
    """
    names = NameSource(graph)
    tensors: dict[str, tuple[str, str, np.ndarray]] = {}
    weight_readers = {node.input[1]: node for node in graph.node if len(node.input) > 1 and node.input[1] in quantized}
    for weight, (q, _) in quantized.items():
        reader = weight_readers.get(weight)
        rows = q.codes if reader is None or reader.op_type not in GEMM_TYPES or weight_is_rows(reader) else q.codes.T
        out_channels = rows.shape[0]
        packed = pack_rows(rows.reshape(out_channels, -1), q.bits)
        scale = np.broadcast_to(np.asarray(q.scale, dtype=np.float32), (out_channels,)).copy()
        packed_name, scale_name = names.fresh(f"{weight}_packed"), names.fresh(f"{weight}_scale")
        graph.initializer.extend([numpy_helper.from_array(packed, packed_name), numpy_helper.from_array(scale, scale_name)])
        tensors[weight] = (packed_name, scale_name, scale)
    shapes = _known_shapes(graph)
    ranks = dict(ranks) if ranks is not None else input_ranks(graph)
    consts = constant_initializers(graph)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        weight = node.input[1] if len(node.input) > 1 else ""
        if weight not in quantized or node.op_type not in ("Conv", *GEMM_TYPES) or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        q, op_type = quantized[weight]
        packed_name, scale_name, scale = tensors[weight]
        if node.op_type in GEMM_TYPES:
            rank = 2 if node.op_type == "Gemm" else ranks[node.name]
            new_nodes, inits, op_out = gemm_nodes(node, packed_name, (scale_name, scale), op_type, q.bits, rank, consts, names)
            graph.initializer.extend(inits)
            nodes.extend(new_nodes)
            _declare(graph, op_out, _gemm_image_shape(shapes.get(node.input[0]), len(scale)))
            continue
        out_shape = shapes.get(node.output[0]) or _conv_output_shape(node, shapes.get(node.input[0]), q.codes.shape)
        new = conv_to_op(node, packed_name, scale_name, op_type, q.bits, q.codes.shape[2:])
        nodes.append(new)
        if out_shape is not None:
            shapes[node.output[0]] = out_shape
        _declare(graph, node.output[0], out_shape)
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [t for t in graph.initializer if t.name not in quantized]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    remove_unused_initializers(graph)
    fold_clipping(graph)


def _gemm_image_shape(x_shape: Shape | None, m: int) -> Shape:
    """The op's output (1, M, rows, 1) for a Gemm/MatMul input of ``x_shape``: rows the product of its leading dims where known."""
    lead = x_shape[:-1] if x_shape else [None]
    rows = int(np.prod(lead)) if all(isinstance(d, int) for d in lead) else None
    return [1, m, rows, 1]


def fold_clipping(graph: onnx.GraphProto) -> int:
    """Fold into each IntConv/PostConv the Relu or Clip that alone reads its output; returns how many.

    ``op -> y -> Relu -> r`` becomes ``op(clip_min=0) -> r`` (Clip: its constant bounds, opset 11+ inputs or the
    attributes before; an absent bound stays absent), so readers of r are unchanged. The op clips after its
    epilogue exactly as Relu/Clip would (int_conv.h). Left alone: an op output that is a graph output or has
    other readers (a subgraph's included), a Clip whose bounds are not constant scalars, or are NaN or crossed
    (ONNX's Clip then gives max; the op rejects them), and an op that has bounds already.
    """
    consts = constant_initializers(graph)
    readers = consumers(graph)
    outer = _subgraph_reads(graph)
    outputs = {o.name for o in graph.output}
    drop: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type not in (INT_CONV, POST_CONV) or attribute(node, "clip_min") is not None:
            continue
        if attribute(node, "clip_max") is not None:
            continue
        y = node.output[0]
        users = readers.get(y, [])
        if y in outputs or y in outer or len(users) != 1 or users[0].domain not in ("", "ai.onnx"):
            continue
        bounds = _activation_bounds(users[0], consts)
        if bounds is None:
            continue
        activation = users[0]
        for name, value in zip(("clip_min", "clip_max"), bounds, strict=True):
            if value is not None:
                node.attribute.append(helper.make_attribute(name, value))
        node.output[0] = activation.output[0]
        _move_declaration(graph, y, activation.output[0])
        drop.append(activation)
    for node in drop:
        graph.node.remove(node)
    return len(drop)


def _activation_bounds(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> tuple[float | None, float | None] | None:
    """(min, max) of a Relu or a Clip with constant scalar bounds (None: that bound absent); None for anything else."""
    if node.op_type == "Relu" and len(node.input) == 1:
        return 0.0, None
    if node.op_type != "Clip" or not node.input:
        return None
    bounds: list[float | None] = [None, None]
    for index in (1, 2):  # opset 11+: inputs min, max (optional)
        name = node.input[index] if len(node.input) > index else ""
        if not name:
            continue
        if name not in consts:
            return None
        value = to_array(consts[name])
        if value.size != 1 or value.dtype != np.float32:
            return None
        bounds[index - 1] = float(value.reshape(-1)[0])
    for attr in node.attribute:  # opset < 11: attributes min, max
        if attr.name in ("min", "max"):
            bounds[0 if attr.name == "min" else 1] = float(np.float32(attr.f))
    lo, hi = bounds
    if any(b is not None and np.isnan(b) for b in bounds) or lo is not None and hi is not None and lo > hi:
        return None
    return lo, hi


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names the graph's subgraphs (If/Loop/Scan bodies, nested ones included) read or return, outer ones among them."""
    return {name for node in graph.node for body in subgraphs(node) for name in used_names(body)}


def _move_declaration(graph: onnx.GraphProto, old: str, new: str) -> None:
    """The op's output is now ``new``: give it ``old``'s declared shape where it has none, and drop ``old``'s entry."""
    infos = {info.name: info for info in graph.value_info}
    declared = infos.get(old)
    if declared is None:
        return
    if new not in infos and new not in {o.name for o in graph.output}:
        declared.name = new
        return
    graph.value_info.remove(declared)


Dim = int | str | None  # a dimension: known, symbolic, or unknown
Shape = list[Dim]


def _known_shapes(graph: onnx.GraphProto) -> dict[str, Shape]:
    """The shapes the graph declares for its float tensors (inputs, outputs, value_info), by name."""
    shapes = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type == onnx.TensorProto.FLOAT and tensor_type.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
    return shapes


def _conv_output_shape(node: onnx.NodeProto, x_shape: Shape | None, weight_shape: tuple[int, ...]) -> Shape | None:
    """Conv's output shape (N, M, OH, OW) from its input's shape and attributes (explicit or VALID padding)."""
    if x_shape is None or len(x_shape) != 4:
        return None
    pads = attribute(node, "pads", [0, 0, 0, 0])
    strides, dilations = attribute(node, "strides", [1, 1]), attribute(node, "dilations", [1, 1])
    shape: Shape = [x_shape[0], weight_shape[0]]
    for axis in range(2):
        size = x_shape[2 + axis]
        extent = dilations[axis] * (weight_shape[2 + axis] - 1) + 1
        shape.append((size + pads[axis] + pads[axis + 2] - extent) // strides[axis] + 1 if isinstance(size, int) else None)
    return shape


def _declare(graph: onnx.GraphProto, name: str, shape: Shape | None) -> None:
    """Declare tensor ``name`` as float32 of ``shape``: a new value_info entry, or the shape of an entry that has none."""
    for info in (*graph.value_info, *graph.output):
        if info.name == name:
            if shape is not None and not info.type.tensor_type.HasField("shape"):
                info.CopyFrom(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
            return
    graph.value_info.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))


def declare_domain(model: onnx.ModelProto) -> None:
    """Add onnxq's op domain to the model's opset imports (once)."""
    if not any(imp.domain == DOMAIN for imp in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))


def take_input_quantization(graph: onnx.GraphProto) -> int:
    """Let each IntConv/PostConv quantize its input with the uint8 step of the quantization in front of it.

    A fixed pair ``X -> QuantizeLinear(s, z) -> DequantizeLinear(s, z) -> op`` becomes ``X -> op(x_scale=s,
    x_zero_point=z)``; ASQ's per-sample chain ``X -> Div(r) -> QuantizeLinear(1, z) -> DequantizeLinear(1, z) ->
    Mul(r) -> op``, r = Reshape(steps) with one step per sample (rewrite_activations), becomes ``X -> op(x_scale=steps,
    x_zero_point=z)``; a Gemm/MatMul op's layout in front of it (rewrite_gemm) reads X instead of the pair and the op
    takes (s, z). The op's own quantization is the same formula, so the codes are the same and the integer path
    no longer goes through float. The pair or chain stays while others read it. Returns how many ops took a step.
    """
    consts = constant_initializers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    taken = 0
    chains: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type not in (INT_CONV, POST_CONV) or len(node.input) > 4:
            continue
        dq = producer.get(node.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and len(dq.input) >= 3 and _uint8_scalar_pair(dq, consts):
            x, x_scale, x_zero_point = q.input[0], dq.input[1], dq.input[2]
        elif (layout := _gemm_layout(node.input[0], producer, consts)) is not None:
            first, (x, x_scale, x_zero_point) = layout
            first.input[0] = x  # the layout reads X; the op keeps its input and takes the step
            node.input.extend([""] * (4 - len(node.input)) + [x_scale, x_zero_point])
            taken += 1
            continue
        elif (chain := _per_sample_chain(node.input[0], producer, consts)) is not None:
            x, x_scale, x_zero_point = chain[0]
            chains.extend(chain[1])
        else:
            continue
        bias = node.input[3] if len(node.input) > 3 else ""
        del node.input[3:]
        node.input[0] = x
        node.input.extend([bias, x_scale, x_zero_point])
        taken += 1
    _drop_unread(graph, chains)
    _drop_unread_pairs(graph)
    return taken


def _gemm_layout(
    name: str, producer: dict[str, onnx.NodeProto], consts: dict[str, onnx.TensorProto]
) -> tuple[onnx.NodeProto, tuple[str, str, str]] | None:
    """The first node of a Gemm/MatMul op's input layout (rewrite_gemm) and (X, s, z) when a fixed pair Q/DQ(s, z) feeds it.

    ``X -> Q(s, z) -> DQ(s, z) -> Transpose [-> Flatten] -> Unsqueeze -> op``: one step for the whole tensor, so quantizing
    commutes with the layout, and the op can quantize X's transposed values with (s, z) and get the same codes.
    """
    node = producer.get(name)
    if not _is(node, "Unsqueeze"):
        return None
    while node is not None and (_is(node, "Unsqueeze") or _is(node, "Flatten")):
        node = producer.get(node.input[0])
    if not _is(node, "Transpose"):
        return None
    dq = producer.get(node.input[0])
    q = producer.get(dq.input[0]) if _is(dq, "DequantizeLinear") else None
    if not _is(q, "QuantizeLinear") or len(dq.input) < 3 or not _uint8_scalar_pair(dq, consts):
        return None
    return node, (q.input[0], dq.input[1], dq.input[2])


def _per_sample_chain(
    name: str, producer: dict[str, onnx.NodeProto], consts: dict[str, onnx.TensorProto]
) -> tuple[tuple[str, str, str], list[onnx.NodeProto]] | None:
    """(X, steps, zero point) and the chain's nodes, Mul first, when ``name`` is the output of ASQ's per-sample chain.

    The chain is ``Mul(DequantizeLinear(QuantizeLinear(Div(X, r), 1, z), 1, z), r)`` with scalar unit scales, one
    uint8 scalar zero point z, and r = Reshape(steps, [0 or -1, 1 or -1, 1, 1]): one step per sample, broadcast over
    the channels (the op checks that steps has one element per sample, or one).
    """
    mul = producer.get(name)
    if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    unit, r = mul.input if _is(producer.get(mul.input[0]), "DequantizeLinear") else reversed(mul.input)
    dq = producer.get(unit)
    if not _is(dq, "DequantizeLinear"):
        return None
    q = producer.get(dq.input[0])
    div = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
    reshape = producer.get(r)
    if div is None or div.op_type != "Div" or div.input[1] != r or reshape is None or reshape.op_type != "Reshape":
        return None
    if len(dq.input) < 3 or len(q.input) < 3 or not _uint8_scalar_pair(dq, consts) or not _uint8_scalar_pair(q, consts):
        return None
    if not all(to_array(consts[p.input[1]]) == 1 for p in (q, dq)) or to_array(consts[q.input[2]]) != to_array(consts[dq.input[2]]):
        return None
    shape = consts.get(reshape.input[1]) if len(reshape.input) > 1 else None
    target = [int(v) for v in to_array(shape).reshape(-1)] if shape is not None else []
    if len(target) != 4 or target[0] not in (0, -1) or target[1] not in (1, -1) or target[2:] != [1, 1] or target[:2] == [-1, -1]:
        return None
    return (div.input[0], reshape.input[0], dq.input[2]), [mul, dq, q, div, reshape]


def _is(node: onnx.NodeProto | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _drop_unread(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Remove those of ``nodes`` (readers before the nodes they read) whose outputs nobody reads (subgraphs included)."""
    readers = Counter(name for node in graph.node for name in node.input)
    fixed = {o.name for o in graph.output} | _subgraph_reads(graph)
    removed: set[int] = set()
    for node in nodes:
        if id(node) in removed or any(readers[out] or out in fixed for out in node.output):
            continue
        graph.node.remove(node)
        removed.add(id(node))
        readers.subtract(node.input)


def _uint8_scalar_pair(dq: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> bool:
    """Whether a DequantizeLinear has a constant scalar scale and a uint8 scalar zero point."""
    scale, zero = consts.get(dq.input[1]), consts.get(dq.input[2])
    return (
        scale is not None and zero is not None and not scale.dims and not zero.dims
        and scale.data_type == onnx.TensorProto.FLOAT and zero.data_type == onnx.TensorProto.UINT8
    )


def _drop_unread_pairs(graph: onnx.GraphProto) -> None:
    """Remove DequantizeLinear nodes nobody reads, then QuantizeLinear nodes nobody reads."""
    _drop_unread(graph, [n for op_type in ("DequantizeLinear", "QuantizeLinear") for n in graph.node if n.op_type == op_type])
    remove_unused_initializers(graph)
