"""The mean output shift of weights quantized for their inputs' covariance, moved into the layers' biases.

A weight row w rounded to q changes its output by (w - q) x. Over the data that change has a mean, (w - q) E[x], and
a part that varies, whose mean square is (w - q) C (w - q)^T with C = H - E[x] E[x]^T the covariance of the inputs.
A constant added to the output cancels the mean exactly, and a layer with a bias (or an Add after it) takes that
constant for free. So where the shift can be folded, the weights are quantized for C plus a quarter of E[x] E[x]^T
(MEAN_KEPT: the rounding spends little on the mean, not nothing) and the bias then absorbs -(w - q) E[x]: bias correction (Nagel et al., "Data-Free
Quantization", 2019) with the exact mean of the rows the layer multiplies (a convolution's patches, padding included).
Inputs after a Relu or a LayerNorm with a large mean make H mostly E[x] E[x]^T, which the plain rounding then spends
its effort on.

Weight-only quantization with data uses it (with activations, bias correction has its own stage). On the real models
of tools/eval_real_models.py at 4 bits (one-off, weights substituted in the float model): layout detector F1 86.7 ->
91.0, MiniLM embedding cosine 0.9891 -> 0.9896, orientation classifier output SQNR 53.3 -> 56.2 dB.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from scipy.linalg import blas

from onnxq.calibrate.bias_analytic import write_input
from onnxq.model.graph import NameSource, attribute, constant_initializers, consumers, to_array
from onnxq.plan.handlers import CONTRIB_DOMAIN
from onnxq.plan.weights import WeightPlan


@dataclass(frozen=True)
class ShiftSite:
    """Where a weight's mean output shift goes: its only reader, and the axis of the reader's output channels.

    ``kind``: "conv" (axis 1), "last" (the last axis: x @ W, Gemm), "columns" (axis -2: W @ x) or "attention"
    (onnxruntime's Attention: into its q, k, v bias).
    """

    node: onnx.NodeProto
    kind: str


def shift_sites(graph: onnx.GraphProto, plans: Iterable[WeightPlan]) -> dict[str, ShiftSite]:
    """The weights whose mean output shift can be folded: read by one main-graph node, a Conv, Gemm or MatMul.

    Or onnxruntime's Attention with a constant (or no) bias: its q, k, v projection's shift goes into that bias.
    """
    nodes = {n.name: n for n in graph.node}
    consts = constant_initializers(graph)
    out = {}
    for plan in plans:
        if len(plan.uses) != 1 or plan.uses[0].body_of or plan.tensor not in consts:
            continue
        use = plan.uses[0]
        node = nodes.get(use.node)
        kind = _kind(node, use.input_index, len(consts[plan.tensor].dims)) if node is not None else None
        if kind == "attention" and len(node.input) > 2 and node.input[2] and node.input[2] not in consts:
            continue  # a computed bias: nothing to fold the shift into (Attention's output is not x @ W)
        if kind is not None:
            out[plan.tensor] = ShiftSite(node, kind)
    return out


def _kind(node: onnx.NodeProto, input_index: int, rank: int) -> str | None:
    """How ``node``'s output channels lie, for a weight of ``rank`` at ``input_index``; None where no shift is folded."""
    if node.op_type == "Conv" and input_index == 1 and rank >= 3 and not node.domain:
        return "conv"
    if node.op_type == "Gemm" and input_index == 1 and not node.domain:
        return "last"
    if node.op_type == "MatMul" and rank == 2 and not node.domain:
        return "last" if input_index == 1 else "columns"
    if node.op_type == "Attention" and node.domain == CONTRIB_DOMAIN and input_index == 1 and rank == 2:
        return "attention"  # onnxruntime's fused attention: x @ W_qkv + bias (input 2), then the heads
    return None


#: The share of E[x] E[x]^T left in the matrix the rounding minimises: errors along the mean input still cost a quarter.
#: With none left (the covariance alone), the rounding moved much error onto the mean, exact after the fold on the
#: calibration data but not on an input whose activations are a scaled copy of the mean: one of 200 held-out images
#: took the orientation classifier's output SQNR from 56 to 38 dB (a one-off, weights substituted in the float model).
#: A quarter kept: 56.2 dB there, and most of the gain elsewhere (layout F1 91.0 against 92.3 with none kept and 86.2
#: with all, MiniLM cosine 0.9896 against 0.9900 and 0.9892).
MEAN_KEPT = 0.25


def centered(h: np.ndarray, mean: np.ndarray, kept: float = MEAN_KEPT, in_place: bool = False) -> np.ndarray:
    """H - (1 - ``kept``) E[x] E[x]^T per group, from ``h`` (groups, K, K) and ``mean`` (groups, K); ``kept`` 0: the covariance.

    ``in_place``: ``h`` itself (float64) is updated, where no other weight reads it: a copy of a wide layer's H costs its
    size in memory and, first touched, a good part of the layer's quantization time.
    """
    out = h if in_place and h.dtype == np.float64 else np.array(h, dtype=np.float64, order="C")
    for group, vector in zip(out, np.asarray(mean, dtype=np.float64), strict=True):  # a rank-one update (BLAS dger)
        column_major = group if group.flags.f_contiguous else group.T  # symmetric: either is the same matrix
        updated = blas.dger(-(1.0 - kept), vector, vector, a=column_major, overwrite_a=1)
        if not np.shares_memory(updated, group):  # BLAS worked on a copy after all (neither layout was contiguous)
            group[...] = updated
    return out


def mean_shift(delta_rows: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Per output channel, the mean output change (w - q) E[x] of weight changes ``delta_rows`` (R, K).

    The rows are split evenly among the groups of ``mean`` (groups, K), as the rows of a grouped convolution.
    """
    groups = mean.shape[0]
    per_group = len(delta_rows) // groups
    return np.einsum("rk,rk->r", np.asarray(delta_rows, dtype=np.float64), np.repeat(mean, per_group, axis=0))


def fold_shifts(graph: onnx.GraphProto, shifts: dict[str, tuple[ShiftSite, np.ndarray]]) -> None:
    """Subtract each weight's mean output shift (per output channel) from its reader's output, in place.

    Into the reader's bias where it has a constant one (Conv's, Gemm's C, Attention's q, k, v bias) or a constant bias
    Add follows it alone (a MatMul's); otherwise an Add after the reader. Biases are written as new initializers (a shared one stays as it is).
    """
    consts = constant_initializers(graph)
    readers = consumers(graph)
    names = NameSource(graph)
    added: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []
    for weight, (site, shift) in shifts.items():
        dtype = helper.tensor_dtype_to_np_dtype(consts[weight].data_type)
        node = site.node
        if site.kind == "conv":
            rank = len(consts[weight].dims)
            if _into_input(graph, node, 2, -shift, consts, names, dtype):
                continue
            added.append((node, _add_after(graph, node, -shift.reshape(-1, *([1] * (rank - 2))), names, dtype)))
        elif site.kind == "attention":
            _into_input(graph, node, 2, -shift, consts, names, dtype)  # a constant or missing bias (shift_sites checked)
        elif node.op_type == "Gemm":
            alpha, beta = float(attribute(node, "alpha", 1.0)), float(attribute(node, "beta", 1.0))
            if beta != 0.0 and _into_input(graph, node, 2, -shift * alpha / beta, consts, names, dtype):
                continue
            added.append((node, _add_after(graph, node, -shift * alpha, names, dtype)))
        elif site.kind == "last" and _into_following_add(graph, node, -shift, consts, readers, names, dtype):
            continue
        else:
            added.append((node, _add_after(graph, node, -shift if site.kind == "last" else -shift[:, None], names, dtype)))
    for node, add in added:
        graph.node.insert(list(graph.node).index(node) + 1, add)


def _into_input(
    graph: onnx.GraphProto, node: onnx.NodeProto, index: int, change: np.ndarray, consts: dict[str, onnx.TensorProto],
    names: NameSource, dtype: np.dtype,
) -> bool:
    """Add ``change`` to ``node``'s constant input ``index`` (a missing one is created); False where it is computed."""
    name = node.input[index] if len(node.input) > index else ""
    if name and name not in consts:
        return False
    write_input(graph, node, index, to_array(consts[name]).astype(np.float64) + change if name else change, names, "mean_shift", dtype)
    return True


def _into_following_add(
    graph: onnx.GraphProto, node: onnx.NodeProto, change: np.ndarray, consts: dict[str, onnx.TensorProto],
    readers: dict[str, list[onnx.NodeProto]], names: NameSource, dtype: np.dtype,
) -> bool:
    """Add ``change`` to the constant of the bias Add that alone reads ``node``'s output (a last-axis vector); False if none."""
    following = readers.get(node.output[0], [])
    if len(following) != 1 or following[0].op_type != "Add" or following[0].domain or node.output[0] in {o.name for o in graph.output}:
        return False
    add = following[0]
    other = 1 if add.input[0] == node.output[0] else 0
    name = add.input[other]
    if name not in consts or len(readers.get(name, [])) != 1:
        return False
    dims = tuple(consts[name].dims)
    if not dims or dims[-1] != len(change) or any(d != 1 for d in dims[:-1]):
        return False
    write_input(graph, add, other, to_array(consts[name]).astype(np.float64) + change, names, "mean_shift", dtype)
    return True


def _add_after(graph: onnx.GraphProto, node: onnx.NodeProto, change: np.ndarray, names: NameSource, dtype: np.dtype) -> onnx.NodeProto:
    """An Add of constant ``change`` to ``node``'s output, which the Add now writes under the output's name."""
    output = node.output[0]
    before = names.fresh(f"{output}_before_mean_shift")
    constant = names.fresh(f"{output}_mean_shift")
    graph.initializer.append(numpy_helper.from_array(np.asarray(change, dtype=dtype), constant))
    node.output[0] = before
    return helper.make_node("Add", [before, constant], [output], name=names.fresh(f"{node.name}_mean_shift"))
