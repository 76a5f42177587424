"""Conv/Gemm biases as int32 codes where input and weight are integer: the pattern onnxruntime fuses into integer kernels."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.calibrate.result import ActivationQuant
from onnxq.model.graph import NameSource, attribute, constant_initializers, consumers, to_array
from onnxq.numerics.weights import QuantizedTensor

#: Layers whose bias becomes int32 when input and weight are integer (what onnxruntime's QDQ fusion wants).
BIAS_INPUT = {"Conv": 2, "Gemm": 2}


def quantize_biases(graph: onnx.GraphProto, quants: dict[str, ActivationQuant], weights: dict[str, QuantizedTensor]) -> int:
    """Store the float bias of Conv/Gemm as int32 codes with scale s_x * s_w (+ DequantizeLinear).

    Only where the input has a fixed scale and the weight plain codes (int8, or int4 widened to int8 at load): that is
    the pattern onnxruntime fuses into an integer kernel; elsewhere the bias stays float.
    """
    consts = constant_initializers(graph)
    names = NameSource(graph)
    readers = consumers(graph)
    new_nodes: list[onnx.NodeProto] = []
    done = 0
    for node in graph.node:
        slot = BIAS_INPUT.get(node.op_type)
        if slot is None or len(node.input) <= slot or node.input[slot] not in consts or len(readers[node.input[slot]]) != 1:
            continue
        quant, weight = quants.get(node.input[0]), weights.get(node.input[1])
        if quant is None or quant.adapter is not None or weight is None or weight.sqrt:
            continue
        if node.op_type == "Gemm" and (weight.axis not in (None, 0 if attribute(node, "transB", 0) else 1) or attribute(node, "transA", 0)):
            continue
        bias = to_array(consts[node.input[slot]]).astype(np.float64)
        weight_scale = np.asarray(weight.scale, dtype=np.float64)
        if bias.ndim != 1 or weight_scale.size not in (1, bias.size):
            continue
        scale = (quant.params.scale * weight_scale).astype(np.float32)
        codes = np.clip(np.rint(bias / np.where(scale > 0, scale, 1.0)), -(2**31), 2**31 - 1).astype(np.int32)
        base = node.input[slot]
        codes_name, scale_name, out = names.fresh(f"{base}_quantized"), names.fresh(f"{base}_scale"), names.fresh(f"{base}_dequantized")
        graph.initializer.extend([numpy_helper.from_array(codes, codes_name), numpy_helper.from_array(scale, scale_name)])
        axis = {"axis": 0} if scale.ndim == 1 else {}
        dq_name = names.fresh(f"{base}_DequantizeLinear")
        new_nodes.append(onnx.helper.make_node("DequantizeLinear", [codes_name, scale_name], [out], name=dq_name, **axis))
        node.input[slot] = out
        done += 1
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + existing)
    return done
