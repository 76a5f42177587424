"""Activation-weight equalization: layer inputs with outlier channels divided by s, the weight rows multiplied by s.

The float model computes the same; what changes is what gets quantized. A transformer's hidden states carry a few
channels tens of times larger than the rest (a LayerNorm's gain, the residual stream): one uint8 step for the whole
tensor then leaves the ordinary channels a handful of codes, and a BERT-style encoder lost its output at W8A8.
Moving part of each channel's range into the weights, whose per-channel scales absorb it (the idea of SmoothQuant,
Xiao et al. 2023), balances the two errors. The division is a Mul node in front of the quantized layers only (other
readers, e.g. a residual path, keep the original tensor), since in a post-LayerNorm encoder the normalised output
also feeds the residual sum and cannot be rescaled at its source.

How much to move is chosen per tensor, s_c = a_c**alpha / w_c**(1 - alpha) (a_c the channel's largest magnitude
in the calibration samples, w_c the largest weight of row c), with alpha from a short grid by an estimate of the
layers' output noise: the activation step squared times the scaled weights' energy, plus each output column's
weight step squared times the scaled activations' energy. Equalization is applied only where that estimate falls
by more than half (3 dB); elsewhere the model stays as it was.

Candidates are inputs of main-graph MatMul (x @ W) and Gemm (transA=0) layers with a constant 2-D float32 weight
that only readers of that same input read, written as QDQ (onnxq's ops quantize their own input).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.calibrate.collect import exposing, sample_bytes, sized_runs
from onnxq.calibrate.samples import RunSizer, input_specs
from onnxq.model.graph import NameSource, attribute, constant_initializers, consumers, is_op, to_array
from onnxq.plan.ops import OpChoice
from onnxq.plan.weights import WeightPlan

logger = logging.getLogger(__name__)

#: Fractions of each channel's range moved into the weights, tried per tensor (0: none).
ALPHAS = (0.0, 0.25, 0.5, 0.65, 0.75, 0.85)
#: Equalize only where the estimated output noise falls below this fraction of the unequalized one.
MIN_GAIN = 0.5


@dataclass(frozen=True)
class Layer:
    """One reader of a candidate input: its weight, and the axis of the weight that runs over the input's channels."""

    node: str
    weight: str
    input_axis: int  # 0 for W (K, N) (MatMul, Gemm transB=0), 1 for W (N, K) (Gemm transB=1)


@dataclass(frozen=True)
class Equalization:
    """What is applied to one input: per-channel scales s (the layers read x / s and weights times s) and alpha."""

    tensor: str
    layers: tuple[Layer, ...]
    scales: np.ndarray
    alpha: float
    gain: float  # estimated output noise after / before


def candidates(graph: onnx.GraphProto, plans: Iterable[WeightPlan], ops: Mapping[str, OpChoice]) -> dict[str, list[Layer]]:
    """Layer inputs that may be equalized, with their readers (see the module docstring)."""
    nodes = {n.name: n for n in graph.node}
    consts = constant_initializers(graph)
    readers = consumers(graph)
    by_input: dict[str, list[Layer]] = {}
    weight_readers: dict[str, set[str]] = {}
    for plan in plans:
        if not plan.is_float32 or plan.in_body or ops[plan.tensor].op_type is not None or len(consts[plan.tensor].dims) != 2:
            continue
        for use in plan.uses:
            node = nodes[use.node]
            if use.input_index != 1 or not is_op(node, "MatMul", "Gemm") or (node.op_type == "Gemm" and attribute(node, "transA", 0)):
                continue
            # a 2-D weight's input axis is the one its handler did not name as the output (plan/handlers.py)
            by_input.setdefault(node.input[0], []).append(Layer(node.name, plan.tensor, 1 - use.channel_axis))
            weight_readers.setdefault(plan.tensor, set()).add(node.input[0])
    out = {}
    for tensor, layers in by_input.items():
        weights = {layer.weight for layer in layers}
        every_reader = {r.name for w in weights for r in readers.get(w, [])}
        if all(weight_readers[w] == {tensor} for w in weights) and every_reader <= {layer.node for layer in layers}:
            out[tensor] = layers
    return out


@dataclass
class ChannelStats:
    """Per channel of the last axis: the largest magnitude and the sum of squares, over the samples seen."""

    absmax: np.ndarray | None = None
    squares: np.ndarray | None = None
    count: int = 0

    def add(self, value: np.ndarray) -> None:
        """Add one run's values (channels along the last axis)."""
        rows = np.asarray(value, dtype=np.float64).reshape(-1, value.shape[-1])
        amax, sq = np.abs(rows).max(axis=0), np.einsum("rc,rc->c", rows, rows)
        self.absmax = amax if self.absmax is None else np.maximum(self.absmax, amax)
        self.squares = sq if self.squares is None else self.squares + sq
        self.count += len(rows)


def channel_stats(model: onnx.ModelProto, tensors: list[str], batches: list[dict[str, np.ndarray]]) -> dict[str, ChannelStats]:
    """Per-channel magnitude statistics of ``tensors`` from a run of the float model over ``batches``."""
    stats = {name: ChannelStats() for name in tensors}
    with exposing(model, tensors) as sess:
        for _, outputs in sized_runs(sess, tensors, batches, RunSizer(input_specs(model), sample_bytes(model, tensors))):
            for name, value in zip(tensors, outputs, strict=True):
                if np.ndim(value) >= 1 and np.size(value):
                    stats[name].add(value)
    return stats


