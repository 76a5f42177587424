"""uint8 between consecutive onnxq ops: chains of IntConv/PostConv that never go back to float in between.

With calibration, each op quantizes its float input with a calibrated step (take_input_quantization). Where the op
in front of it is an onnxq op too, that one can write the codes itself: its epilogue quantizes its output with the
reader's step (IntConvQ/PostConvQ, uint8 Y) and the reader takes the uint8 tensor as it is. The op's output
quantization and the reader's input quantization are the same formula (round half to even of y / s, plus z, clamped
to 0-255), so the chain gives the same codes, bit for bit, and skips a float tensor and a pass over it per link.

A residual ``Add`` behind an op (ResNet's and MobileNetV2's blocks: ``op -> [Q -> DQ] -> Add(skip) [-> Relu]``) goes
into the op's epilogue as its input R (uint8 with its step where the skip is a dequantized uint8 tensor): the sum is
then formed in float from the op's exact output instead of its quantized copy, so the result is within a code step of
the QDQ graph's, not equal to it. The Add's output then chains like any op output.

A BatchNormalization (inference form) behind an op (CREPE's blocks: ``op [clip 0 for the Relu] -> [Q -> DQ] ->
BatchNormalization``; a BatchNormalization straight after a Conv is folded into its weights when the model is prepared)
goes into the op's epilogue as its per-channel affine map (inputs post_scale, post_bias, after the clip): the map is
applied to the op's exact output instead of its quantized copy, and in the op's two float32 steps (y * a + b, a and b
from the BatchNormalization's parameters in float64) instead of onnxruntime's, so its output moves by about a code step
of the quantization after it, no more. Its output then chains like any op output.

An op's output stays float where a reader is not an onnxq op reading it as X with one fixed step (or a QuantizeLinear
with that step), where the readers' steps differ, or where it is a graph output; ``ChainReport`` says which and why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.model.graph import (
    Dim,
    NameSource,
    Shape,
    attribute,
    constant_initializers,
    consumers,
    declared_shapes,
    is_op,
    rename_input,
    subgraph_reads,
    to_array,
)
from onnxq.native.domain import DOMAIN, INT_CONV, INT_CONV_Q, POST_CONV, POST_CONV_Q
from onnxq.rewrite.asq_steps import fuse_asq_steps, op_behind_channel_pair, write_channel_codes
from onnxq.rewrite.fusions import drop_unread, drop_unread_pairs, scalar_step

#: The float-output op and its uint8-output twin.
QUANTIZED_OUTPUT = {INT_CONV: INT_CONV_Q, POST_CONV: POST_CONV_Q}
#: Input slots of the ops (csrc/kernels/int_conv.h): x_scale/x_zero_point, y_scale/y_zero_point, R and its step.
X_SCALE, X_ZERO_POINT, Y_SCALE, Y_ZERO_POINT, RESIDUAL, R_SCALE, R_ZERO_POINT = 4, 5, 6, 7, 8, 9, 10
#: And the per-channel affine map after the clip: post_scale, post_bias.
POST_SCALE, POST_BIAS = 11, 12


@dataclass
class ChainReport:
    """What the chain rewrite did: outputs now uint8, residual Adds fused, and why the other op outputs stay float."""

    linked: int = 0
    residuals: int = 0
    asq_steps: int = 0  # ops computing ASQ's steps per sample for their codes (onnxq/rewrite/asq_steps.py)
    affines: int = 0  # BatchNormalizations fused into the ops' affine maps
    float_outputs: dict[str, str] = field(default_factory=dict)  # op node name -> why its output stays float

    def line(self) -> str | None:
        """The summary's line; None when the model has no onnxq op with a calibrated input."""
        total = self.linked + len(self.float_outputs)
        if total == 0:
            return None
        text = f"uint8 chains: {self.linked} of {total} onnxq op outputs go to the next ops as uint8"
        fused = [f"{self.residuals} residual Adds"] if self.residuals else []
        fused += [f"{self.affines} BatchNormalizations"] if self.affines else []
        fused += [f"{self.asq_steps} ASQ step adapters"] if self.asq_steps else []
        if fused:
            text += f" ({' and '.join(fused)} fused into the ops)"
        if self.float_outputs:
            shown = "; ".join(f"{node}: {why}" for node, why in list(self.float_outputs.items())[:3])
            more = " ..." if len(self.float_outputs) > 3 else ""
            text += f"; float after {shown}{more}"
        return text


