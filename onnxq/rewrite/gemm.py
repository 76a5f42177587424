"""Gemm and MatMul with a constant 2-D weight as IntConv/PostConv: y = x W (+ b) is a 1x1 convolution.

The op runs NCHW images, so the rows of x become the pixels of one image: x (..., K) is transposed
to (K, rows) and viewed as a (1, K, rows, 1) image, the op gives (1, M, rows, 1), and the inverse
view and transpose give y (..., M). One image with the rows along H lets the conv engine read its
weights once per panel of 64 rows; the rows as N samples of 1x1 pixels would run one GEMV per row,
which reads all the weights again for each (a one-off prototype ran it well below float where the image layout
runs well above; BENCHMARKS.md, development notes). The values are those of IntConv/PostConv on that image, so the
ops' definition (csrc/kernels/int_conv.h) is the definition: IntConv quantizes X dynamically per pixel
(x_steps="pixel"), and its pixels are the rows, so each row (a transformer's token) gets its own step and zero point;
PostConv (which has no per-pixel steps) quantizes X once over the whole tensor; with a given x_scale, one step. Then
the integer sums per row and the float epilogue per output column. Per-row steps because one step for all the tokens
lost fidelity on transformers: MiniLM at --format int, 4-bit weights only, embedding cosine 0.9838 per tensor, 0.9895
per row, at about the same speed (tools/eval_real_models.py's case; BENCHMARKS.md). Gemm's alpha multiplies the weight scales and beta the
bias C (float32, once at rewrite). A calibrated Q/DQ pair in front moves behind the first Transpose into the op's
x_scale/x_zero_point, and the op's x_steps goes (onnxq.rewrite.fusions.take_input_quantization); ASQ's per-sample
chain stays in float in front, since the image holds every row in one sample (the op then quantizes its output once
more, dynamically, per row).

Left as QDQ (a reason for each, in the layer report): Gemm with transA=1 or a bias C that is not
a constant row (scalar, (M,), (1, M)); MatMul whose input rank is unknown or below 2; a weight
read by both kinds of node (a Conv and a Gemm) or by Gemm/MatMul nodes that disagree on which axis
is the output; K over the ops' 65536 codes; and layers of fewer than MIN_WEIGHTS weights, whose
float Gemm costs no more than the op path's fixed cost (tools/bench_ops.py --skip-convs --skip-models measures them).

Measured (tools/bench_ops.py --skip-convs --skip-models, BENCHMARKS.md) but not made a rule: with a single row,
onnxruntime's MatMulNBits (4-bit QDQ with plain codes, which it fuses) is faster than IntConv 4-bit, while from 8 rows
on IntConv wins; the row count is usually a symbolic batch dimension at rewrite time, and onnxq's 4-bit QDQ may pick
sqrt codes, which onnxruntime cannot fuse. onnxruntime's dynamic uint8 x int8 MatMul (DynamicQuantizeMatMul) is
faster than IntConv on the shapes from 2^17 weights on; onnxq does not write that form (its QDQ is weight-only).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.model.graph import NameSource, attribute, text_attribute, to_array
from onnxq.native.domain import DOMAIN, INT_CONV

#: Gemm/MatMul layers with fewer weights (K * M) stay QDQ: there the op path's fixed cost (its layout
#: nodes and the pass that quantizes X, a few microseconds) is about what the float layer takes, so
#: `tools/bench_ops.py --skip-convs --skip-models` measures it at or below float and below onnxq's 4-bit QDQ;
#: from 512->512 on it is well above float.
MIN_WEIGHTS = 1 << 17

#: The ops' limit on codes per output channel (csrc/kernels/int_conv_impl.h, kMaxK).
MAX_K = 65536

GEMM_TYPES = ("Gemm", "MatMul")

#: IntConv's attribute x_steps and its value for a step per input pixel, here per row of x (csrc/kernels/int_conv.h).
X_STEPS, PIXEL_STEPS = "x_steps", "pixel"


def has_pixel_steps(node: onnx.NodeProto) -> bool:
    """Whether the op quantizes X with a step per pixel (per row of a Gemm/MatMul): x_steps="pixel"."""
    return text_attribute(node, X_STEPS, "tensor") == PIXEL_STEPS


def drop_pixel_steps(node: onnx.NodeProto) -> None:
    """Remove the op's x_steps attribute: it is for ops that quantize X dynamically, and x_scale is being given."""
    keep = [a for a in node.attribute if a.name != X_STEPS]
    del node.attribute[:]
    node.attribute.extend(keep)


def weight_is_rows(node: onnx.NodeProto) -> bool:
    """Whether the node's weight is stored (M, K), one row per output (Gemm transB=1), rather than (K, M)."""
    return node.op_type == "Gemm" and bool(attribute(node, "transB", 0))


def unsupported(node: onnx.NodeProto, weight_shape: tuple[int, ...], rank: int | None, consts: dict[str, onnx.TensorProto]) -> str | None:
    """Why this Gemm/MatMul cannot run as the op (None: it can); see the module docstring."""
    if len(weight_shape) != 2:
        return f"{node.op_type} weight of rank {len(weight_shape)} (the ops take a 2-D weight)"
    m, k = weight_shape if weight_is_rows(node) else weight_shape[::-1]
    if node.op_type == "Gemm" and attribute(node, "transA", 0):
        return "Gemm with transA=1"
    if node.op_type == "MatMul" and (rank is None or rank < 2):
        return "MatMul input of unknown rank" if rank is None else f"MatMul input of rank {rank}"
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and gemm_bias(node, consts, m) is None:
        return "Gemm bias C is not a constant row of M values"
    if k > MAX_K:
        return f"K = {k} is over the ops' {MAX_K} codes per output"
    if k * m < MIN_WEIGHTS:
        return f"{k}x{m} weight is under {MIN_WEIGHTS} weights: float/QDQ is faster there (tools/bench_ops.py)"
    return None


