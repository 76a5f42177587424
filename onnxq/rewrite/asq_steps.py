"""ASQ's steps per sample computed inside the onnxq op that writes the tensor, so that its readers get uint8 codes.

ASQ gives a tensor an onnxq op reads one step per sample, s * exp(clip(f . w + b)), f the sample's channel means
(onnxq/calibrate/asq.py); the activation rewrite writes it in standard ONNX from the float tensor, and
take_input_quantization hands the steps to the reading ops as their per-sample x_scale::

    op -> X -> ReduceMean(H, W) -> Gemm(w, b) -> Clip(lo, hi) -> Exp -> Mul(s) = steps
         X, steps -> reader ops (x_scale = steps, x_zero_point = z)
        [X -> Div(Reshape(steps)) -> QuantizeLinear(1, z) -> DequantizeLinear(1, z) -> Mul(Reshape(steps)) -> others]

Here the op in front takes the adapter into its epilogue (csrc/kernels/int_conv.h, inputs asq_weight and asq_log):
it computes each sample's step from its own output and writes the codes with it (IntConvQ/PostConvQ) and the steps
as its second output, which the readers take as they are. The codes are the float graph's (one formula: y / step,
rounded, plus z), up to how the channel means and exp are rounded (double sums in the op, onnxruntime's float32
ReduceMean and Gemm in the graph): a step that differs in its last bits can move a code that sits on a rounding
tie by one. Other readers keep the dequantized tensor, now DequantizeLinear(codes, 1, z) * steps; a residual Add
among them goes into its op as uint8 R with the steps per sample (chains.py runs its residual pass again).

Only a one-output adapter (one step per sample for all channels) is taken in: per-channel steps are never what an
op reads (its integer sums need one step over the input channels), so such a tensor is read by float ops anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.model.graph import NameSource, attribute, constant_initializers, consumers, declared_shapes, is_op, to_array
from onnxq.native.domain import DOMAIN

#: Input slots of the ops (csrc/kernels/int_conv.h): X's step and zero point, Y's, and ASQ's adapter.
X_SCALE, X_ZERO_POINT, Y_SCALE, Y_ZERO_POINT, ASQ_WEIGHT, ASQ_LOG = 4, 5, 6, 7, 13, 14


@dataclass
class _Adapter:
    """One tensor's adapter as the graph writes it: its nodes, and the values the op takes."""

    nodes: list[onnx.NodeProto]  # ReduceMean, Gemm, Clip, Exp, Mul (steps = the Mul's output)
    steps: str
    weight: np.ndarray  # (C,)
    log: np.ndarray     # (b, lo, hi), float32
    scale: str          # the one-element channel step s


def fuse_asq_steps(graph: onnx.GraphProto, float_ops: dict[str, str], set_inputs) -> int:
    """Give each float onnxq op whose output only ASQ's per-sample quantization reads the adapter (in place).

    ``float_ops`` maps each float-output op type to its uint8-output twin; ``set_inputs(node, {slot: name})`` sets
    the op's inputs. Returns how many ops now write codes with steps per sample.
    """
    consts = constant_initializers(graph)
    readers_of = consumers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    shapes = declared_shapes(graph)
    fixed = {o.name for o in graph.output}
    names = NameSource(graph)
    fused = 0
    for op in [n for n in graph.node if n.domain == DOMAIN and n.op_type in float_ops]:
        x = op.output[0]
        readers = readers_of.get(x, [])
        adapter = next((a for r in readers if (a := _adapter(r, readers_of, consts)) is not None), None)
        if adapter is None or x in fixed or len(op.output) > 1:
            continue
        plan = _readers_plan(x, readers, adapter, readers_of, producer, consts)
        if plan is None or adapter.weight.size != _channels(op, consts):
            continue
        ops, zero_point, chain = plan
        codes = names.fresh(f"{x}_uint8")
        weight, log = names.fresh(f"{op.name}_asq_weight"), names.fresh(f"{op.name}_asq_log")
        graph.initializer.extend([numpy_helper.from_array(adapter.weight, weight), numpy_helper.from_array(adapter.log, log)])
        op.op_type = float_ops[op.op_type]
        set_inputs(op, {Y_SCALE: adapter.scale, Y_ZERO_POINT: zero_point, ASQ_WEIGHT: weight, ASQ_LOG: log})
        op.output[0] = codes
        op.output.append(adapter.steps)
        for reader in ops:
            reader.input[0] = codes
        if chain:  # the other readers: DequantizeLinear(codes, 1, z) * steps, Div and QuantizeLinear gone
            div, quantize, dequantize = chain
            dequantize.input[0] = codes
            graph.node.remove(div)
            graph.node.remove(quantize)
        for node in adapter.nodes:
            graph.node.remove(node)
        _declare(graph, x, codes, adapter.steps, shapes.get(x))
        fused += 1
    return fused