def output_noise(stats: ChannelStats, weights: list[np.ndarray], scales: np.ndarray, activation_bits: int, weight_bits: int) -> float:
    """The estimate the module docstring describes, for the layers reading one input with ``weights`` (each (K, N))."""
    assert stats.absmax is not None and stats.squares is not None
    step_x = 2.0 * np.max(stats.absmax / scales) / ((1 << activation_bits) - 1)
    qmax_w = (1 << (weight_bits - 1)) - 1
    mean_sq = stats.squares / max(stats.count, 1) / scales**2
    noise = 0.0
    for w in weights:
        scaled = w * scales[:, None]
        noise += step_x**2 / 12 * float(np.sum(scaled**2))
        step_w = np.max(np.abs(scaled), axis=0) / qmax_w
        noise += float(np.sum(step_w**2) / 12 * np.sum(mean_sq))
    return noise


def choose(stats: ChannelStats, weights: list[np.ndarray], activation_bits: int, weight_bits: int) -> tuple[np.ndarray, float, float]:
    """(scales, alpha, noise after / before) for one input; alpha 0 and ones where nothing helps enough."""
    assert stats.absmax is not None
    live = stats.absmax > 0
    row_max = np.max([np.max(np.abs(w), axis=1) for w in weights], axis=0)
    ones = np.ones_like(stats.absmax)
    before = output_noise(stats, weights, ones, activation_bits, weight_bits)
    best = (ones, 0.0, 1.0)
    for alpha in ALPHAS[1:]:
        scales = np.where(live & (row_max > 0), np.maximum(stats.absmax, 1e-30) ** alpha / np.maximum(row_max, 1e-30) ** (1 - alpha), 1.0)
        scales /= np.exp(np.mean(np.log(scales)))  # the scale's overall level changes nothing: keep it near 1
        ratio = output_noise(stats, weights, scales, activation_bits, weight_bits) / before if before > 0 else 1.0
        if ratio < best[2]:
            best = (scales, alpha, ratio)
    return best if best[2] < MIN_GAIN else (ones, 0.0, best[2])


def apply(graph: onnx.GraphProto, eq: Equalization) -> str:
    """Insert x / s in front of the layers and scale their weight rows by s, in place; returns the new tensor's name."""
    consts = constant_initializers(graph)
    names = NameSource(graph)
    inverse = names.fresh(f"{eq.tensor}_equalize_scale")
    smoothed = names.fresh(f"{eq.tensor}_equalized")
    graph.initializer.append(numpy_helper.from_array((1.0 / eq.scales).astype(np.float32), inverse))
    nodes = {layer.node for layer in eq.layers}
    position = 0
    for index, node in enumerate(graph.node):
        if eq.tensor in node.output:
            position = index + 1
        if node.name in nodes:
            node.input[0] = smoothed
    graph.node.insert(position, helper.make_node("Mul", [eq.tensor, inverse], [smoothed], name=names.fresh(f"{eq.tensor}_Equalize")))
    for layer in {layer.weight: layer for layer in eq.layers}.values():
        tensor = consts[layer.weight]
        values = to_array(tensor).astype(np.float64)
        shape = (-1, 1) if layer.input_axis == 0 else (1, -1)
        tensor.CopyFrom(numpy_helper.from_array((values * eq.scales.reshape(shape)).astype(np.float32), tensor.name))
    declared = next((v for v in (*graph.value_info, *graph.input, *graph.output) if v.name == eq.tensor), None)
    info = graph.value_info.add()
    if declared is not None:
        info.CopyFrom(declared)
        info.name = smoothed
    else:
        info.CopyFrom(helper.make_tensor_value_info(smoothed, onnx.TensorProto.FLOAT, None))
    return smoothed


def equalize(
    model: onnx.ModelProto, plans: list[WeightPlan], ops: Mapping[str, OpChoice], batches: list[dict[str, np.ndarray]], activation_bits: int
) -> list[Equalization]:
    """Equalize every candidate input where the estimate says it pays (in place); returns what was applied."""
    found = candidates(model.graph, plans, ops)
    if not found or not batches:
        return []
    stats = channel_stats(model, list(found), batches)
    consts = constant_initializers(model.graph)
    bits = {p.tensor: p.bits for p in plans}
    applied = []
    for tensor, layers in found.items():
        if stats[tensor].absmax is None:
            continue
        unique = {layer.weight: layer for layer in layers}.values()
        weights = [to_array(consts[layer.weight]).astype(np.float64) if layer.input_axis == 0 else to_array(consts[layer.weight]).astype(np.float64).T
                   for layer in unique]
        if any(w.shape[0] != stats[tensor].absmax.size for w in weights):
            continue
        scales, alpha, gain = choose(stats[tensor], weights, activation_bits, min(bits[layer.weight] for layer in unique))
        if alpha == 0.0:
            continue
        eq = Equalization(tensor, tuple(layers), scales, alpha, gain)
        apply(model.graph, eq)
        applied.append(eq)
        logger.debug("%s: equalized (alpha %.2f, estimated output noise x%.3f)", tensor, alpha, gain)
    return applied
