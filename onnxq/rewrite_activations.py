"""Insert activation QuantizeLinear/DequantizeLinear pairs, fixed-scale or ASQ-adaptive.

A fixed-scale pair is what onnxruntime fuses into its integer kernels. An ASQ pair gets
its scale per input from a small adapter computed in the graph, in standard ONNX::

    x -> ReduceMean(channels) -> Gemm -> Exp -> Reshape(N) -> Mul(s) = scale (one per sample)
    x -> QuantizeLinear(scale, zero point, axis=0) -> DequantizeLinear(axis=0) -> readers

The zero point is the same for every sample (the range scales about zero), broadcast to
the batch with Expand and cast to the code type. Every reader of the tensor is pointed
at the dequantized copy; graph outputs keep the float tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.calibrate.asq import Adapter
from onnxq.calibrate.ranges import QuantParams
from onnxq.graph import NameSource, constant_initializers, consumers, remove_unused_initializers, to_array
from onnxq.rewrite import rename_input

#: ReduceMean takes its axes as an input from this opset on (an attribute before).
REDUCE_AXES_AS_INPUT = 18


@dataclass(frozen=True)
class ActivationQuant:
    """How one activation tensor is quantized: fixed params, and an adapter when ASQ scales them per input."""

    tensor: str
    params: QuantParams
    adapter: Adapter | None = None
    feature_axes: tuple[int, ...] = ()


def code_type(bits: int) -> int:
    """The unsigned ONNX element type of ``bits``-bit codes."""
    return onnx.TensorProto.UINT4 if bits <= 4 else onnx.TensorProto.UINT8


def insert_activation_qdq(model: onnx.ModelProto, quants: Mapping[str, ActivationQuant], opset: int) -> None:
    """Quantize-dequantize each tensor in ``quants`` right after it is produced (in place)."""
    graph = model.graph
    names = NameSource(graph)
    after: dict[str, list[onnx.NodeProto]] = {}
    for tensor, quant in quants.items():
        dequantized = names.fresh(f"{tensor}_dequantized")
        rename_input(graph, tensor, dequantized)
        inits, nodes = _qdq(tensor, dequantized, quant, names, opset)
        graph.initializer.extend(inits)
        after[tensor] = nodes
    _splice(graph, after)
    _fold_clipping(graph, quants)
    remove_unused_initializers(graph)


def _fold_clipping(graph: onnx.GraphProto, quants: Mapping[str, ActivationQuant]) -> None:
    """Drop a Relu/Clip whose output only feeds its fixed-scale QuantizeLinear and whose bounds the range lies within.

    QuantizeLinear saturates at the ends of its range, so clipping to wider bounds first
    changes nothing. onnxruntime folds these itself, but its Clip folding fails on 4-bit
    zero points, so the rewrite does it (as onnxruntime's own quantizer does).
    """
    consts = constant_initializers(graph)
    readers = consumers(graph)
    outputs = {o.name for o in graph.output}
    drop: list[onnx.NodeProto] = []
    for node in graph.node:
        quant = quants.get(node.output[0]) if node.output else None
        if quant is None or quant.adapter is not None or node.op_type not in ("Relu", "Clip") or node.output[0] in outputs:
            continue
        users = readers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        low, high = _clip_bounds(node, consts)
        lo, hi = quant.params.value_range
        if low is None or lo < low or hi > high:
            continue
        users[0].input[0] = node.input[0]
        drop.append(node)
    for node in drop:
        graph.node.remove(node)


def _clip_bounds(node: onnx.NodeProto, consts: Mapping[str, onnx.TensorProto]) -> tuple[float | None, float]:
    """The bounds a Relu or Clip enforces, or (None, inf) when they are not constants."""
    if node.op_type == "Relu":
        return 0.0, np.inf
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        name = node.input[index] if len(node.input) > index else ""
        if not name:
            bounds.append(default)
        elif name in consts:
            bounds.append(float(to_array(consts[name]).reshape(-1)[0]))
        else:
            return None, np.inf
    for attr in node.attribute:  # opset < 11 keeps them as attributes
        if attr.name in ("min", "max"):
            bounds[0 if attr.name == "min" else 1] = attr.f
    return bounds[0], bounds[1]


def _splice(graph: onnx.GraphProto, after: dict[str, list[onnx.NodeProto]]) -> None:
    """Put each tensor's new nodes right after its producer (graph inputs: at the front)."""
    nodes = list(graph.node)
    del graph.node[:]
    produced = {o for n in nodes for o in n.output}
    for tensor, new in after.items():
        if tensor not in produced:
            graph.node.extend(new)
    for node in nodes:
        graph.node.append(node)
        for out in node.output:
            graph.node.extend(after.get(out, []))


def _qdq(tensor: str, dequantized: str, quant: ActivationQuant, names: NameSource, opset: int) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Initializers and nodes computing ``dequantized`` from ``tensor``."""
    p = quant.params
    scale = names.fresh(f"{tensor}_scale")
    zero_point = names.fresh(f"{tensor}_zero_point")
    quantized = names.fresh(f"{tensor}_quantized")
    if quant.adapter is None:
        inits = [numpy_helper.from_array(np.array(p.scale, dtype=np.float32), scale), _zero_point(zero_point, p)]
        nodes = []
        axis: dict[str, int] = {}
    else:
        inits, nodes = _adaptive_scale(tensor, scale, zero_point, quant, names, opset)
        axis = {"axis": 0}
    q_name, dq_name = names.fresh(f"{tensor}_QuantizeLinear"), names.fresh(f"{tensor}_DequantizeLinear")
    nodes.append(helper.make_node("QuantizeLinear", [tensor, scale, zero_point], [quantized], name=q_name, **axis))
    nodes.append(helper.make_node("DequantizeLinear", [quantized, scale, zero_point], [dequantized], name=dq_name, **axis))
    return inits, nodes


def _zero_point(name: str, p: QuantParams) -> onnx.TensorProto:
    return helper.make_tensor(name, code_type(p.bits), [], [p.zero_point])


def _adaptive_scale(
    tensor: str, scale: str, zero_point: str, quant: ActivationQuant, names: NameSource, opset: int
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """The ASQ adapter: per-sample ``scale`` (N,) = s * exp(Gemm(channel means)), and the zero point broadcast to (N,)."""
    adapter, p = quant.adapter, quant.params
    assert adapter is not None

    def fresh(base: str) -> str:
        return names.fresh(f"{tensor}_asq_{base}")

    weight, bias, base, shape, zp_float = fresh("weight"), fresh("bias"), fresh("step"), fresh("shape"), fresh("zero_point_float")
    inits = [
        numpy_helper.from_array(adapter.weight.astype(np.float32).reshape(-1, 1), weight),
        numpy_helper.from_array(np.array([adapter.bias], dtype=np.float32), bias),
        numpy_helper.from_array(np.array(p.scale, dtype=np.float32), base),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), shape),
        numpy_helper.from_array(np.array([p.zero_point], dtype=np.float32), zp_float),
    ]
    nodes: list[onnx.NodeProto] = []
    features = tensor
    if quant.feature_axes:
        features = fresh("features")
        axes = list(quant.feature_axes)
        if opset >= REDUCE_AXES_AS_INPUT:
            axes_name = fresh("axes")
            inits.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), axes_name))
            nodes.append(helper.make_node("ReduceMean", [tensor, axes_name], [features], name=fresh("ReduceMean"), keepdims=0))
        else:
            nodes.append(helper.make_node("ReduceMean", [tensor], [features], name=fresh("ReduceMean"), axes=axes, keepdims=0))
    logit, beta2d, beta, batch = fresh("logit"), fresh("beta_2d"), fresh("beta"), fresh("batch")
    zp_wide = fresh("zero_point_wide")
    nodes += [
        helper.make_node("Gemm", [features, weight, bias], [logit], name=fresh("Gemm")),
        helper.make_node("Exp", [logit], [beta2d], name=fresh("Exp")),
        helper.make_node("Reshape", [beta2d, shape], [beta], name=fresh("Reshape")),
        helper.make_node("Mul", [beta, base], [scale], name=fresh("Scale")),
        helper.make_node("Shape", [scale], [batch], name=fresh("Shape")),
        helper.make_node("Expand", [zp_float, batch], [zp_wide], name=fresh("Expand")),
        helper.make_node("Cast", [zp_wide], [zero_point], name=fresh("Cast"), to=code_type(p.bits)),
    ]
    return inits, nodes
