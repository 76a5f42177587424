"""Rewrite a graph so quantized weights are stored as integers and dequantized in the graph.

For each quantized weight W the float initializer is replaced by integer codes (int8 or
packed int4) and a DequantizeLinear node (per-axis where per channel). In sqrt mode the
dequantized value y stands for sign(w)*sqrt(|w|), so the graph computes y*|y| after it.
Everything is standard ONNX; stock onnxruntime runs it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.model.graph import NameSource, remove_unused_initializers, rename_input
from onnxq.numerics.packing import pack_int4
from onnxq.numerics.uniform import storage_bits
from onnxq.numerics.weights import QuantizedTensor


def integer_tensor(name: str, codes: np.ndarray, bits: int) -> onnx.TensorProto:
    """An INT4 (packed) or INT8 initializer holding ``codes``."""
    if storage_bits(bits) == 4:
        tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.INT4, dims=codes.shape)
        tensor.raw_data = pack_int4(codes)
        return tensor
    return numpy_helper.from_array(codes.astype(np.int8), name)


def dequantize_nodes(
    weight: str, q: QuantizedTensor, names: NameSource, dtype: int = onnx.TensorProto.FLOAT
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto], str]:
    """Initializers and nodes that recompute ``weight`` from its codes; returns them and the output name.

    The scale has the weight's float type ``dtype``, which DequantizeLinear's output takes.
    """
    codes_name = names.fresh(f"{weight}_quantized")
    scale_name = names.fresh(f"{weight}_scale")
    scale = np.asarray(q.scale, dtype=helper.tensor_dtype_to_np_dtype(dtype))
    inits = [integer_tensor(codes_name, q.codes, q.bits), numpy_helper.from_array(scale, scale_name)]
    inputs = [codes_name, scale_name]
    if storage_bits(q.bits) == 8:  # onnxruntime fuses Gemm into QGemm only with an explicit zero point
        zero_name = names.fresh(f"{weight}_zero_point")
        inits.append(numpy_helper.from_array(np.zeros(np.shape(q.scale), dtype=np.int8), zero_name))
        inputs.append(zero_name)
    dq_out = names.fresh(f"{weight}_dequantized")
    axis = {} if q.axis is None else {"axis": q.axis}
    dq_name = names.fresh(f"{weight}_DequantizeLinear")
    nodes = [helper.make_node("DequantizeLinear", inputs, [dq_out], name=dq_name, **axis)]
    if not q.sqrt:
        return inits, nodes, dq_out
    abs_out = names.fresh(f"{weight}_abs")
    squared = names.fresh(f"{weight}_squared")
    nodes.append(helper.make_node("Abs", [dq_out], [abs_out], name=names.fresh(f"{weight}_Abs")))
    nodes.append(helper.make_node("Mul", [dq_out, abs_out], [squared], name=names.fresh(f"{weight}_Square")))
    return inits, nodes, squared


def replace_weights(graph: onnx.GraphProto, quantized: dict[str, QuantizedTensor]) -> None:
    """Replace each named float initializer by its integer codes and dequantization nodes."""
    names = NameSource(graph)
    dtypes = {t.name: t.data_type for t in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    for weight, q in quantized.items():
        inits, nodes, output = dequantize_nodes(weight, q, names, dtypes[weight])
        graph.initializer.extend(inits)
        new_nodes.extend(nodes)
        rename_input(graph, weight, output)
    # Dequantization reads only initializers, so it goes first and the order stays topological.
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + existing)
    remove_unused_initializers(graph)
