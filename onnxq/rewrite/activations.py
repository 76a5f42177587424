"""Insert activation QuantizeLinear/DequantizeLinear pairs, fixed-scale or ASQ-adaptive.

A fixed-scale pair is what onnxruntime fuses into its integer kernels. An ASQ pair gets
a step per input and channel from a small adapter computed in the graph, in standard ONNX::

    x -> ReduceMean(spatial axes) -> Gemm(w: C x 1) -> Clip -> Exp -> Mul(s_c) -> Reshape(N, C, 1, 1) = r
    x -> Div(r) -> QuantizeLinear(1, z_c, axis=C) -> DequantizeLinear(1, z_c, axis=C) -> Mul(r) -> readers

(r: one step per sample and channel, a per-sample factor times the channel's step). An adapter
whose factor does not depend on the input (ASQ kept fixed per-channel steps) has r as a constant
and no adapter nodes. (Not a per-axis pair QuantizeLinear(s_c, z_c, axis=C): onnxruntime fuses
such a pair into kernels that take one scale, QLinearGlobalAveragePool, which then fail.) When
the channels are the last axis ((N, T, C) token tensors) the per-channel zero points z_c become
an offset z_c - z added before a scalar pair with zero point z and subtracted after it, since
onnxruntime quantizes a per-axis pair along the last axis one element at a time (a ViT's W8A8
ASQ model ran many times slower that way; `tools/bench_activations.py --skip-calibration --models
models/fmnist_vit.onnx` measures it as written now). The codes are the same, except
that an exact half-step tie may round the other way.

Dividing by the step and quantizing with step 1 is QuantizeLinear with step r, and the
zero point of each channel stays put as r scales its range about zero. An adapter with one
output (for tensors that IntConv/PostConv read: their integer sums need one step for all
channels) gives one step per sample: r is (N, 1, 1, 1), and the pair is per-tensor (scalar
unit scale and zero point, no axis); ``rewrite_ops.take_input_quantization`` hands such
steps to the op. Every reader of the tensor is pointed at the dequantized copy; graph
outputs keep the float tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.calibrate.result import ActivationQuant
from onnxq.model.graph import NameSource, remove_unused_initializers, rename_input
from onnxq.rewrite.fusions import fold_clipping_into_quantize

#: ReduceMean takes its axes as an input from this opset on (an attribute before).
REDUCE_AXES_AS_INPUT = 18


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
    fold_clipping_into_quantize(graph, quants)
    remove_unused_initializers(graph)


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
    if quant.adapter is not None:
        return _adaptive_qdq(tensor, dequantized, quant, names, opset)
    p = quant.params
    scale = names.fresh(f"{tensor}_scale")
    zero_point = names.fresh(f"{tensor}_zero_point")
    quantized = names.fresh(f"{tensor}_quantized")
    inits = [
        numpy_helper.from_array(np.array(p.scale, dtype=np.float32), scale),
        helper.make_tensor(zero_point, code_type(p.bits), [], [p.zero_point]),
    ]
    q_name, dq_name = names.fresh(f"{tensor}_QuantizeLinear"), names.fresh(f"{tensor}_DequantizeLinear")
    nodes = [
        helper.make_node("QuantizeLinear", [tensor, scale, zero_point], [quantized], name=q_name),
        helper.make_node("DequantizeLinear", [quantized, scale, zero_point], [dequantized], name=dq_name),
    ]
    return inits, nodes


def step_shape(rank: int, channel_axis: int) -> list[int] | None:
    """Reshape target that puts (N, C) steps on the batch and channel axes of a rank-``rank`` tensor (None: already so)."""
    if rank <= 2:
        return None
    shape = [1] * rank
    shape[0], shape[channel_axis] = 0, -1
    return shape


def _adaptive_qdq(
    tensor: str, dequantized: str, quant: ActivationQuant, names: NameSource, opset: int
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """The ASQ adapter and the per-sample, per-channel quantize-dequantize of ``tensor``."""
    adapter, p = quant.adapter, quant.params
    assert adapter is not None and quant.zero_points is not None

    def fresh(base: str) -> str:
        return names.fresh(f"{tensor}_asq_{base}")

    channels = adapter.outputs
    per_tensor = quant.per_sample_step  # one step per sample: a scalar pair, no axis
    zero_points = np.ravel(quant.zero_points).astype(np.int64)
    # Channels along the last axis: onnxruntime quantizes a per-axis pair one element at a time there (a one-off profile of
    # the ViT found nearly all of a run in its token tensors' pairs), so the zero points become an offset before a scalar pair.
    offsets = not per_tensor and quant.channel_axis == quant.rank - 1
    dims = [] if per_tensor or offsets else [channels]
    common = int(np.median(zero_points)) if offsets else 0
    ones, zero_point = fresh("unit_step"), fresh("zero_point")
    inits = [
        numpy_helper.from_array(np.ones(dims, dtype=np.float32), ones),
        helper.make_tensor(zero_point, code_type(p.bits), dims, [common] if offsets else [int(z) for z in zero_points]),
    ]
    nodes: list[onnx.NodeProto] = []
    shape = step_shape(quant.rank, quant.channel_axis)
    if adapter.adaptive:
        steps = _adapter_steps(tensor, quant, fresh, opset, inits, nodes)
        if shape is not None:
            shape_name, broadcast = fresh("step_shape"), fresh("step_broadcast")
            inits.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), shape_name))
            nodes.append(helper.make_node("Reshape", [steps, shape_name], [broadcast], name=fresh("Reshape")))
            steps = broadcast
    else:  # fixed per-channel steps: constants (not a per-axis pair, which onnxruntime fuses into ops that need one scale)
        steps = fresh("fixed_step")
        fixed = adapter.predict(np.zeros((1, len(adapter.per_sample.weight))))
        fixed_shape = [1 if d == 0 else d for d in shape] if shape is not None else list(fixed.shape)
        inits.append(numpy_helper.from_array(fixed.reshape(fixed_shape).astype(np.float32), steps))
    scaled, quantized, unit = fresh("scaled"), fresh("quantized"), fresh("unit")
    axis = {} if per_tensor or offsets else {"axis": quant.channel_axis}
    nodes.append(helper.make_node("Div", [tensor, steps], [scaled], name=fresh("Div")))
    if offsets:  # round(x / r) + z_c = round(x / r + (z_c - z)) + z for an integer z_c - z
        offset, shifted, back = fresh("zero_point_offset"), fresh("shifted"), fresh("unshifted")
        inits.append(numpy_helper.from_array((zero_points - common).astype(np.float32), offset))
        nodes.append(helper.make_node("Add", [scaled, offset], [shifted], name=fresh("Add_offset")))
        scaled = shifted
    nodes += [
        helper.make_node("QuantizeLinear", [scaled, ones, zero_point], [quantized], name=fresh("QuantizeLinear"), **axis),
        helper.make_node("DequantizeLinear", [quantized, ones, zero_point], [unit], name=fresh("DequantizeLinear"), **axis),
    ]
    if offsets:
        nodes.append(helper.make_node("Sub", [unit, offset], [back], name=fresh("Sub_offset")))
        unit = back
    nodes.append(helper.make_node("Mul", [unit, steps], [dequantized], name=fresh("Mul")))
    return inits, nodes


def _adapter_steps(
    tensor: str, quant: ActivationQuant, fresh: Callable[[str], str], opset: int, inits: list[onnx.TensorProto], nodes: list[onnx.NodeProto]
) -> str:
    """Append the adapter's nodes, (N, C_out) steps from ``tensor``'s features, to ``inits``/``nodes``; returns the steps' name."""
    adapter = quant.adapter
    assert adapter is not None
    weight, bias, channel_steps = fresh("weight"), fresh("bias"), fresh("channel_steps")
    inits += [
        numpy_helper.from_array(adapter.per_sample.weight.reshape(-1, 1).astype(np.float32), weight),
        numpy_helper.from_array(np.array([adapter.per_sample.bias], dtype=np.float32), bias),
        numpy_helper.from_array(np.asarray(adapter.channel_steps, dtype=np.float32), channel_steps),
    ]
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
    logits, clipped, factors, steps = fresh("log_factor"), fresh("log_factor_clipped"), fresh("factor"), fresh("step")
    lo, hi = fresh("log_factor_min"), fresh("log_factor_max")
    inits += [numpy_helper.from_array(np.array(b, dtype=np.float32), n) for b, n in zip(adapter.log_factor_bounds(), (lo, hi), strict=True)]
    nodes += [
        helper.make_node("Gemm", [features, weight, bias], [logits], name=fresh("Gemm")),
        helper.make_node("Clip", [logits, lo, hi], [clipped], name=fresh("Clip")),
        helper.make_node("Exp", [clipped], [factors], name=fresh("Exp")),
        helper.make_node("Mul", [factors, channel_steps], [steps], name=fresh("Mul_channel_steps")),
    ]
    return steps