def gemm_bias(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto], m: int) -> np.ndarray | None:
    """The op's bias, beta * C as (M,) float32; None when C is absent, computed, or not a row broadcast over the rows."""
    name = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
    if not name or name not in consts:
        return None
    c = to_array(consts[name])
    if c.dtype != np.float32 or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or c.size not in (1, m):
        return None
    beta = np.float32(attribute(node, "beta", 1.0))
    return (np.broadcast_to(c.reshape(-1), (m,)) * beta).astype(np.float32)


def gemm_nodes(
    node: onnx.NodeProto,
    packed: str,
    scale: tuple[str, np.ndarray],
    op_type: str,
    bits: int,
    rank: int,
    consts: dict[str, onnx.TensorProto],
    names: NameSource,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """The nodes and new initializers that compute Gemm/MatMul ``node`` through the op, and the op's output.

    ``scale``: the weight's scale initializer and its values (M,); a Gemm with alpha != 1 gets its own, times alpha.

    x (..., K) -> Transpose -> (K, ...) [-> Flatten (K, rows)] -> Unsqueeze (1, K, rows, 1) -> op -> (1, M, rows, 1)
    -> Squeeze (M, rows) [-> Reshape (M, ...)] -> Transpose -> y (..., M)
    """
    scale_name, values = scale
    m = values.shape[0]
    base = node.name or node.output[0]
    fresh = names.fresh
    alpha = np.float32(attribute(node, "alpha", 1.0)) if node.op_type == "Gemm" else np.float32(1.0)
    inits = [numpy_helper.from_array(np.array([0, 3], np.int64), fresh(f"{base}_image_axes"))]
    if alpha != 1:
        inits.append(numpy_helper.from_array((values * alpha).astype(np.float32), fresh(f"{base}_scale")))
        scale_name = inits[-1].name
    image, op_out = fresh(f"{base}_image"), fresh(f"{base}_op")
    op_inputs = [image, packed, scale_name]
    bias = gemm_bias(node, consts, m)
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, fresh(f"{base}_bias")))
        op_inputs.append(inits[-1].name)
    columns = transposed = fresh(f"{base}_columns")
    nodes = [helper.make_node("Transpose", [node.input[0]], [columns], name=fresh(f"{base}_Transpose_in"), perm=[rank - 1, *range(rank - 1)])]
    if rank > 2:  # (K, B, S, ...) -> (K, rows)
        flat = fresh(f"{base}_columns_flat")
        nodes.append(helper.make_node("Flatten", [columns], [flat], name=fresh(f"{base}_Flatten"), axis=1))
        columns = flat
    nodes.append(helper.make_node("Unsqueeze", [columns, inits[0].name], [image], name=fresh(f"{base}_Unsqueeze")))
    steps = {"x_steps": PIXEL_STEPS} if op_type == INT_CONV else {}  # one step per row (see the module docstring)
    nodes.append(helper.make_node(op_type, op_inputs, [op_out], name=node.name, domain=DOMAIN, bits=bits, kernel_shape=[1, 1], **steps))
    nodes.extend(_output_nodes(transposed, op_out, node.output[0], m, rank, base, names, inits))
    return nodes, inits, op_out


def _output_nodes(
    columns_in: str, op_out: str, y: str, m: int, rank: int, base: str, names: NameSource, inits: list[onnx.TensorProto]
) -> list[onnx.NodeProto]:
    """(1, M, rows, 1) back to y (..., M): Squeeze to (M, rows), for rank > 2 Reshape to (M, B, S, ...), then Transpose.

    B, S, ... are read off ``columns_in``, x transposed to (K, B, S, ...), so that x itself has one reader (the first
    Transpose), which take_input_quantization can point at the tensor in front of x's quantization.
    """
    fresh = names.fresh
    axes = numpy_helper.from_array(np.array([0, 3], np.int64), fresh(f"{base}_out_axes"))
    inits.append(axes)
    columns = fresh(f"{base}_out_columns")
    nodes = [helper.make_node("Squeeze", [op_out, axes.name], [columns], name=fresh(f"{base}_Squeeze"))]
    if rank > 2:  # (M, rows) -> (M, B, S, ...): the leading dims read off x at run time
        shape, lead, target, split = fresh(f"{base}_x_shape"), fresh(f"{base}_lead"), fresh(f"{base}_out_shape"), fresh(f"{base}_out_split")
        consts = [
            numpy_helper.from_array(np.array([1], np.int64), fresh(f"{base}_start")),
            numpy_helper.from_array(np.array([rank], np.int64), fresh(f"{base}_end")),
            numpy_helper.from_array(np.array([m], np.int64), fresh(f"{base}_m")),
        ]
        inits.extend(consts)
        nodes += [
            helper.make_node("Shape", [columns_in], [shape], name=fresh(f"{base}_Shape")),
            helper.make_node("Slice", [shape, consts[0].name, consts[1].name], [lead], name=fresh(f"{base}_Slice")),
            helper.make_node("Concat", [consts[2].name, lead], [target], name=fresh(f"{base}_Concat"), axis=0),
            helper.make_node("Reshape", [columns, target], [split], name=fresh(f"{base}_Reshape_out")),
        ]
        columns = split
    nodes.append(helper.make_node("Transpose", [columns], [y], name=fresh(f"{base}_Transpose_out"), perm=[*range(1, rank), 0]))
    return nodes
