"""Fusions after the rewrite: Relu/Clip folded into what follows them, and onnxq's ops taking their input's quantization.

- A Relu/Clip before a fixed-scale QuantizeLinear that saturates within its bounds is dropped
  (:func:`fold_clipping_into_quantize`).
- onnxruntime fuses a float Conv with the Relu or Clip after it, but cannot fuse them into a custom op, so an IntConv/
  PostConv whose output only a Relu or a Clip with constant bounds reads takes the bounds as its clip_min / clip_max
  attributes and replaces it (:func:`fold_clipping_into_ops`).
- A hard swish (HardSwish, or HardSigmoid and the Mul of its input by it: PP-LCNet's and MobileNetV3's activation)
  that alone reads such an op's output, behind the pair the placement put there for onnxruntime's kernels or not, goes
  into the op's epilogue as its hardswish attributes (:func:`fold_hard_swish_into_ops`).
- An IntConv/PostConv behind a quantize-dequantize pair (or ASQ's per-sample chain) takes the pair's step and quantizes
  its input itself (:func:`take_input_quantization`).

Both folds read Relu/Clip bounds the same way (:func:`clip_bounds`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from onnxq.calibrate.result import ActivationQuant
from onnxq.model.graph import attribute, constant_initializers, consumers, is_op, remove_unused_initializers, subgraph_reads, to_array
from onnxq.native.domain import CONV_OPS, DOMAIN, MAX_POOL_Q
from onnxq.rewrite.gemm import drop_pixel_steps


def fold_clipping_into_quantize(graph: onnx.GraphProto, quants: Mapping[str, ActivationQuant]) -> int:
    """Drop a Relu/Clip whose output only feeds its fixed-scale QuantizeLinear and whose bounds the range lies within.

    QuantizeLinear saturates at the ends of its range, so clipping to wider bounds first changes nothing.
    onnxruntime folds these itself, but its Clip folding fails on 4-bit zero points, so the rewrite does it (as
    onnxruntime's own quantizer does). Returns how many were dropped.
    """
    consts = constant_initializers(graph)
    readers = consumers(graph)
    outputs = {o.name for o in graph.output}
    drop: list[onnx.NodeProto] = []
    for node in graph.node:
        quant = quants.get(node.output[0]) if node.output else None
        if quant is None or quant.adapter is not None or node.output[0] in outputs:
            continue
        users = readers.get(node.output[0], [])
        bounds = clip_bounds(node, consts)
        if bounds is None or len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        lo, hi = quant.params.value_range
        if (bounds[0] is not None and lo < bounds[0]) or (bounds[1] is not None and hi > bounds[1]):
            continue
        users[0].input[0] = node.input[0]
        drop.append(node)
    for node in drop:
        graph.node.remove(node)
    return len(drop)


def fold_clipping_into_ops(graph: onnx.GraphProto) -> int:
    """Fold into each IntConv/PostConv the Relu or Clip that alone reads its output; returns how many.

    ``op -> y -> Relu -> r`` becomes ``op(clip_min=0) -> r`` (Clip: its constant bounds, opset 11+ inputs or the
    attributes before; an absent bound stays absent), so readers of r are unchanged. The op clips after its
    epilogue exactly as Relu/Clip would (int_conv.h). Left alone: an op output that is a graph output or has
    other readers (a subgraph's included), a Clip whose bounds are not constant scalars, or are NaN or crossed
    (ONNX's Clip then gives max; the op rejects them), and an op that has bounds already.
    """
    consts = constant_initializers(graph)
    readers = consumers(graph)
    outer = subgraph_reads(graph)
    outputs = {o.name for o in graph.output}
    drop: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type not in CONV_OPS or attribute(node, "clip_min") is not None:
            continue
        if attribute(node, "clip_max") is not None or attribute(node, "hardswish") is not None:  # (the clip comes first)
            continue
        y = node.output[0]
        users = readers.get(y, [])
        if y in outputs or y in outer or len(users) != 1:
            continue
        bounds = clip_bounds(users[0], consts)
        if bounds is None:
            continue
        activation = users[0]
        for name, value in zip(("clip_min", "clip_max"), bounds, strict=True):
            if value is not None:
                node.attribute.append(helper.make_attribute(name, value))
        node.output[0] = activation.output[0]
        _move_declaration(graph, y, activation.output[0])
        drop.append(activation)
    for node in drop:
        graph.node.remove(node)
    return len(drop)


#: ONNX HardSwish's alpha and beta (float32), and HardSigmoid's defaults.
HARD_SWISH = (float(np.float32(1 / 6)), 0.5)
HARD_SIGMOID_DEFAULTS = (0.2, 0.5)


def fold_hard_swish_into_ops(graph: onnx.GraphProto) -> int:
    """Fold into each IntConv/PostConv the hard swish that alone reads its output; returns how many.

    ``op -> y [-> QuantizeLinear -> DequantizeLinear] -> HardSwish -> h`` (or ``HardSigmoid(y') -> t, Mul(y', t) -> h``)
    becomes ``op(hardswish=1, hardswish_alpha, hardswish_beta) -> h``: the op applies y * clip(alpha y + beta, 0, 1)
    after its clip (int_conv.h). The pair, placed at a layer output for onnxruntime's integer kernels, goes with it: the
    op computes the swish from its exact output instead of that output's codes, within a code of the pair's result
    where it matters, and the uint8 chains then link the op straight to the next one. Left alone: any tensor on the way
    that is a graph output or has another reader (a subgraph's included), and an op that has a swish already.
    """
    readers = consumers(graph)
    fixed = {o.name for o in graph.output} | subgraph_reads(graph)
    drop: list[onnx.NodeProto] = []
    folded = 0
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type not in CONV_OPS or attribute(node, "hardswish") is not None:
            continue
        found = _hard_swish_after(node.output[0], readers, fixed)
        if found is None:
            continue
        (alpha, beta), taken, out = found
        node.attribute.extend([helper.make_attribute("hardswish", 1), helper.make_attribute("hardswish_alpha", alpha),
                               helper.make_attribute("hardswish_beta", beta)])
        _move_declaration(graph, node.output[0], out)
        node.output[0] = out
        drop.extend(taken)
        folded += 1
    for node in drop:
        graph.node.remove(node)
    if drop:
        remove_unused_initializers(graph)
    return folded


def _hard_swish_after(
    y: str, readers: Mapping[str, list[onnx.NodeProto]], fixed: set[str]
) -> tuple[tuple[float, float], list[onnx.NodeProto], str] | None:
    """(alpha, beta), the nodes from ``y`` to the hard swish's output, and that output; None where ``y`` feeds no lone swish."""

    def only(name: str) -> list[onnx.NodeProto]:
        return [] if name in fixed else readers.get(name, [])

    taken: list[onnx.NodeProto] = []
    users = only(y)
    if len(users) == 1 and is_op(users[0], "QuantizeLinear"):
        dq = only(users[0].output[0])
        if len(dq) != 1 or not is_op(dq[0], "DequantizeLinear"):
            return None
        taken, y = [users[0], dq[0]], dq[0].output[0]
        users = only(y)
    if y in fixed:
        return None
    if len(users) == 1 and is_op(users[0], "HardSwish"):
        return HARD_SWISH, [*taken, users[0]], users[0].output[0]
    if len(users) != 2:
        return None
    sigmoid = next((u for u in users if is_op(u, "HardSigmoid")), None)
    mul = next((u for u in users if is_op(u, "Mul")), None)
    if sigmoid is None or mul is None or sorted(mul.input) != sorted([y, sigmoid.output[0]]) or only(sigmoid.output[0]) != [mul]:
        return None
    alpha, beta = (float(attribute(sigmoid, name, default)) for name, default in zip(("alpha", "beta"), HARD_SIGMOID_DEFAULTS, strict=True))
    return (alpha, beta), [*taken, sigmoid, mul], mul.output[0]


def clip_bounds(node: onnx.NodeProto, consts: Mapping[str, onnx.TensorProto]) -> tuple[float | None, float | None] | None:
    """(min, max) that a Relu, or a Clip with constant scalar float32 bounds, enforces (None: that side unbounded).

    None for anything else: another op, a bound that is computed, not a scalar or not float32, NaN bounds or crossed
    ones (ONNX's Clip then gives max; onnxq's ops reject them). Clip's bounds are inputs from opset 11, attributes before.
    """
    if is_op(node, "Relu") and len(node.input) == 1:
        return 0.0, None
    if not is_op(node, "Clip") or not node.input:
        return None
    bounds: list[float | None] = [None, None]
    for index in (1, 2):
        name = node.input[index] if len(node.input) > index else ""
        if not name:
            continue
        if name not in consts:
            return None
        value = to_array(consts[name])
        if value.size != 1 or value.dtype != np.float32:
            return None
        bounds[index - 1] = float(value.reshape(-1)[0])
    for attr in node.attribute:
        if attr.name in ("min", "max"):
            bounds[0 if attr.name == "min" else 1] = float(np.float32(attr.f))
    lo, hi = bounds
    if any(b is not None and np.isnan(b) for b in bounds) or lo is not None and hi is not None and lo > hi:
        return None
    return lo, hi


def _move_declaration(graph: onnx.GraphProto, old: str, new: str) -> None:
    """The op's output is now ``new``: give it ``old``'s declared shape where it has none, and drop ``old``'s entry."""
    infos = {info.name: info for info in graph.value_info}
    declared = infos.get(old)
    if declared is None:
        return
    if new not in infos and new not in {o.name for o in graph.output}:
        declared.name = new
        return
    graph.value_info.remove(declared)


def take_input_quantization(graph: onnx.GraphProto) -> int:
    """Let each IntConv/PostConv quantize its input with the uint8 step of the quantization in front of it.

    A fixed pair ``X -> QuantizeLinear(s, z) -> DequantizeLinear(s, z) -> op`` becomes ``X -> op(x_scale=s,
    x_zero_point=z)`` (``MaxPoolQ -> DequantizeLinear(s, z) -> op``: the op reads the pool's uint8 codes with (s, z));
    ASQ's per-sample chain ``X -> Div(r) -> QuantizeLinear(1, z) -> DequantizeLinear(1, z) ->
    Mul(r) -> op``, r = Reshape(steps) with one step per sample (rewrite_activations), becomes ``X -> op(x_scale=steps,
    x_zero_point=z)``; a Gemm/MatMul op's layout in front of it (rewrite_gemm) reads X instead of the pair and the op
    takes (s, z); it drops its per-row steps (x_steps, which the op allows only without x_scale). The op's own
    quantization is the same formula, so the codes are the same and the integer path
    no longer goes through float. The pair or chain stays while others read it. Returns how many ops took a step.
    """
    consts = constant_initializers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    taken = 0
    chains: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type not in CONV_OPS or len(node.input) > 4:
            continue
        dq = producer.get(node.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and len(dq.input) >= 3 and _uint8_scalar_pair(dq, consts):
            x, x_scale, x_zero_point = q.input[0], dq.input[1], dq.input[2]
        elif q is not None and q.domain == DOMAIN and q.op_type == MAX_POOL_Q and len(dq.input) >= 3 and _uint8_scalar_pair(dq, consts):
            x, x_scale, x_zero_point = dq.input[0], dq.input[1], dq.input[2]  # the pool's uint8 codes, read as they are
        elif (layout := _gemm_layout(node.input[0], producer, consts)) is not None:
            first, (x, x_scale, x_zero_point) = layout
            first.input[0] = x  # the layout reads X; the op keeps its input and takes the step
            node.input.extend([""] * (4 - len(node.input)) + [x_scale, x_zero_point])
            drop_pixel_steps(node)
            taken += 1
            continue
        elif (chain := _per_sample_chain(node.input[0], producer, consts)) is not None:
            x, x_scale, x_zero_point = chain[0]
            chains.extend(chain[1])
        else:
            continue
        bias = node.input[3] if len(node.input) > 3 else ""
        del node.input[3:]
        node.input[0] = x
        node.input.extend([bias, x_scale, x_zero_point])
        drop_pixel_steps(node)
        taken += 1
    drop_unread(graph, chains)
    drop_unread_pairs(graph)
    return taken


def _gemm_layout(
    name: str, producer: dict[str, onnx.NodeProto], consts: dict[str, onnx.TensorProto]
) -> tuple[onnx.NodeProto, tuple[str, str, str]] | None:
    """The first node of a Gemm/MatMul op's input layout (rewrite_gemm) and (X, s, z) when a fixed pair Q/DQ(s, z) feeds it.

    ``X -> Q(s, z) -> DQ(s, z) -> Transpose [-> Flatten] -> Unsqueeze -> op``: one step for the whole tensor, so quantizing
    commutes with the layout, and the op can quantize X's transposed values with (s, z) and get the same codes.
    """
    node = producer.get(name)
    if not is_op(node, "Unsqueeze"):
        return None
    while node is not None and (is_op(node, "Unsqueeze") or is_op(node, "Flatten")):
        node = producer.get(node.input[0])
    if not is_op(node, "Transpose"):
        return None
    dq = producer.get(node.input[0])
    q = producer.get(dq.input[0]) if is_op(dq, "DequantizeLinear") else None
    if not is_op(q, "QuantizeLinear") or len(dq.input) < 3 or not _uint8_scalar_pair(dq, consts):
        return None
    return node, (q.input[0], dq.input[1], dq.input[2])


def _per_sample_chain(
    name: str, producer: dict[str, onnx.NodeProto], consts: dict[str, onnx.TensorProto]
) -> tuple[tuple[str, str, str], list[onnx.NodeProto]] | None:
    """(X, steps, zero point) and the chain's nodes, Mul first, when ``name`` is the output of ASQ's per-sample chain.

    The chain is ``Mul(DequantizeLinear(QuantizeLinear(Div(X, r), 1, z), 1, z), r)`` with scalar unit scales, one
    uint8 scalar zero point z, and r = Reshape(steps, [0 or -1, 1 or -1, 1, 1]): one step per sample, broadcast over
    the channels (the op checks that steps has one element per sample, or one).
    """
    mul = producer.get(name)
    if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    unit, r = mul.input if is_op(producer.get(mul.input[0]), "DequantizeLinear") else reversed(mul.input)
    dq = producer.get(unit)
    if not is_op(dq, "DequantizeLinear"):
        return None
    q = producer.get(dq.input[0])
    div = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
    reshape = producer.get(r)
    if div is None or div.op_type != "Div" or div.input[1] != r or reshape is None or reshape.op_type != "Reshape":
        return None
    if len(dq.input) < 3 or len(q.input) < 3 or not _uint8_scalar_pair(dq, consts) or not _uint8_scalar_pair(q, consts):
        return None
    if not all(to_array(consts[p.input[1]]) == 1 for p in (q, dq)) or to_array(consts[q.input[2]]) != to_array(consts[dq.input[2]]):
        return None
    shape = consts.get(reshape.input[1]) if len(reshape.input) > 1 else None
    target = [int(v) for v in to_array(shape).reshape(-1)] if shape is not None else []
    if len(target) != 4 or target[0] not in (0, -1) or target[1] not in (1, -1) or target[2:] != [1, 1] or target[:2] == [-1, -1]:
        return None
    return (div.input[0], reshape.input[0], dq.input[2]), [mul, dq, q, div, reshape]


def drop_unread(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Remove those of ``nodes`` (readers before the nodes they read) whose outputs nobody reads (subgraphs included)."""
    readers = Counter(name for node in graph.node for name in node.input)
    fixed = {o.name for o in graph.output} | subgraph_reads(graph)
    removed: set[int] = set()
    for node in nodes:
        if id(node) in removed or any(readers[out] or out in fixed for out in node.output):
            continue
        graph.node.remove(node)
        removed.add(id(node))
        readers.subtract(node.input)


def scalar_step(scale: str, zero_point: str, consts: Mapping[str, onnx.TensorProto]) -> tuple[float, int] | None:
    """(s, z) of a constant float32 scale and uint8 zero point of one element each; None otherwise."""
    s, z = consts.get(scale), consts.get(zero_point)
    if s is None or z is None or s.data_type != onnx.TensorProto.FLOAT or z.data_type != onnx.TensorProto.UINT8:
        return None
    if int(np.prod(s.dims)) != 1 or int(np.prod(z.dims)) != 1:
        return None
    return float(to_array(s).reshape(-1)[0]), int(to_array(z).reshape(-1)[0])


def _uint8_scalar_pair(dq: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> bool:
    """Whether a DequantizeLinear has a constant scalar scale and a uint8 scalar zero point."""
    scale, zero = consts.get(dq.input[1]), consts.get(dq.input[2])
    return (
        scale is not None and zero is not None and not scale.dims and not zero.dims
        and scale.data_type == onnx.TensorProto.FLOAT and zero.data_type == onnx.TensorProto.UINT8
    )


def drop_unread_pairs(graph: onnx.GraphProto) -> None:
    """Remove DequantizeLinear nodes nobody reads, then QuantizeLinear nodes nobody reads."""
    drop_unread(graph, [n for op_type in ("DequantizeLinear", "QuantizeLinear") for n in graph.node if n.op_type == op_type])
    remove_unused_initializers(graph)
