"""Weight-only MatMuls as onnxruntime's MatMulNBits (domain com.microsoft, in every onnxruntime build), 8 and 2-4 bits.

onnxruntime dequantizes an 8-bit weight-only DequantizeLinear on every run (0.01-0.04x float on classifiers,
tools/bench_ops.py; the first/last layers keep 8 bits by default), and a 4-bit one too when its codes are sqrt codes
(Abs and Mul after it); it fuses plain 4-bit ones into its own MatMulNBits, but with the multiplication it picks
(``accuracy_level`` 4 unless a session option says otherwise). Written as MatMulNBits here, the layer runs at about
float's speed or faster, with the accuracy level onnxq chose. The codes are onnxq's own (per channel or per tensor,
REQuant's range, plain grid): each output column's codes + 2^(bits-1) (the op's default zero point: 128, or 8 for 4-bit
storage, which 2 and 3-bit codes use too) in blocks along K, two 4-bit codes a byte, the first in the low nibble; the
column's scale repeated for each block; the last block padded with zero codes. ``accuracy_level`` 4 multiplies in int8
(the input quantized per block), the level onnxruntime gives the 4-bit MatMuls it fuses itself; 0 dequantizes the
weight and multiplies in float, which ran faster for long inputs on some CPUs (onnxq/analysis/speed.py measures both).

Written only in the qdq format without quantized activations (there a QDQ MatMul runs as onnxruntime's integer
QLinearMatMul), for a 2-D float32 weight read as x @ W by main-graph MatMuls or Gemms (transA 0; alpha goes into the
scales, a constant C times beta into an Add after the op), K of 16 at least.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.model.graph import NameSource, attribute, constant_initializers, consumers, finish_node_rewrite, to_array
from onnxq.native.domain import MATMUL_NBITS, ORT_DOMAIN
from onnxq.numerics.uniform import storage_bits
from onnxq.numerics.weights import QuantizedTensor

#: The op's smallest block and the block onnxq writes when K allows (powers of two; 128 ran fastest at K 384-1536).
MIN_BLOCK = 16
BLOCK = 128
#: Accuracy levels of the op that onnxq writes: int8 products of the input quantized per block (onnxruntime's level for
#: the 4-bit MatMuls it fuses, and onnxq's default), or the weight dequantized and float products.
INT8_LEVEL = 4
FLOAT_LEVEL = 0


def block_size(k: int) -> int:
    """The block along K: BLOCK, or the largest power of two not over K for shorter rows (MIN_BLOCK at least)."""
    return max(MIN_BLOCK, min(BLOCK, 1 << (k.bit_length() - 1)))


def nbits_weight(q: QuantizedTensor, rows_first: bool = False, factor: float = 1.0) -> tuple[np.ndarray, np.ndarray, int]:
    """(packed codes uint8 [N, blocks, block * bits / 8], scales float32 [N * blocks], block) of a weight's codes ``q``.

    The weight is (K, N), or (N, K) when ``rows_first`` (Gemm's transB); ``factor`` multiplies the scales (Gemm's alpha).
    Codes with a scale per block of inputs (``q.block_size``, its channel axis the output's) keep their blocks and scales.
    """
    bits = storage_bits(q.bits)
    zero_point = 1 << (bits - 1)
    rows = q.codes if rows_first else q.codes.T
    n, k = rows.shape
    block = block_size(k) if q.block_size is None else q.block_size  # onnxq's blocks are the op's (powers of two, 16 up)
    blocks = -(-k // block)
    columns = np.full((n, blocks * block), zero_point, dtype=np.uint8)  # the padding decodes to zero
    columns[:, :k] = (rows.astype(np.int16) + zero_point).astype(np.uint8)
    if bits == 4:
        columns = columns[:, 0::2] | (columns[:, 1::2] << 4)
    if q.block_size is not None:
        return columns.reshape(n, blocks, -1), (np.asarray(q.scale, dtype=np.float64) * factor).reshape(-1).astype(np.float32), block
    scale = np.broadcast_to(np.asarray(q.scale, dtype=np.float64).reshape(-1) * factor, (n,))
    return columns.reshape(n, blocks, -1), np.repeat(scale, blocks).astype(np.float32), block


def replace_matmuls(model: onnx.ModelProto, weights: dict[str, QuantizedTensor]) -> int:
    """Turn every MatMul reading one of ``weights`` (x @ W) into MatMulNBits on its codes; returns how many."""
    graph = model.graph
    names = NameSource(graph)
    readers = consumers(graph)
    replaced = 0
    consts = constant_initializers(graph)
    after: dict[int, list[onnx.NodeProto]] = {}  # a Gemm's bias, added after its MatMulNBits
    for tensor, q in weights.items():
        assert not q.sqrt and q.codes.ndim == 2, tensor
        written: dict[tuple[bool, float], tuple[str, str, int]] = {}
        for node in readers.get(tensor, []):
            assert node.op_type in ("MatMul", "Gemm") and node.input[1] == tensor and not attribute(node, "transA", 0), node.name
            rows_first, alpha = bool(attribute(node, "transB", 0)), float(attribute(node, "alpha", 1.0))
            if (rows_first, alpha) not in written:  # readers that see the weight alike share one copy of the codes
                codes, scales, block = nbits_weight(q, rows_first, alpha)
                codes_name, scales_name = names.fresh(f"{tensor}_nbits"), names.fresh(f"{tensor}_nbits_scale")
                graph.initializer.extend([numpy_helper.from_array(codes, codes_name), numpy_helper.from_array(scales, scales_name)])
                written[(rows_first, alpha)] = (codes_name, scales_name, block)
            codes_name, scales_name, block = written[(rows_first, alpha)]
            bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
            if bias:
                after[id(node)] = [_bias_add(graph, node, bias, float(attribute(node, "beta", 1.0)), consts, names)]
            n, k = q.codes.shape if rows_first else q.codes.shape[::-1]
            node.op_type, node.domain = MATMUL_NBITS, ORT_DOMAIN
            del node.input[1:]
            node.input.extend([codes_name, scales_name])
            del node.attribute[:]
            node.attribute.extend([helper.make_attribute("K", k), helper.make_attribute("N", n), helper.make_attribute("bits", storage_bits(q.bits)),
                                   helper.make_attribute("block_size", block), helper.make_attribute("accuracy_level", INT8_LEVEL)])
            replaced += 1
    finish_node_rewrite(model, after, ORT_DOMAIN if replaced else None)
    return replaced


def _bias_add(graph: onnx.GraphProto, node: onnx.NodeProto, bias: str, beta: float, consts: dict[str, onnx.TensorProto],
              names: NameSource) -> onnx.NodeProto:
    """The Add of a Gemm's constant bias C (times ``beta``) after it, writing the Gemm's output name."""
    output = node.output[0]
    node.output[0] = names.fresh(f"{output}_before_bias")
    if beta != 1.0:
        scaled = names.fresh(f"{bias}_beta")
        graph.initializer.append(numpy_helper.from_array((to_array(consts[bias]).astype(np.float64) * beta).astype(np.float32), scaled))
        bias = scaled
    return helper.make_node("Add", [node.output[0], bias], [output], name=names.fresh(f"{node.name}_bias"))
