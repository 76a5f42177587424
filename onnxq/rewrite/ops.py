"""Rewrite Conv, Gemm and MatMul nodes to onnxq's integer ops (IntConv for uniform codes, PostConv for POST codes).

The ops take the float input, quantize it to uint8 inside, and run the convolution on
integer weight codes stored packed per output channel (two 4-bit codes a byte for 2-4 bits,
one byte each above). They need onnxq's op library at run time. Which weights run as the ops
is decided at plan time (onnxq/plan/ops.py).

onnx's shape inference knows nothing of the ops (a custom domain registers no schema with it), so
the rewrite declares each op output's type and shape in the graph's value_info: the Conv output's
inferred shape where the float model had one, else computed here from the input's shape, so that
tools reading the model, and onnx's inference of the layers after the ops, see shapes.

Gemm and MatMul with a constant 2-D weight run through the same ops as 1x1 convolutions over the rows of
their input (onnxq/rewrite/gemm.py says how). A Relu or Clip after an op is folded into it, and so is a
hard swish (onnxq/rewrite/fusions.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.model.graph import NameSource, Shape, attribute, constant_initializers, declared_shapes, import_domain, is_op, remove_unused_initializers
from onnxq.native.domain import DOMAIN, DOMAIN_VERSION
from onnxq.numerics.packing import pack_int4
from onnxq.numerics.uniform import storage_bits
from onnxq.numerics.weights import QuantizedTensor
from onnxq.plan.ops import input_ranks
from onnxq.rewrite.fusions import fold_clipping_into_ops, fold_hard_swish_into_ops
from onnxq.rewrite.gemm import GEMM_TYPES, gemm_nodes, weight_is_rows

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
    shapes = declared_shapes(graph)
    ranks = dict(ranks) if ranks is not None else input_ranks(graph)
    consts = constant_initializers(graph)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        weight = node.input[1] if len(node.input) > 1 else ""
        if weight not in quantized or not is_op(node, "Conv", *GEMM_TYPES):
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
    fold_clipping_into_ops(graph)
    fold_hard_swish_into_ops(graph)


def _gemm_image_shape(x_shape: Shape | None, m: int) -> Shape:
    """The op's output (1, M, rows, 1) for a Gemm/MatMul input of ``x_shape``: rows the product of its leading dims where known."""
    lead = x_shape[:-1] if x_shape else [None]
    rows = int(np.prod(lead)) if all(isinstance(d, int) for d in lead) else None
    return [1, m, rows, 1]


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
    import_domain(model, DOMAIN, DOMAIN_VERSION)


