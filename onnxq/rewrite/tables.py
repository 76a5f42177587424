"""Embedding tables: Gathers from a quantized table become onnxruntime's GatherBlockQuantized.

A DequantizeLinear in front of a Gather dequantizes the whole table on every run (tens to thousands of times the
float lookup's time; tools/bench_tables.py measures it), so a quantized embedding would make the model slower the
bigger its vocabulary. GatherBlockQuantized (domain com.microsoft, in every onnxruntime build) looks the rows up from
the codes and dequantizes only those (close to the float lookup's time, the same tool). Each row is one block with its own scale; see
:func:`table_codes` for how the codes are stored.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.model.graph import NameSource, attribute, consumers, finish_node_rewrite
from onnxq.native.domain import LOOKUP_OP, ORT_DOMAIN
from onnxq.numerics.uniform import storage_bits
from onnxq.numerics.weights import QuantizedTensor
from onnxq.plan.handlers import TABLE_OPS
from onnxq.rewrite.qdq import integer_tensor

#: The op's smallest block; blocks are powers of two.
MIN_BLOCK = 16


def block_size(columns: int) -> int:
    """The op's block for one block per row: the smallest power of two that holds a row (16 at least)."""
    return max(MIN_BLOCK, 1 << (columns - 1).bit_length())


def table_codes(name: str, q: QuantizedTensor) -> tuple[onnx.TensorProto, int]:
    """The table's codes as the op reads them, and the op's ``bits``.

    8-bit codes: uint8, code + 128. 4-bit codes: uint8 pairs, code + 8, the even column in the low nibble (the op's
    default zero points are 128 and 8). A row of odd length cannot be split into pairs, so such tables keep int4
    storage, which onnxruntime reads several times slower (tools/bench_tables.py, its int4-storage column).
    """
    if storage_bits(q.bits) == 8:
        return numpy_helper.from_array((q.codes.astype(np.int16) + 128).astype(np.uint8), name), 8
    if q.codes.shape[1] % 2:
        return integer_tensor(name, q.codes, q.bits), 4
    offset = (q.codes + 8).astype(np.uint8)
    return numpy_helper.from_array(offset[:, 0::2] | (offset[:, 1::2] << 4), name), 4


def row_scales(q: QuantizedTensor, rows: int, dtype: np.dtype = np.float32) -> np.ndarray:
    """One scale per row in the table's float type, shape (rows, 1): per channel as quantized, per tensor repeated."""
    return np.broadcast_to(np.asarray(q.scale, dtype=dtype).reshape(-1, 1), (rows, 1)).copy()


def replace_tables(model: onnx.ModelProto, tables: dict[str, QuantizedTensor]) -> int:
    """Replace each Gather reading one of ``tables`` by the lookup op (then y * |y| in sqrt mode); returns how many."""
    graph = model.graph
    names = NameSource(graph)
    readers = consumers(graph)
    dtypes = {t.name: helper.tensor_dtype_to_np_dtype(t.data_type) for t in graph.initializer if t.name in tables}
    after: dict[int, list[onnx.NodeProto]] = {}  # nodes to insert after a replaced Gather
    replaced = 0
    for tensor, q in tables.items():
        codes, bits = table_codes(names.fresh(f"{tensor}_quantized"), q)
        scales = numpy_helper.from_array(row_scales(q, q.codes.shape[0], dtypes[tensor]), names.fresh(f"{tensor}_scale"))
        graph.initializer.extend([codes, scales])
        for node in readers.get(tensor, []):
            after[id(node)] = _to_lookup(node, codes.name, scales.name, bits, q.codes.shape[1], q.sqrt, names)
            replaced += 1
    finish_node_rewrite(model, after, ORT_DOMAIN if replaced else None)
    return replaced


def _to_lookup(node: onnx.NodeProto, codes: str, scales: str, bits: int, columns: int, sqrt: bool, names: NameSource) -> list[onnx.NodeProto]:
    """Turn one Gather into the lookup op in place; returns the nodes that square its output in sqrt mode."""
    assert node.op_type in TABLE_OPS and attribute(node, "axis", 0) in (0, -2)
    output = node.output[0]
    indices = node.input[1]
    node.op_type, node.domain = LOOKUP_OP, ORT_DOMAIN
    del node.input[:]
    node.input.extend([codes, indices, scales])
    del node.attribute[:]
    node.attribute.extend(
        [helper.make_attribute("gather_axis", 0), helper.make_attribute("quantize_axis", 1),
         helper.make_attribute("block_size", block_size(columns)), helper.make_attribute("bits", bits)]
    )
    if not sqrt:
        return []
    rooted, magnitude = names.fresh(f"{output}_rooted"), names.fresh(f"{output}_abs")
    node.output[0] = rooted
    return [
        helper.make_node("Abs", [rooted], [magnitude], name=names.fresh(f"{node.name}_Abs")),
        helper.make_node("Mul", [rooted, magnitude], [output], name=names.fresh(f"{node.name}_Square")),
    ]