def _adapter(reader: onnx.NodeProto, readers_of: dict[str, list[onnx.NodeProto]], consts: dict[str, onnx.TensorProto]) -> _Adapter | None:
    """The one-output adapter that starts at ``reader`` (a ReduceMean over H and W), or None."""
    if not is_op(reader, "ReduceMean") or attribute(reader, "keepdims", 1) != 0 or _axes(reader, consts) != [2, 3]:
        return None
    nodes = [reader]
    for op_type in ("Gemm", "Clip", "Exp", "Mul"):
        following = readers_of.get(nodes[-1].output[0], [])
        if len(following) != 1 or not is_op(following[0], op_type):
            return None
        nodes.append(following[0])
    gemm, clip, _, mul = nodes[1:]
    if len(gemm.input) != 3 or gemm.input[0] != reader.output[0] or any(attribute(gemm, a, d) != d for a, d in _GEMM_DEFAULTS):
        return None
    values = [_constant(name, consts) for name in (*gemm.input[1:], *clip.input[1:3])]
    if any(v is None for v in values) or len(clip.input) != 3 or len(mul.input) != 2:
        return None
    scale = mul.input[1] if mul.input[0] == nodes[3].output[0] else mul.input[0]
    weight, bias, lo, hi = values
    s = _constant(scale, consts)
    if weight.ndim != 2 or weight.shape[1] != 1 or bias.size != 1 or lo.size != 1 or hi.size != 1 or s is None or s.size != 1:
        return None
    log = np.array([bias.reshape(-1)[0], lo.reshape(-1)[0], hi.reshape(-1)[0]], dtype=np.float32)
    if not np.all(np.isfinite(log)) or log[1] > log[2] or not (0 < float(s.reshape(-1)[0]) < np.inf):
        return None
    return _Adapter(nodes, mul.output[0], weight[:, 0].astype(np.float32), log, scale)


_GEMM_DEFAULTS = (("transA", 0), ("transB", 0), ("alpha", 1.0), ("beta", 1.0))


def _readers_plan(
    x: str, readers: list[onnx.NodeProto], adapter: _Adapter, readers_of: dict[str, list[onnx.NodeProto]],
    producer: dict[str, onnx.NodeProto], consts: dict[str, onnx.TensorProto],
) -> tuple[list[onnx.NodeProto], str, list[onnx.NodeProto]] | None:
    """(the ops reading X with the steps, the zero point z, [Div, QuantizeLinear, DequantizeLinear] or []) or None.

    None where anything else reads X or the steps, or the readers' zero points differ.
    """
    ops, chain, zero_points = [], [], set()
    for reader in readers:
        if reader is adapter.nodes[0]:
            continue
        if reader.domain == DOMAIN and len(reader.input) > X_ZERO_POINT and reader.input[X_SCALE] == adapter.steps:
            if list(reader.input).count(x) != 1 or reader.input[0] != x:
                return None
            ops.append(reader)
            zero_points.add(reader.input[X_ZERO_POINT])
        elif is_op(reader, "Div") and not chain and reader.input[0] == x:
            chain = _dequantize_chain(reader, adapter.steps, readers_of, producer, consts)
            if chain is None:
                return None
            zero_points.add(chain[1].input[2])
        else:
            return None
    for reader in readers_of.get(adapter.steps, []):
        if reader not in ops and not (is_op(reader, "Reshape") and chain):
            return None
    if not all(z in consts and consts[z].data_type == onnx.TensorProto.UINT8 and to_array(consts[z]).size == 1 for z in zero_points):
        return None
    if len({int(to_array(consts[z]).reshape(-1)[0]) for z in zero_points}) != 1:
        return None  # (none: nothing but the adapter reads X)
    return ops, sorted(zero_points)[0], chain


def _dequantize_chain(div: onnx.NodeProto, steps: str, readers_of: dict[str, list[onnx.NodeProto]],
                      producer: dict[str, onnx.NodeProto], consts: dict[str, onnx.TensorProto]) -> list[onnx.NodeProto] | None:
    """[Div, QuantizeLinear(1, z), DequantizeLinear(1, z)] of ``Div(X, Reshape(steps))``, each read by the next; else None."""
    reshape = producer.get(div.input[1])
    if not is_op(reshape, "Reshape") or reshape.input[0] != steps:
        return None
    following = readers_of.get(div.output[0], [])
    quantize = following[0] if len(following) == 1 and is_op(following[0], "QuantizeLinear") else None
    following = readers_of.get(quantize.output[0], []) if quantize is not None else []
    dequantize = following[0] if len(following) == 1 and is_op(following[0], "DequantizeLinear") else None
    if dequantize is None or len(quantize.input) != 3 or list(quantize.input[1:]) != list(dequantize.input[1:]):
        return None
    unit, zero = _constant(quantize.input[1], consts), consts.get(quantize.input[2])
    if unit is None or unit.size != 1 or float(unit.reshape(-1)[0]) != 1.0 or zero is None or zero.data_type != onnx.TensorProto.UINT8:
        return None
    if attribute(quantize, "axis", None) is not None and to_array(zero).size != 1:
        return None
    return [div, quantize, dequantize]


def _axes(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> list[int] | None:
    """A ReduceMean's axes: its attribute, or its constant second input (opset 18 on)."""
    if len(node.input) > 1 and node.input[1]:
        value = _constant(node.input[1], consts)
        return None if value is None else [int(a) for a in value.reshape(-1)]
    axes = attribute(node, "axes", None)
    return None if axes is None else [int(a) for a in axes]


def _constant(name: str, consts: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    return to_array(consts[name]) if name in consts else None


def _channels(op: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> int | None:
    """M, the op's output channels (its W's rows)."""
    w = consts.get(op.input[1])
    return int(w.dims[0]) if w is not None and len(w.dims) == 2 else None


def _declare(graph: onnx.GraphProto, float_name: str, codes: str, steps: str, shape: list | None) -> None:
    """The op's outputs now: uint8 codes of the float output's shape, and the (N,) steps."""
    for info in list(graph.value_info):
        if info.name in (float_name, steps):
            graph.value_info.remove(info)
    batch = shape[0] if shape else None
    graph.value_info.extend([helper.make_tensor_value_info(codes, onnx.TensorProto.UINT8, shape),
                             helper.make_tensor_value_info(steps, onnx.TensorProto.FLOAT, [batch])])
