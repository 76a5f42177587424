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

from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.model.graph import NameSource, attribute, constant_initializers, consumers, declared_shapes, is_op, to_array
from onnxq.native.domain import DOMAIN

#: Sets an op's inputs at the given slots (chains._set_inputs).
SetInputs = Callable[[onnx.NodeProto, dict[int, str]], None]

#: Input slots of the ops (csrc/kernels/int_conv.h): X's step and zero point, Y's, the affine map and ASQ's adapter.
X_SCALE, X_ZERO_POINT, Y_SCALE, Y_ZERO_POINT, POST_SCALE, POST_BIAS, ASQ_WEIGHT, ASQ_LOG = 4, 5, 6, 7, 11, 12, 13, 14


@dataclass
class _Adapter:
    """One tensor's adapter as the graph writes it: its nodes, and the values the op takes."""

    nodes: list[onnx.NodeProto]  # ReduceMean, Gemm, Clip, Exp, Mul (steps = the Mul's output)
    steps: str
    weight: np.ndarray  # (C,)
    log: np.ndarray     # (b, lo, hi), float32
    scale: str          # the one-element channel step s


def fuse_asq_steps(graph: onnx.GraphProto, float_ops: dict[str, str], set_inputs: SetInputs) -> int:
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


def _declare(graph: onnx.GraphProto, float_name: str, codes: str, steps: str | None, shape: list | None) -> None:
    """The op's outputs now: uint8 codes of the float output's shape, and the (N,) steps (if any)."""
    for info in list(graph.value_info):
        if info.name in (float_name, steps):
            graph.value_info.remove(info)
    graph.value_info.append(helper.make_tensor_value_info(codes, onnx.TensorProto.UINT8, shape))
    if steps is not None:
        graph.value_info.append(helper.make_tensor_value_info(steps, onnx.TensorProto.FLOAT, [shape[0] if shape else None]))


def op_behind_channel_pair(name: str, producer: dict[str, onnx.NodeProto], readers: Counter[str], consts: dict[str, onnx.TensorProto],
                           fixed: set[str], float_op_types: Collection[str]) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """The onnxq op (float out) in front of ASQ's fixed per-channel pair at ``name``, and the pair's four nodes.

    ``Mul(DequantizeLinear(QuantizeLinear(Div(op output, r), 1, z_c), 1, z_c), r)``, r one constant step per channel
    (onnxq/rewrite/activations.py: ASQ kept fixed steps for a tensor no integer op reads, e.g. a residual branch),
    each node read only by the next. None for anything else, adaptive steps included (their adapter reads the op too).
    """
    mul = producer.get(name)
    if not is_op(mul, "Mul") or len(mul.input) != 2:
        return None
    dq = producer.get(mul.input[0])
    q = producer.get(dq.input[0]) if is_op(dq, "DequantizeLinear") else None
    div = producer.get(q.input[0]) if is_op(q, "QuantizeLinear") else None
    if not is_op(div, "Div") or mul.input[1] not in consts or div.input[1] != mul.input[1]:
        return None
    chain = [mul, dq, q, div]
    if any(readers[n.output[0]] != 1 or n.output[0] in fixed for n in chain[1:]):
        return None
    node = producer.get(div.input[0])
    if node is None or node.domain != DOMAIN or node.op_type not in float_op_types or readers[node.output[0]] != 1 or node.output[0] in fixed:
        return None
    return node, chain


def write_channel_codes(graph: onnx.GraphProto, float_ops: dict[str, str], set_inputs: SetInputs) -> list[tuple[str, str]]:
    """Let each float op in front of ASQ's fixed per-channel pair read by float nodes write the pair's codes (in place).

    ``op -> Div(r) -> QuantizeLinear(1, z_c) -> DequantizeLinear(1, z_c) -> Mul(r) -> readers`` (r, z_c per channel)
    becomes ``op(uint8 Y) -> DequantizeLinear(r_c, z_c, axis 1) -> readers``: the op maps its y to y * (1 / r_c) + z_c
    (its per-channel affine map, inputs post_scale and post_bias) and quantizes that with step 1 and zero point 0,
    which gives the pair's codes round(y / r_c) + z_c (clamped to 0-255) but where the reciprocal or the sum's
    rounding puts a value on the other side of a rounding tie (then one code off). Four float passes over the tensor
    (onnxruntime quantizes per axis slowly) become one. Not where the op has an affine map already, nor for a pair
    a residual Add reads (chains.py fuses that Add into the op instead). Returns (op name, readers) of each.
    """
    consts = constant_initializers(graph)
    readers = Counter(name for n in graph.node for name in n.input)
    producer = {out: n for n in graph.node for out in n.output}
    fixed = {o.name for o in graph.output}
    shapes = declared_shapes(graph)
    names = NameSource(graph)
    done = []
    for mul in [n for n in graph.node if is_op(n, "Mul")]:
        found = op_behind_channel_pair(mul.output[0], producer, readers, consts, fixed, float_ops)
        if found is None or any(i for i in found[0].input[POST_SCALE:]):
            continue
        op, (_, dequantize, quantize, div) = found
        step = to_array(consts[div.input[1]]).reshape(-1).astype(np.float32)
        zero_points = to_array(consts[quantize.input[2]]).reshape(-1)
        if step.size != _channels(op, consts) or zero_points.size != step.size or zero_points.dtype != np.uint8:
            continue
        float_name, codes = op.output[0], names.fresh(f"{op.output[0]}_uint8")
        inits = {"post_scale": (np.float32(1) / step), "post_bias": zero_points.astype(np.float32),
                 "scale": step, "unit": np.array(1.0, np.float32), "zero": np.array(0, np.uint8)}
        inits = {key: _initializer(graph, names.fresh(f"{op.name}_channel_codes_{key}"), value) for key, value in inits.items()}
        op.op_type = float_ops[op.op_type]
        set_inputs(op, {Y_SCALE: inits["unit"], Y_ZERO_POINT: inits["zero"], POST_SCALE: inits["post_scale"], POST_BIAS: inits["post_bias"]})
        op.output[0] = codes
        dequantize.input[:] = [codes, inits["scale"], quantize.input[2]]
        dequantize.output[0] = mul.output[0]
        for node in (div, quantize, mul):
            graph.node.remove(node)
        _declare(graph, float_name, codes, None, shapes.get(float_name))
        reader_types = sorted({n.op_type for n in graph.node if mul.output[0] in n.input})
        done.append((op.name, " and ".join(reader_types) or "nothing"))
    return done


def _initializer(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name