def link_chains(graph: onnx.GraphProto) -> ChainReport:
    """Fuse residual Adds into the ops in front of them, then let each op write its readers' uint8 codes (in place)."""
    report = ChainReport()
    report.residuals = _fuse_residuals(graph)
    report.affines = _fuse_batch_norms(graph)
    report.asq_steps = fuse_asq_steps(graph, QUANTIZED_OUTPUT, _set_inputs)
    if report.asq_steps:  # Adds reading an ASQ op's codes, dequantized with its steps, as their skip
        report.residuals += _fuse_residuals(graph)
    report.linked = report.asq_steps
    for op, reader in write_channel_codes(graph, QUANTIZED_OUTPUT, _set_inputs):
        report.float_outputs[op] = f"ASQ's per-channel steps (written as codes, dequantized for {reader}: an op needs one step)"
    names = NameSource(graph)
    consts = constant_initializers(graph)
    fixed = {o.name for o in graph.output} | subgraph_reads(graph)
    readers_of = consumers(graph)  # stays right for every op output: linking renames only the linked op's tensors
    shapes = declared_shapes(graph)  # of the float outputs, which linking only removes
    for node in list(graph.node):
        if not _is_float_op(node):
            continue
        readers = readers_of.get(node.output[0], [])
        step, why = _common_step(node.output[0], readers, consts)
        if node.output[0] in fixed:
            why = "a graph output" if node.output[0] in {o.name for o in graph.output} else "read inside a control-flow body"
        if step is None or why:
            report.float_outputs[node.name] = why
            continue
        _quantize_output(graph, node, step, readers, names, shapes.get(node.output[0]))
        report.linked += 1
    _read_shared_quantization(graph, consts)
    drop_unread_pairs(graph)
    return report


def _read_shared_quantization(graph: onnx.GraphProto, consts: dict[str, onnx.TensorProto]) -> None:
    """Ops reading a float tensor that a QuantizeLinear with their step also reads take that QuantizeLinear's codes.

    The codes are the same (one formula), computed once instead of once per reader; and the tensor's producer, left
    with only the QuantizeLinear behind it, becomes a pattern onnxruntime fuses into its integer kernels (e.g. the
    8-bit first Conv, DequantizeLinear -> Conv -> QuantizeLinear, runs as QLinearConv).
    """
    for tensor, nodes in consumers(graph).items():
        ops = [n for n in nodes if n.domain == DOMAIN and n.input[0] == tensor and len(n.input) > X_ZERO_POINT]
        quantizers = [n for n in nodes if is_op(n, "QuantizeLinear") and len(n.input) == 3 and n.input[0] == tensor]
        if not ops or not quantizers:
            continue
        for op in ops:
            step = scalar_step(op.input[X_SCALE], op.input[X_ZERO_POINT], consts)
            same = next((q for q in quantizers if step is not None and scalar_step(q.input[1], q.input[2], consts) == step), None)
            if same is not None and list(op.input).count(tensor) == 1:
                op.input[0] = same.output[0]


