"""Float ops between onnxq's ops taken off the float path: MaxPool onto the codes, zero Pads into the op's padding.

CREPE's blocks (conv, ReLU, BatchNorm, max-pool by 2, a zero Pad, the next conv) ran ``Q -> DQ -> MaxPool -> Q -> DQ
-> Pad`` between two IntConvs, the second quantizing the padded floats again. Both rewrites compute the same values,
bit for bit:

- :func:`pool_codes`: ``Q(s1, z1) -> DQ(s1, z1) -> MaxPool -> Q(s2, z2)`` becomes ``Q(s1, z1) -> MaxPoolQ`` (onnxq's
  op, csrc/kernels/max_pool_q.h): dequantizing is monotonic, so the largest code of a window dequantizes to the
  window's largest value, and Q(D(q)) is a table of 256 codes. onnxruntime 1.32's own uint8 MaxPool is its generic
  pool (CREPE's first one, 128 channels, 256 -> 128 rows, 2x1: 225-300 us at batch 1 against 10 us for the float one
  in onnxruntime's NCHWc layout, its profiler, one thread), and two strided Slices and a Max took 188 us.
- :func:`fold_pads`: ``T -> Pad(0) -> op(x_scale s, x_zero_point z)`` becomes ``T -> op`` with the pads added to the
  op's own: the op quantizes 0 to z (round(0 / s) + z) and pads with z, so its codes are the same. Then, where ``T``
  is ``DQ(s, z)(q)`` with the op's own step, the op reads the uint8 codes ``q`` as they are (its quantization of
  DQ's values would give q back), which spares the DequantizeLinear's pass and the op's own.

Only for calibrated ops (a fixed step: a dynamic one would see the padding's zeros in X's range), constant-mode Pads
by zeros on H and W whose pads are constants or a short chain of nodes over constants (torch's export computes them
with ConstantOfShape, Concat, Slice, Transpose, Reshape and Cast), and MaxPools without padding, dilation or indices.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxq.model.graph import NameSource, attribute, constant_initializers, consumers, is_op, subgraph_reads, to_array
from onnxq.native.domain import CONV_OPS, DOMAIN, MAX_POOL_Q
from onnxq.rewrite.fusions import drop_unread_pairs, scalar_step

#: Input slots of IntConv/PostConv (csrc/kernels/int_conv.h): X, x_scale, x_zero_point.
X, X_SCALE, X_ZERO_POINT = 0, 4, 5
#: At most this many nodes computing a Pad's pads are evaluated (torch exports a chain of a few small ones).
PADS_CHAIN_NODES = 16


def pool_codes(graph: onnx.GraphProto) -> int:
    """Run each MaxPool between a DequantizeLinear and a QuantizeLinear of uint8 steps as MaxPoolQ on the codes; how many."""
    consts = constant_initializers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    readers = consumers(graph)
    fixed = {o.name for o in graph.output} | subgraph_reads(graph)
    names = NameSource(graph)
    pooled = 0
    for pool in [n for n in graph.node if is_op(n, "MaxPool")]:
        dq, after = producer.get(pool.input[0]), readers.get(pool.output[0], [])
        if not _plain_pool(pool) or not is_op(dq, "DequantizeLinear") or _uint8_step(dq, consts) is None:
            continue
        if len(after) != 1 or not is_op(after[0], "QuantizeLinear") or _uint8_step(after[0], consts) is None:
            continue
        if pool.output[0] in fixed:
            continue
        kernel = list(attribute(pool, "kernel_shape"))
        node = helper.make_node(MAX_POOL_Q, [dq.input[0], dq.input[1], dq.input[2], after[0].input[1], after[0].input[2]],
                                [after[0].output[0]], name=names.fresh(f"{pool.name or 'MaxPool'}_codes"), domain=DOMAIN,
                                kernel_shape=kernel, strides=list(attribute(pool, "strides", kernel)))
        graph.node.insert(list(graph.node).index(pool), node)
        graph.node.remove(pool)
        graph.node.remove(after[0])
        pooled += 1
    drop_unread_pairs(graph)
    return pooled


def _plain_pool(pool: onnx.NodeProto) -> bool:
    """A 2-D MaxPool with one output and no padding, dilation or ceil rounding: its windows hold only input values."""
    kernel = attribute(pool, "kernel_shape", None)
    strides = attribute(pool, "strides", None)
    pads = attribute(pool, "pads", None)
    dilations = attribute(pool, "dilations", None)
    return (
        kernel is not None and len(kernel) == 2 and (strides is None or len(strides) == 2)
        and len([o for o in pool.output if o]) == 1 and (pads is None or not any(pads)) and not attribute(pool, "ceil_mode", 0)
        and (dilations is None or all(d == 1 for d in dilations)) and attribute(pool, "auto_pad", b"NOTSET") in (b"NOTSET", b"VALID")
    )


def _uint8_step(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> tuple[float, int] | None:
    """(s, z) of a Quantize/DequantizeLinear with a constant positive float32 scalar scale and a uint8 scalar zero point."""
    return _positive(scalar_step(node.input[1], node.input[2], consts)) if len(node.input) >= 3 else None


def _positive(step: tuple[float, int] | None) -> tuple[float, int] | None:
    """``step`` where its scale is positive, else None."""
    return step if step is not None and step[0] > 0 else None


def fold_pads(graph: onnx.GraphProto, opset: int) -> int:
    """Fold zero Pads into the calibrated IntConv/PostConv that alone read them; each op then reads the codes of a DQ of its step.

    Returns how many Pads went into ops.
    """
    consts = constant_initializers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    readers = consumers(graph)
    fixed = {o.name for o in graph.output} | subgraph_reads(graph)
    folded: list[onnx.NodeProto] = []
    for op in [n for n in graph.node if _calibrated_op(n, consts)]:
        pad = producer.get(op.input[X])
        if is_op(pad, "Pad") and pad.output[0] not in fixed and all(_calibrated_op(r, consts) and list(r.input).count(pad.output[0]) == 1
                                                                     and r.input[X] == pad.output[0] for r in readers[pad.output[0]]):
            amounts = _zero_pads(pad, graph, producer, consts, opset)
            if amounts is not None:
                for reader in readers[pad.output[0]]:
                    _add_pads(reader, amounts)
                    reader.input[X] = pad.input[0]
                folded.append(pad)
        _read_codes(op, producer, consts)
    _drop_dead(graph, folded, producer)
    drop_unread_pairs(graph)
    return len(folded)


def _calibrated_op(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> bool:
    """An IntConv/PostConv quantizing X with one constant step (inputs x_scale, x_zero_point)."""
    if node.domain != DOMAIN or node.op_type not in CONV_OPS or len(node.input) <= X_ZERO_POINT:
        return False
    s, z = consts.get(node.input[X_SCALE]), consts.get(node.input[X_ZERO_POINT])
    return s is not None and z is not None and int(np.prod(s.dims)) == 1 and int(np.prod(z.dims)) == 1


def _zero_pads(pad: onnx.NodeProto, graph: onnx.GraphProto, producer: dict[str, onnx.NodeProto],
               consts: dict[str, onnx.TensorProto], opset: int) -> list[int] | None:
    """[top, left, bottom, right] of a constant-mode Pad of a 4-D tensor by zeros on H and W only; None otherwise."""
    mode = attribute(pad, "mode", b"constant")
    if mode not in (b"constant", "constant"):
        return None
    if opset < 11:
        pads, value = attribute(pad, "pads", None), attribute(pad, "value", 0.0)
    else:
        if len(pad.input) > 3 and pad.input[3]:
            return None  # (axes: not written by the exporters whose Pads this is for)
        pads = _constant_value(pad.input[1], graph, producer, consts, opset)
        value = 0.0
        if len(pad.input) > 2 and pad.input[2]:
            given = _constant_value(pad.input[2], graph, producer, consts, opset)
            value = None if given is None or given.size != 1 else float(given.reshape(-1)[0])
    if pads is None or value != 0.0:
        return None
    pads = [int(v) for v in np.asarray(pads).reshape(-1)]
    if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
        return None
    return [pads[2], pads[3], pads[6], pads[7]]


def _constant_value(name: str, graph: onnx.GraphProto, producer: dict[str, onnx.NodeProto],
                    consts: dict[str, onnx.TensorProto], opset: int) -> np.ndarray | None:
    """The value of ``name`` where it is a constant or a short chain of nodes over constants (evaluated), else None."""
    if name in consts:
        return to_array(consts[name])
    chain: list[onnx.NodeProto] = []
    todo, seen = [name], set()
    while todo:
        tensor = todo.pop()
        if tensor in seen or tensor in consts or not tensor:
            continue
        seen.add(tensor)
        node = producer.get(tensor)
        if node is None or node.domain not in ("", "ai.onnx") or any(True for _ in _subgraph_attributes(node)):
            return None
        if node not in chain:
            chain.append(node)
        if len(chain) > PADS_CHAIN_NODES:
            return None
        todo.extend(node.input)
    from onnx.reference import ReferenceEvaluator

    order = [n for n in graph.node if n in chain]  # (topological, as the graph is)
    leaves = sorted({i for n in order for i in n.input if i in consts})
    try:
        evaluator = ReferenceEvaluator(
            helper.make_model(helper.make_graph(order, "pads", [], [helper.make_tensor_value_info(name, 0, None)],
                                                initializer=[consts[i] for i in leaves]),
                              opset_imports=[helper.make_opsetid("", opset)])
        )
        return np.asarray(evaluator.run(None, {})[0])
    except Exception:  # (anything it cannot evaluate stays a Pad)
        return None


def _subgraph_attributes(node: onnx.NodeProto):
    """The node's graph attributes (If/Loop/Scan bodies)."""
    return (a for a in node.attribute if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS))


