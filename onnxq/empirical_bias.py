"""Empirical bias correction: measure each layer's mean output shift in the quantized model and remove it.

The analytic correction (``bias_correction``) predicts the shift of one layer from its own
weight change and the float input means. What it cannot see is everything else that moves a
layer's mean output in the quantized model: clipped and rounded activations upstream, the
shifts earlier layers pass on, zero padding at the borders. Here the quantized model is
simulated (dequantized weights, the activation quantize-dequantize pairs) and run on
calibration samples beside the float model; each layer's bias then absorbs the difference of
the two mean outputs per channel. Layers are corrected in order of depth, a pass per level,
so each measurement already sees its upstream layers corrected (AIMET's empirical bias
correction works the same way, one layer at a time). The biases are inputs of the simulated
model, so one session serves every pass.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxq.calibrate import first_samples
from onnxq.calibrate.collect import ChannelMeans, exposing, progress
from onnxq.calibrate.data import batch_size
from onnxq.graph import constant_initializers, subgraphs, to_array, used_names
from onnxq.rewrite_activations import ActivationQuant, insert_activation_qdq

logger = logging.getLogger(__name__)

#: At most this many passes over the samples; deeper models correct several levels per pass,
#: which over-corrects (a level then also cancels the shift of the level before it, measured
#: before that one's correction): on MobileNetV2 (23 levels) at W4A4, 8 passes cost 5.7 pp.
MAX_PASSES = 256

#: Samples times passes per run: deep models use fewer samples per pass (but at least MIN_SAMPLES).
SAMPLE_PASSES = 8192
MIN_SAMPLES = 32


def simulated_model(
    model: onnx.ModelProto, weights: Mapping[str, np.ndarray], activations: Mapping[str, ActivationQuant], opset: int, biases: Sequence[str]
) -> onnx.ModelProto:
    """A float copy of ``model`` that computes what the quantized model will: dequantized ``weights``, activation pairs.

    The ``biases`` (initializer names) become graph inputs, to be fed on every run.
    """
    sim = onnx.ModelProto()
    sim.CopyFrom(model)
    graph = sim.graph
    by_name = {t.name: i for i, t in enumerate(graph.initializer)}
    for name, value in weights.items():
        graph.initializer[by_name[name]].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    if activations:
        insert_activation_qdq(sim, activations, opset)
    consts = constant_initializers(graph)
    for name in biases:
        tensor = consts[name]
        graph.initializer.remove(tensor)
        graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(tensor.dims)))
    return sim


def depth_levels(graph: onnx.GraphProto, outputs: Sequence[str]) -> list[list[str]]:
    """``outputs`` grouped by how many of them lie on the longest path from the graph inputs to each (1, 2, ...).

    The graph's nodes must be in topological order, as ONNX requires.
    """
    targets = set(outputs)
    depth: dict[str, int] = {}
    for node in graph.node:
        before = max((depth.get(name, 0) for name in node.input if name), default=0)
        for out in node.output:
            depth[out] = before + (1 if out in targets else 0)
    levels: dict[int, list[str]] = {}
    for out in outputs:
        levels.setdefault(depth.get(out, 1), []).append(out)
    return [levels[d] for d in sorted(levels)]


def prefix_model(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` (its only outputs), with the inputs and initializers it reads.

    onnxruntime runs every node of a graph whatever outputs are asked for, so each pass of the
    correction runs only the layers up to its level.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    keep: set[int] = set()
    read: set[str] = set()  # every name the kept nodes read, their bodies included
    stack = list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        reads = set(node.input)
        for body in subgraphs(node):
            reads |= used_names(body)  # a body may read tensors of this graph
        read |= reads
        stack.extend(name for name in reads if name)
    nodes = [node for node in model.graph.node if id(node) in keep]
    graph = helper.make_graph(
        nodes,
        model.graph.name,
        [i for i in model.graph.input if i.name in read],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs],
        [t for t in model.graph.initializer if t.name in read],
        value_info=model.graph.value_info,
    )
    prefix = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    prefix.functions.extend(model.functions)
    return prefix


def merge_levels(levels: Sequence[list[str]], most: int) -> list[list[str]]:
    """Consecutive ``levels`` joined into at most ``most`` groups of about equal numbers of levels."""
    count = min(len(levels), most)
    bounds = [round(i * len(levels) / count) for i in range(count + 1)]
    return [[name for level in levels[a:b] for name in level] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def output_means(model: onnx.ModelProto, outputs: Sequence[str], batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per tensor in ``outputs``, its mean per index of axis 1 over ``batches``."""
    names = list(outputs)
    with exposing(model, names) as sess:
        return channel_means_of(sess, names, batches, {})