def _is_float_op(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type in QUANTIZED_OUTPUT


def _common_step(tensor: str, readers: list[onnx.NodeProto], consts: dict[str, onnx.TensorProto]) -> tuple[tuple[str, str] | None, str]:
    """The (scale, zero point) names every reader quantizes ``tensor`` with, or None and why not."""
    if not readers:
        return None, "nothing reads it"
    steps: set[tuple[float, int]] = set()
    names: tuple[str, str] | None = None
    for reader in readers:
        if reader.domain == DOMAIN and reader.op_type in (*QUANTIZED_OUTPUT, *QUANTIZED_OUTPUT.values()):
            if list(reader.input).count(tensor) != 1 or reader.input[0] != tensor or len(reader.input) <= X_ZERO_POINT:
                return None, f"{reader.name} reads it {'as its residual' if tensor in reader.input[1:] else 'without a calibrated step'}"
            pair = (reader.input[X_SCALE], reader.input[X_ZERO_POINT])
        elif is_op(reader, "QuantizeLinear") and len(reader.input) == 3 and reader.input[0] == tensor and not attribute(reader, "axis", None):
            pair = (reader.input[1], reader.input[2])
        else:
            return None, f"read by {reader.op_type} {reader.name}"
        step = scalar_step(*pair, consts)
        if step is None:
            return None, f"{reader.name} takes no fixed uint8 step (e.g. ASQ's step per sample)"
        steps.add(step)
        names = names or pair
    if len(steps) > 1:
        return None, "its readers quantize it with different steps"
    return names, ""


def _quantize_output(graph: onnx.GraphProto, node: onnx.NodeProto, step: tuple[str, str], readers: list[onnx.NodeProto],
                     names: NameSource, shape: Shape | None) -> None:
    """Make ``node`` write uint8 with ``step``; onnxq readers take it as X, QuantizeLinear readers are replaced by it.

    ``shape``: the float output's declared shape, which the uint8 output is declared with.
    """
    float_name = node.output[0]
    codes = names.fresh(f"{float_name}_uint8")
    node.op_type = QUANTIZED_OUTPUT[node.op_type]
    _set_inputs(node, {Y_SCALE: step[0], Y_ZERO_POINT: step[1]})
    node.output[0] = codes
    for reader in readers:
        if is_op(reader, "QuantizeLinear"):
            graph.node.remove(reader)
            rename_input(graph, reader.output[0], codes)
        else:
            reader.input[0] = codes
    _declare_uint8(graph, float_name, codes, shape)


def _set_inputs(node: onnx.NodeProto, values: dict[int, str]) -> None:
    """Set the op's inputs at the given slots, filling the optional slots before them with empty names."""
    top = max(values)
    if len(node.input) <= top:
        node.input.extend([""] * (top + 1 - len(node.input)))
    for index, name in values.items():
        node.input[index] = name


def _declare_uint8(graph: onnx.GraphProto, float_name: str, codes: str, shape: Shape | None) -> None:
    """Declare the op's new uint8 output with the float output's ``shape`` (the float one is gone)."""
    for info in list(graph.value_info):
        if info.name == float_name:
            graph.value_info.remove(info)
    graph.value_info.append(helper.make_tensor_value_info(codes, onnx.TensorProto.UINT8, shape))


# ---- residual Adds into the op in front of them


def _fuse_residuals(graph: onnx.GraphProto) -> int:
    """Fuse ``op -> [Q(s, z) -> DQ(s, z)] -> Add(skip) [-> Relu]`` into the op (input R, clip 0 for the Relu); returns how many."""
    consts = constant_initializers(graph)
    fixed = {o.name for o in graph.output} | subgraph_reads(graph)
    fused = 0
    maps = None
    for add in [n for n in graph.node if is_op(n, "Add") and len(n.input) == 2]:
        if maps is None:  # built once, and again after each fusion (which moves nodes and names)
            maps = (Counter(name for n in graph.node for name in n.input), {out: n for n in graph.node for out in n.output},
                    declared_shapes(graph) | declared_shapes(graph, onnx.TensorProto.UINT8))
        readers, producer, shapes = maps
        for branch, skip in (add.input, reversed(add.input)):
            found = _branch_op(branch, producer, readers, consts, fixed)
            if found is None or found[0].output[0] == skip:
                continue
            op, between = found
            residual = _residual_inputs(skip, producer, consts)
            skip_op = op_behind_channel_pair(skip, producer, readers, consts, fixed, QUANTIZED_OUTPUT)
            if skip_op is not None:  # the skip op's exact output as float R, its per-channel pair dropped as the branch's is
                residual, between, skip = [skip_op[0].output[0]], [*between, *skip_op[1]], skip_op[0].output[0]
            per_sample = _per_sample_skip(skip, producer, consts)
            shape = _shape_of(op.output[0], shapes, producer)
            if shape is None or None in shape or shape != _shape_of(residual[0] if per_sample else skip, shapes, producer):
                continue  # the op takes R of exactly its output's shape; an Add that broadcasts stays
            _fuse(graph, op, add, between, residual, readers, fixed)
            if per_sample is not None:  # the skip's dequantization, where nothing else reads it
                drop_unread(graph, per_sample[1])
            fused += 1
            maps = None
            break
    return fused


def _op_behind_pair(name: str, producer: dict[str, onnx.NodeProto], readers: Counter[str], consts: dict[str, onnx.TensorProto],
                    fixed: set[str]) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """The onnxq op (float out) whose output alone reaches ``name``, directly or through a Q/DQ pair read by nothing else.

    Returns the op and the pair ([DequantizeLinear, QuantizeLinear], or none); None where something else reads the way.
    """
    node = producer.get(name)
    between: list[onnx.NodeProto] = []
    if is_op(node, "DequantizeLinear") and len(node.input) == 3 and scalar_step(node.input[1], node.input[2], consts) is not None:
        q = producer.get(node.input[0])
        if not is_op(q, "QuantizeLinear") or readers[q.output[0]] != 1 or q.output[0] in fixed or readers[node.output[0]] != 1:
            return None
        between, node = [node, q], producer.get(q.input[0])
    if node is None or not _is_float_op(node) or readers[node.output[0]] != 1 or node.output[0] in fixed:
        return None
    return node, between


def _branch_op(name: str, producer: dict[str, onnx.NodeProto], readers: Counter[str], consts: dict[str, onnx.TensorProto],
               fixed: set[str]) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """The onnxq op (float out, no clip, no residual yet) whose output alone reaches ``name``, and the pair between.

    The pair: a scalar Q/DQ, or ASQ's fixed per-channel one (asq_steps.op_behind_channel_pair). Either goes with the Add: the sum
    is formed from the op's exact output (the same as for a scalar pair, within about a step of the pair's output).
    """
    found = _op_behind_pair(name, producer, readers, consts, fixed) or op_behind_channel_pair(name, producer, readers, consts, fixed,
                                                                                                  QUANTIZED_OUTPUT)
    if found is None or any(i for i in found[0].input[RESIDUAL:]) or not _unclipped(found[0]):
        return None
    return found


def _unclipped(node: onnx.NodeProto) -> bool:
    """Whether the op clips nothing (its clip would come after the residual, where the graph had it before)."""
    return attribute(node, "clip_min", -np.inf) == -np.inf and attribute(node, "clip_max", np.inf) == np.inf


def _residual_inputs(skip: str, producer: dict[str, onnx.NodeProto], consts: dict[str, onnx.TensorProto]) -> list[str]:
    """[R, r_scale, r_zero_point] for a dequantized uint8 skip, else [skip] (float R).

    The skip dequantizes a uint8 tensor with a scalar step, or an ASQ op's codes with its steps per sample
    (_per_sample_skip).
    """
    dq = producer.get(skip)
    if is_op(dq, "DequantizeLinear") and len(dq.input) == 3 and scalar_step(dq.input[1], dq.input[2], consts) is not None:
        return [dq.input[0], dq.input[1], dq.input[2]]
    found = _per_sample_skip(skip, producer, consts)
    return found[0] if found is not None else [skip]


def _per_sample_skip(skip: str, producer: dict[str, onnx.NodeProto],
                     consts: dict[str, onnx.TensorProto]) -> tuple[list[str], list[onnx.NodeProto]] | None:
    """([codes, steps, z], [Mul, DequantizeLinear, Reshape]) for an ASQ op's dequantized codes; else None.

    ``skip`` is ``Mul(DequantizeLinear(codes, 1, z), Reshape(steps))``, codes and steps an ASQ op's two outputs
    (onnxq/rewrite/asq_steps.py).
    """
    mul = producer.get(skip)
    if not is_op(mul, "Mul") or len(mul.input) != 2:
        return None
    dq, reshape = producer.get(mul.input[0]), producer.get(mul.input[1])
    if not is_op(dq, "DequantizeLinear") or not is_op(reshape, "Reshape") or len(dq.input) != 3:
        return None
    op = producer.get(dq.input[0])
    if op is None or op.domain != DOMAIN or len(op.output) != 2 or op.output[1] != reshape.input[0]:
        return None
    unit, zero = consts.get(dq.input[1]), consts.get(dq.input[2])
    if unit is None or zero is None or to_array(unit).size != 1 or float(to_array(unit).reshape(-1)[0]) != 1.0 or to_array(zero).size != 1:
        return None
    return [dq.input[0], reshape.input[0], dq.input[2]], [mul, dq, reshape]


def _fuse(graph: onnx.GraphProto, op: onnx.NodeProto, add: onnx.NodeProto, between: list[onnx.NodeProto], residual: list[str],
          readers: Counter[str], fixed: set[str]) -> None:
    """Give ``op`` the residual and the Add's output (and a Relu's behind it, as its clip); drop the Add, pair and Relu."""
    _set_inputs(op, dict(zip(range(RESIDUAL, RESIDUAL + len(residual)), residual, strict=True)))
    old = op.output[0]
    output = add.output[0]
    relu = next((n for n in graph.node if is_op(n, "Relu") and n.input[0] == output), None)
    if relu is not None and readers[output] == 1 and output not in fixed:
        op.attribute.append(helper.make_attribute("clip_min", 0.0))
        graph.node.remove(relu)
        output = relu.output[0]
    for node in (add, *between):
        graph.node.remove(node)
    op.output[0] = output
    for info in list(graph.value_info):
        if info.name == old:
            graph.value_info.remove(info)
    # the op now comes where the Add was, after the skip's producer: move it there to keep the order topological
    graph.node.remove(op)
    position = max((i for i, n in enumerate(graph.node) if set(n.output) & set(op.input)), default=-1) + 1
    graph.node.insert(position, op)


def _shape_of(name: str, shapes: dict[str, Shape], producer: dict[str, onnx.NodeProto]) -> tuple[Dim, ...] | None:
    """The declared shape of ``name``, or of the tensor a QuantizeLinear/DequantizeLinear chain in front of it reads."""
    node = producer.get(name)
    while name not in shapes and is_op(node, "QuantizeLinear", "DequantizeLinear"):
        name = node.input[0]
        node = producer.get(name)
    shape = shapes.get(name)
    return tuple(shape) if shape is not None else None


# ---- BatchNormalizations behind the ops into their affine maps


def _fuse_batch_norms(graph: onnx.GraphProto) -> int:
    """Fuse ``op [-> Q(s, z) -> DQ(s, z)] -> BatchNormalization`` into the op's affine map (inputs 11, 12); returns how many."""
    consts = constant_initializers(graph)
    fixed = {o.name for o in graph.output} | subgraph_reads(graph)
    readers = Counter(name for n in graph.node for name in n.input)
    producer = {out: n for n in graph.node for out in n.output}
    names = NameSource(graph)
    fused = 0
    for norm in [n for n in graph.node if is_op(n, "BatchNormalization")]:
        found = _affine_op(norm.input[0], producer, readers, consts, fixed)
        affine = _batch_norm_affine(norm, consts) if found is not None else None
        if affine is None or affine[0].shape[0] != _output_channels(found[0], consts):
            continue
        op, between = found
        if between:
            _clip_to_range(op, scalar_step(between[0].input[1], between[0].input[2], consts))
        scale, bias = names.fresh(f"{op.name}_post_scale"), names.fresh(f"{op.name}_post_bias")
        graph.initializer.extend([numpy_helper.from_array(affine[0], scale), numpy_helper.from_array(affine[1], bias)])
        _set_inputs(op, {POST_SCALE: scale, POST_BIAS: bias})
        old = op.output[0]
        op.output[0] = norm.output[0]
        for node in (norm, *between):
            graph.node.remove(node)
        for info in list(graph.value_info):
            if info.name == old:
                graph.value_info.remove(info)
        fused += 1
    return fused


def _affine_op(name: str, producer: dict[str, onnx.NodeProto], readers: Counter[str], consts: dict[str, onnx.TensorProto],
               fixed: set[str]) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """The onnxq op (float out, no affine map yet) whose output alone reaches ``name``, and the Q/DQ pair between."""
    found = _op_behind_pair(name, producer, readers, consts, fixed)
    if found is None or any(i for i in found[0].input[POST_SCALE:]) or (found[1] and attribute(found[0], "hardswish", 0)):
        return None  # (the pair's range becomes the clip, which comes before the hard swish)
    return found


def _clip_to_range(op: onnx.NodeProto, step: tuple[float, int]) -> None:
    """Narrow the op's clip to the range of the uint8 quantization (s, z) it loses, [-z * s, (255 - z) * s].

    The pair clamped the op's output to that range before the BatchNormalization (a Relu in front of a quantization
    with z = 0 is dropped as that clamp does its work: fold_clipping_into_quantize), so the op keeps the clamp.
    """
    s, z = np.float32(step[0]), np.float32(step[1])
    lo = max(float(attribute(op, "clip_min", -np.inf)), float((np.float32(0) - z) * s))
    hi = min(float(attribute(op, "clip_max", np.inf)), float((np.float32(255) - z) * s))
    for a in list(op.attribute):
        if a.name in ("clip_min", "clip_max"):
            op.attribute.remove(a)
    op.attribute.extend([helper.make_attribute("clip_min", lo), helper.make_attribute("clip_max", hi)])


def _output_channels(op: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> int | None:
    """M, the rows of the op's constant W (its output channels); None where W is not a constant."""
    w = consts.get(op.input[1])
    return int(w.dims[0]) if w is not None and len(w.dims) == 2 else None


def _batch_norm_affine(norm: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> tuple[np.ndarray, np.ndarray] | None:
    """(a, b), float32, with BatchNormalization(x) = x * a + b per channel; None unless it is inference form with constants.

    a = scale / sqrt(var + epsilon) and b = B - mean * a, in float64 (onnxruntime's own float32 steps may differ from
    the rounded result by an ulp).
    """
    if attribute(norm, "training_mode", 0) or len([o for o in norm.output if o]) != 1 or len(norm.input) != 5:
        return None
    values = [consts.get(name) for name in norm.input[1:]]
    if any(v is None for v in values):
        return None
    scale, bias, mean, var = (to_array(v).astype(np.float64).reshape(-1) for v in values)
    if not scale.size == bias.size == mean.size == var.size:
        return None
    a = scale / np.sqrt(var + float(attribute(norm, "epsilon", 1e-5)))
    b = bias - mean * a
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return None
    return a.astype(np.float32), b.astype(np.float32)