def _add_pads(op: onnx.NodeProto, amounts: list[int]) -> None:
    """Add [top, left, bottom, right] to the op's pads attribute."""
    pads = list(attribute(op, "pads", [0, 0, 0, 0]))
    for a in list(op.attribute):
        if a.name == "pads":
            op.attribute.remove(a)
    op.attribute.append(helper.make_attribute("pads", [p + q for p, q in zip(pads, amounts, strict=True)]))


def _read_codes(op: onnx.NodeProto, producer: dict[str, onnx.NodeProto], consts: dict[str, onnx.TensorProto]) -> None:
    """``q -> DQ(s, z) -> op(s, z)`` reads the uint8 codes q as they are: the op's quantization of DQ's values gives q back.

    ((q - z) * s) / s is within 255 * 2^-23 of q - z in float32, so it rounds to q - z: the same codes, and one
    float pass less. (Reading the float tensor in front of a Q -> DQ pair instead would save that pass too, but a
    float MaxPool that then feeds the op straight away loses onnxruntime's NCHWc kernel: CREPE's first one took 225 us
    instead of 10 at batch 1, onnxruntime's profiler.)
    """
    dq = producer.get(op.input[X])
    if not is_op(dq, "DequantizeLinear"):
        return
    own = _op_step(op, consts)
    if own is not None and _uint8_step(dq, consts) == own:
        op.input[X] = dq.input[0]


def _op_step(op: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> tuple[float, int] | None:
    """The op's (x_scale, x_zero_point) as numbers (a positive float32 scale, a uint8 zero point)."""
    return _positive(scalar_step(op.input[X_SCALE], op.input[X_ZERO_POINT], consts))


def _drop_dead(graph: onnx.GraphProto, pads: list[onnx.NodeProto], producer: dict[str, onnx.NodeProto]) -> None:
    """Remove the folded Pads and the nodes in front of them that nothing reads any more (their pads' chains)."""
    fixed = {o.name for o in graph.output} | subgraph_reads(graph)
    todo = list(pads)
    while todo:
        node = todo.pop()
        if node not in graph.node or node.domain not in ("", "ai.onnx"):
            continue
        read = {name for n in graph.node for name in n.input}
        if any(out in read or out in fixed for out in node.output):
            continue
        graph.node.remove(node)
        todo.extend(producer[name] for name in node.input if name in producer)
