"""Rewrite Conv nodes to onnxq's integer ops (IntConv for uniform codes, PostConv for POST codes).

The ops take the float input, quantize it to uint8 inside, and run the convolution on
integer weight codes stored packed per output channel (two 4-bit codes a byte for 2-4 bits,
one byte each above). They need onnxq's op library at run time.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.domain import DOMAIN
from onnxq.formats.packing import pack_int4
from onnxq.formats.uniform import storage_bits
from onnxq.graph import NameSource, attribute
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


def conv_to_op(node: onnx.NodeProto, packed: str, scale: str, op_type: str, bits: int, kernel_shape: tuple[int, int]) -> onnx.NodeProto:
    """The IntConv/PostConv node that replaces Conv ``node`` (same input, bias and output)."""
    inputs = [node.input[0], packed, scale]
    if len(node.input) > 2 and node.input[2]:
        inputs.append(node.input[2])
    attrs = {name: attribute(node, name) for name in _CONV_ATTRIBUTES if attribute(node, name) is not None}
    return helper.make_node(op_type, inputs, list(node.output), name=node.name, domain=DOMAIN, bits=bits, kernel_shape=list(kernel_shape), **attrs)


def replace_convs(graph: onnx.GraphProto, quantized: dict[str, tuple[QuantizedTensor, str]]) -> None:
    """Replace every Conv reading one of the named weights by the op given with it; drop the float weights."""
    names = NameSource(graph)
    tensors: dict[str, tuple[str, str]] = {}
    for weight, (q, _) in quantized.items():
        out_channels = q.codes.shape[0]
        packed = pack_rows(q.codes.reshape(out_channels, -1), q.bits)
        scale = np.broadcast_to(np.asarray(q.scale, dtype=np.float32), (out_channels,)).copy()
        packed_name, scale_name = names.fresh(f"{weight}_packed"), names.fresh(f"{weight}_scale")
        graph.initializer.extend([numpy_helper.from_array(packed, packed_name), numpy_helper.from_array(scale, scale_name)])
        tensors[weight] = (packed_name, scale_name)
    for i, node in enumerate(graph.node):
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in quantized:
            q, op_type = quantized[node.input[1]]
            packed_name, scale_name = tensors[node.input[1]]
            graph.node[i].CopyFrom(conv_to_op(node, packed_name, scale_name, op_type, q.bits, q.codes.shape[2:]))
    keep = [t for t in graph.initializer if t.name not in quantized]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def declare_domain(model: onnx.ModelProto) -> None:
    """Add onnxq's op domain to the model's opset imports (once)."""
    if not any(imp.domain == DOMAIN for imp in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