def channel_means_of(
    sess: ort.InferenceSession, names: list[str], batches: Sequence[Mapping[str, np.ndarray]], extra: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Mean per index of axis 1 of each of the session's outputs ``names`` over ``batches`` (``extra`` fed with each)."""
    means = {name: ChannelMeans() for name in names}
    for batch in batches:
        for name, value in zip(names, sess.run(names, {**batch, **extra}), strict=True):
            means[name].add(value)
    return {name: m.mean() for name, m in means.items()}  # type: ignore[misc]


def refine_biases(
    float_means: Mapping[str, np.ndarray],
    simulated: onnx.ModelProto,
    biases: Mapping[str, str],
    start: Mapping[str, np.ndarray],
    batches: Sequence[Mapping[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """New values of the ``biases`` (layer output -> bias input of ``simulated``) that cancel the mean output shifts.

    ``float_means`` are the float model's mean outputs over the same ``batches``; ``start``
    holds each bias's value before refinement.
    """
    current = {name: np.asarray(value, np.float32) for name, value in start.items()}
    levels = depth_levels(simulated.graph, list(biases))
    passes = merge_levels(levels, MAX_PASSES)
    batches = first_samples(batches, max(MIN_SAMPLES, SAMPLE_PASSES // len(passes)))
    with progress(len(passes), "bias correction", "level") as bar:
        for outputs in passes:
            bar.update(1)
            prefix = prefix_model(simulated, outputs)
            needed = {i.name for i in prefix.graph.input}
            feeds = [{k: v for k, v in batch.items() if k in needed} for batch in batches]  # onnxruntime refuses unknown names
            with exposing(prefix, outputs) as sess:
                measured_means = channel_means_of(sess, outputs, feeds, {k: v for k, v in current.items() if k in needed})
            for name in outputs:
                measured = measured_means[name]
                bias = biases[name]
                if measured is None or measured.shape != current[bias].shape or not np.isfinite(measured).all():
                    continue
                current[bias] = (current[bias] - (measured - float_means[name])).astype(np.float32)
    samples = sum(batch_size(b) for b in batches)
    logger.debug("empirical bias correction: %d layers, %d passes over %d samples", len(biases), len(passes), samples)
    return current


def empirical_correction(
    model: onnx.ModelProto,
    float_model: onnx.ModelProto,
    weights: Mapping[str, np.ndarray],
    activations: Mapping[str, ActivationQuant],
    opset: int,
    biases: Mapping[str, str],
    batches: Sequence[Mapping[str, np.ndarray]],
) -> None:
    """Refine the ``biases`` (layer output -> bias initializer of ``model``) in place, from runs on ``batches``.

    ``model`` holds the float weights and the biases to refine; ``float_model`` is the model
    before any bias changed (the reference); ``weights`` maps weight names to their dequantized values.
    Where onnxruntime cannot run the simulation, a warning says so and the biases stay as they are.
    """
    if not biases or not batches:
        return
    consts = constant_initializers(model.graph)
    start = {bias: to_array(consts[bias]) for bias in biases.values()}
    try:
        float_means = output_means(float_model, list(biases), batches)
        simulated = simulated_model(model, weights, activations, opset, list(biases.values()))
        refined = refine_biases(float_means, simulated, biases, start, batches)
    except Exception as error:  # onnxruntime's exception types are not public
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        logger.warning("measured bias correction skipped (the analytic one stays): onnxruntime cannot run the simulation: %s", first_line)
        return
    for name, value in refined.items():
        consts[name].CopyFrom(numpy_helper.from_array(value, name))
