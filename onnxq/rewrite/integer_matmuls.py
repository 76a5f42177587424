"""MatMuls between quantized operands with a float output as onnxruntime's MatMulIntegerToFloat, their bias Add inside.

A weighted MatMul that stays QDQ and whose output stays float (the op formats leave the outputs of layers below onnxq's
op size float, onnxq/calibrate/placement.py) reads two DequantizeLinear nodes: its input's uint8 codes and its weight's
int8 codes. onnxruntime fuses that group into its MatMulIntegerToFloat (com.microsoft, in every onnxruntime build):
integer products, one float scaling, float out. It leaves the bias Add behind it as a node of its own, which took
about half as long as the product in the fmnist ViT (onnxruntime's profiler, batch 1): its int model ran 0.96x float at
batch 1 and 1.05x at batch 8 with the 24 Adds, 1.09x and 1.21x with the biases inside the op (one-off, median of 7
interleaved rounds, VNNI; BENCHMARKS "The ViT's biases inside MatMulIntegerToFloat"). So onnxq writes the op itself,
with the bias as its ``bias`` input, where:

- the MatMul's first input is DequantizeLinear of uint8 codes with one scale and zero point (the pairs onnxq writes);
- its second input is DequantizeLinear of a 2-D int8 or uint8 weight (an initializer, or the Cast that widens 4-bit
  codes, which onnxruntime folds when the model loads) with one scale, or one per output column (axis 1), no blocks;
- nothing reads its output as a QuantizeLinear (then onnxruntime's QLinearMatMul serves);
- the bias: the only reader of the MatMul's output is an Add of a constant float32 vector of one value per column.

The op computes the same integer sums and multiplies them by the same two steps; onnxruntime's own fusion writes this
node too, less the bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from onnxq.model.graph import attribute, constant_initializers, consumers, import_domain, remove_unused_initializers, subgraph_reads
from onnxq.native.domain import MATMUL_INTEGER_TO_FLOAT, ORT_DOMAIN
from onnxq.rewrite.fusions import drop_unread, scalar_step

#: The weight code types the op takes for B.
CODE_TYPES = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)


def write_integer_matmuls(model: onnx.ModelProto) -> set[str]:
    """Turn the main graph's eligible QDQ MatMuls into MatMulIntegerToFloat (their bias Adds inside); returns their names.

    The op's inputs: A (the input's codes), B (the weight's), a_scale, b_scale, a_zero_point, b_zero_point, bias; the
    MatMul keeps its name and takes the Add's output, and the DequantizeLinear nodes nobody reads any more go.
    """
    graph = model.graph
    consts = constant_initializers(graph)
    producers = {output: node for node in graph.node for output in node.output}
    readers = consumers(graph)
    outputs = {o.name for o in graph.output} | subgraph_reads(graph)  # (names that must stay)
    replaced: set[str] = set()
    dropped: list[onnx.NodeProto] = []
    for node in list(graph.node):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        a, b = producers.get(node.input[0]), producers.get(node.input[1])
        columns = _weight_columns(b, consts, producers)
        if not _code_input(a, consts) or columns is None:
            continue
        if any(r.op_type == "QuantizeLinear" for r in readers.get(node.output[0], [])):
            continue
        add = _bias_add(node, readers, outputs, consts, columns)
        inputs = [a.input[0], b.input[0], a.input[1], b.input[1], _at(a.input, 2), _at(b.input, 2)]
        if add is not None:
            inputs.append(next(name for name in add.input if name != node.output[0]))
            node.output[0] = add.output[0]
            graph.node.remove(add)
        while inputs and not inputs[-1]:
            inputs.pop()
        node.op_type, node.domain = MATMUL_INTEGER_TO_FLOAT, ORT_DOMAIN
        del node.input[:]
        node.input.extend(inputs)
        dropped += [a, b]
        replaced.add(node.name)
    if replaced:
        drop_unread(graph, dropped)
        remove_unused_initializers(graph)
        import_domain(model, ORT_DOMAIN)
    return replaced


def _at(names: Sequence[str], index: int) -> str:
    """names[index], or "" (an omitted optional input) past the end."""
    return names[index] if len(names) > index else ""


def _code_input(dq: onnx.NodeProto | None, consts: dict[str, onnx.TensorProto]) -> bool:
    """Whether ``dq`` dequantizes uint8 codes with one constant step and zero point (the pairs onnxq writes)."""
    return dq is not None and dq.op_type == "DequantizeLinear" and scalar_step(dq.input[1], _at(dq.input, 2), consts) is not None


def _weight_columns(dq: onnx.NodeProto | None, consts: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]) -> int | None:
    """N of the constant 2-D weight (K, N) of 8-bit codes that ``dq`` dequantizes, else None.

    Per tensor or per output column (axis 1), no blocks; the codes an initializer, or the Cast that widens 4-bit codes.
    """
    if dq is None or dq.op_type != "DequantizeLinear" or attribute(dq, "block_size", 0):
        return None
    weight, code_type = consts.get(dq.input[0]), None
    if weight is not None:
        code_type = weight.data_type
    elif (cast := producers.get(dq.input[0])) is not None and cast.op_type == "Cast":
        weight, code_type = consts.get(cast.input[0]), attribute(cast, "to")
    if weight is None or code_type not in CODE_TYPES or len(weight.dims) != 2:
        return None
    columns = weight.dims[1]
    scale, zero_point = consts.get(dq.input[1]), consts.get(_at(dq.input, 2))
    if scale is None or scale.data_type != onnx.TensorProto.FLOAT:
        return None
    size = int(np.prod(scale.dims))
    if size != 1 and (list(scale.dims) != [columns] or attribute(dq, "axis", 1) not in (1, -1)):
        return None
    if _at(dq.input, 2) and (zero_point is None or int(np.prod(zero_point.dims)) not in (1, size)):
        return None
    return columns


def _bias_add(node: onnx.NodeProto, readers: dict[str, list[onnx.NodeProto]], outputs: set[str],
              consts: dict[str, onnx.TensorProto], columns: int) -> onnx.NodeProto | None:
    """The Add that only reads the MatMul's output and a constant float32 vector of ``columns`` values, else None."""
    out = node.output[0]
    users = readers.get(out, [])
    if out in outputs or len(users) != 1 or users[0].op_type != "Add" or len(users[0].input) != 2:
        return None
    add = users[0]
    other = add.input[1] if add.input[0] == out else add.input[0]
    bias = consts.get(other)
    if other == out or bias is None or bias.data_type != onnx.TensorProto.FLOAT or list(bias.dims) != [columns]:
        return None
    return add
