"""Bias correction: remove the mean output shift that weight quantization causes.

Quantized weights W_q = W + D change a layer's output by D x, whose mean over the data is
D E[x]. With the input's channel means from calibration, subtracting that from the bias
removes the systematic part of the error (Nagel et al., "Data-Free Quantization", 2019,
whose data-free variant estimates E[x] from BatchNorm statistics instead). It matters most
where few weights feed each output, as in depthwise convolutions at 4 bits. Conv border
padding is ignored: the correction is exact for outputs whose window lies inside the input.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.model.graph import NameSource, attribute, constant_initializers, consumers, to_array


def conv_shift(delta: np.ndarray, mean: np.ndarray, group: int) -> np.ndarray:
    """Mean output change per output channel of a Conv whose weight changed by ``delta`` (M, C/group, k...)."""
    out_channels, per_group = delta.shape[0], delta.shape[1]
    summed = delta.reshape(out_channels, per_group, -1).sum(axis=2, dtype=np.float64)
    group_of = np.arange(out_channels) // (out_channels // group)
    inputs = mean.reshape(group, per_group)[group_of]  # (M, C/group): the input channels each output reads
    return np.sum(summed * inputs, axis=1)


def gemm_shift(delta: np.ndarray, mean: np.ndarray, trans_b: bool) -> np.ndarray:
    """Mean output change per output feature of A @ B (B changed by ``delta``; (N, K) when ``trans_b``)."""
    return delta.astype(np.float64) @ mean if trans_b else mean @ delta.astype(np.float64)


def correct_biases(graph: onnx.GraphProto, changes: dict[str, np.ndarray], means: dict[str, np.ndarray]) -> dict[str, str]:
    """Shift the bias of every Conv/Gemm whose weight changed (``changes``: weight name -> W_q - W).

    ``means`` maps activation tensors to their channel means (axis 1). A missing bias is added;
    a bias shared with another node is left alone. Returns, per corrected node's output, the
    name of its new bias initializer (read by that node only).
    """
    consts = constant_initializers(graph)
    readers = consumers(graph)
    names = NameSource(graph)
    corrected: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in changes:
            continue
        mean = means.get(node.input[0])
        shift = _shift(node, changes[node.input[1]], mean)
        if shift is None:
            continue
        bias_name = node.input[2] if len(node.input) > 2 else ""
        if bias_name and (bias_name not in consts or len(readers.get(bias_name, [])) != 1):
            continue
        bias = to_array(consts[bias_name]).astype(np.float64) if bias_name else np.zeros(shift.shape)
        if bias.shape != shift.shape:
            continue
        corrected[node.output[0]] = write_input(graph, node, 2, bias - shift, names, "corrected")
    return corrected


def write_input(graph: onnx.GraphProto, node: onnx.NodeProto, index: int, value: np.ndarray, names: NameSource, suffix: str,
                dtype: np.dtype = np.float32) -> str:
    """Point ``node``'s input ``index`` at a new initializer holding ``value``; returns its name.

    The name is the old input's (or the node's, with ``_bias``) plus ``suffix``; the old initializer stays for other
    readers. A missing input is added (after empty ones where the node has fewer inputs).
    """
    old = node.input[index] if len(node.input) > index else ""
    name = names.fresh(f"{old or node.name + '_bias'}_{suffix}")
    graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name
    return name


def _shift(node: onnx.NodeProto, delta: np.ndarray, mean: np.ndarray | None) -> np.ndarray | None:
    """The bias shift for one Conv/Gemm, or None when the shapes do not fit the simple model."""
    if mean is None:
        return None
    if node.op_type == "Conv":
        group = int(attribute(node, "group", 1))
        if delta.ndim < 3 or mean.size != delta.shape[1] * group or delta.shape[0] % group:
            return None
        return conv_shift(delta, mean, group)
    if attribute(node, "transA", 0) or delta.ndim != 2:
        return None
    trans_b = bool(attribute(node, "transB", 0))
    if mean.size != delta.shape[1 if trans_b else 0]:
        return None
    alpha, beta = float(attribute(node, "alpha", 1.0)), float(attribute(node, "beta", 1.0))
    if beta == 0.0:
        return None
    return gemm_shift(delta, mean, trans_b) * alpha / beta
