"""Empirical bias correction: measure each layer's mean output shift in the quantized model and remove it.

The analytic correction (``bias_correction``) predicts the shift of one layer from its own
weight change and the float input means. What it cannot see is everything else that moves a
layer's mean output in the quantized model: clipped and rounded activations upstream, the
shifts earlier layers pass on, zero padding at the borders. Here the quantized model is
simulated (dequantized weights, the activation quantize-dequantize pairs) and run on
calibration samples beside the float model; each layer's bias then absorbs the difference of
the two mean outputs per channel. Layers are corrected in order of depth, a pass per level,
so each measurement already sees its upstream layers corrected (AIMET's empirical bias
correction works the same way, one layer at a time). A level's pass runs only the nodes
between the previous level's outputs and its own (``LevelRunner``), so the whole correction
costs about one run of the model, plus a small session per level.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Container, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.calibrate.collect import ChannelMeans, exposing, progress, sample_bytes, sized_runs
from onnxq.calibrate.result import ActivationQuant
from onnxq.calibrate.samples import RunSizer, batch_size, first_samples, input_specs, sample_axes
from onnxq.errors import first_line
from onnxq.model.graph import attribute, constant_initializers, subgraphs, to_array, used_names
from onnxq.rewrite.activations import insert_activation_qdq

logger = logging.getLogger(__name__)

#: At most this many passes over the samples; deeper models correct several levels per pass,
#: which over-corrects (a level then also cancels the shift of the level before it, measured
#: before that one's correction): a one-off run on MobileNetV2 (23 levels) at W4A4 with 8 passes lost several points.
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


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor name a node reads: its inputs and what its bodies read from outer scopes."""
    reads = set(node.input)
    for body in subgraphs(node):
        reads |= used_names(body)
    reads.discard("")
    return reads


def nodes_for(graph: onnx.GraphProto, outputs: Iterable[str], given: Container[str] = ()) -> list[onnx.NodeProto]:
    """The nodes (in graph order) that compute ``outputs``, walking back no further than the ``given`` tensors."""
    producer = {out: node for node in graph.node for out in node.output}
    keep: set[int] = set()
    stack = [name for name in outputs if name not in given]
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        stack.extend(name for name in node_reads(node) if name not in given)
    return [node for node in graph.node if id(node) in keep]


def segment_model(
    model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto], outputs: Sequence[str], given: Mapping[str, np.ndarray] | None = None
) -> onnx.ModelProto:
    """A model of just ``nodes`` that returns ``outputs``; the ``given`` tensors (typed by these arrays) become inputs.

    The graph inputs and initializers the nodes read come along; nothing else does.
    """
    given = given or {}
    read = set().union(*(node_reads(n) for n in nodes)) | set(outputs)
    made = {out for n in nodes for out in n.output}
    inputs = [i for i in model.graph.input if i.name in read and i.name not in given]
    inputs += [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), None) for name, value in given.items()]
    graph = helper.make_graph(
        list(nodes),
        model.graph.name,
        inputs,
        [onnx.ValueInfoProto(name=name) for name in outputs],  # onnxruntime infers the types
        [t for t in model.graph.initializer if t.name in read and t.name not in given],
        value_info=[v for v in model.graph.value_info if v.name in made],
    )
    segment = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    segment.functions.extend(model.functions)
    return segment


def merge_levels(levels: Sequence[list[str]], most: int) -> list[list[str]]:
    """Consecutive ``levels`` joined into at most ``most`` groups of about equal numbers of levels."""
    count = min(len(levels), most)
    bounds = [round(i * len(levels) / count) for i in range(count + 1)]
    return [[name for level in levels[a:b] for name in level] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def output_means(model: onnx.ModelProto, outputs: Sequence[str], batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per tensor in ``outputs``, its mean per index of axis 1 over ``batches``."""
    names = list(outputs)
    means = {name: ChannelMeans() for name in names}
    with exposing(model, names) as sess:
        for _, outputs in sized_runs(sess, names, batches, RunSizer(input_specs(model), sample_bytes(model, names))):
            for name, value in zip(names, outputs, strict=True):
                means[name].add(value)
    return {name: m.mean() for name, m in means.items()}  # type: ignore[misc]


class LevelRunner:
    """Runs a model one level at a time, every node once: each level's segment starts from tensors earlier segments left.

    Re-running the model from its inputs for every level would cost levels x model; here the whole
    correction costs about one run plus a session per level. A segment hands on each tensor a later
    segment reads (kept per batch, dropped after its last reader), and a layer output whose bias
    changes is patched in that cache by the change (the bias is added last, so that is exact).
    """

    def __init__(self, model: onnx.ModelProto, targets: Sequence[str], batches: Sequence[Mapping[str, np.ndarray]]) -> None:
        self.model = model
        self.batches = [dict(b) for b in batches]
        self.cache: dict[str, list[np.ndarray]] = {}
        self.readers: Counter[str] = Counter()  # reads left per tensor, by the nodes still to run
        for node in nodes_for(model.graph, targets):
            self.readers.update(node_reads(node))

    def run(self, outputs: Sequence[str], feeds: Mapping[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
        """The ``outputs`` per batch, computing only the nodes no earlier call ran (``feeds``: inputs beside the batch's)."""
        nodes = nodes_for(self.model.graph, outputs, self.cache)
        reads: set[str] = set()
        for node in nodes:
            node_read = node_reads(node)
            self.readers.subtract(node_read)
            reads |= node_read
        handed_on = [out for node in nodes for out in node.output if self.readers[out] > 0 and out not in outputs]
        fetched = list(outputs) + handed_on
        given = {name: values[0] for name, values in self.cache.items() if name in reads}
        segment = segment_model(self.model, nodes, fetched, given)
        wanted = {i.name for i in segment.graph.input}
        results: dict[str, list[np.ndarray]] = {name: [] for name in fetched}
        with exposing(segment, fetched) as sess:
            for index, batch in enumerate(self.batches):
                inputs = {k: v for k, v in {**batch, **feeds}.items() if k in wanted}  # onnxruntime refuses unknown names
                inputs.update({name: self.cache[name][index] for name in given})
                for name, value in zip(fetched, sess.run(fetched, inputs), strict=True):
                    if not isinstance(value, np.ndarray):
                        raise TypeError(f"tensor {name!r} is not a plain tensor")
                    results[name].append(value)
        self.cache.update({name: results[name] for name in fetched if self.readers[name] > 0})
        for name in [n for n in self.cache if self.readers[n] <= 0]:
            del self.cache[name]
        return {name: results[name] for name in outputs}

    def shift(self, name: str, change: np.ndarray) -> None:
        """Add ``change`` per index of axis 1 to the kept values of ``name`` (a layer output whose bias moved)."""
        for value in self.cache.get(name, []):
            value += change.reshape((1, -1) + (1,) * (value.ndim - 2)).astype(value.dtype)


def bias_gain(node: onnx.NodeProto) -> float:
    """How much a unit change of the node's bias moves its output: Gemm's beta, 1 for Conv."""
    return float(attribute(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0


def refine_biases(
    float_means: Mapping[str, np.ndarray],
    simulated: onnx.ModelProto,
    biases: Mapping[str, str],
    start: Mapping[str, np.ndarray],
    batches: Sequence[Mapping[str, np.ndarray]],
    passes: Sequence[list[str]],
) -> dict[str, np.ndarray]:
    """New values of the ``biases`` (layer output -> bias input of ``simulated``) that cancel the mean output shifts.

    ``float_means`` are the float model's mean outputs over the same ``batches``; ``start``
    holds each bias's value before refinement; ``passes`` are the layer outputs corrected in each pass, in order.
    """
    current = {name: np.asarray(value, np.float32) for name, value in start.items()}
    producer = {out: node for node in simulated.graph.node for out in node.output}
    runner = LevelRunner(simulated, list(biases), batches)
    with progress(len(passes), "bias correction", "level") as bar:
        for outputs in passes:
            bar.update(1)
            values = runner.run(outputs, current)
            for name in outputs:
                means = ChannelMeans()
                for value in values[name]:
                    means.add(value)
                measured, bias, gain = means.mean(), biases[name], bias_gain(producer[name])
                if measured is None or measured.shape != current[bias].shape or not np.isfinite(measured).all() or gain == 0.0:
                    continue
                change = -(measured - float_means[name]) / gain
                current[bias] = (current[bias] + change).astype(np.float32)
                runner.shift(name, change * gain)
    axes = sample_axes(input_specs(simulated))
    samples = sum(batch_size(b, axes) for b in batches)
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
        simulated = simulated_model(model, weights, activations, opset, list(biases.values()))
        passes = merge_levels(depth_levels(simulated.graph, list(biases)), MAX_PASSES)
        axes = sample_axes(input_specs(float_model))
        batches = first_samples(batches, axes, max(MIN_SAMPLES, SAMPLE_PASSES // len(passes)))  # the float means see the same samples
        float_means = output_means(float_model, list(biases), batches)
        refined = refine_biases(float_means, simulated, biases, start, batches, passes)
    except Exception as error:  # onnxruntime's exception types are not public
        logger.warning("measured bias correction skipped (the analytic one stays): onnxruntime cannot run the simulation: %s", first_line(error))
        return
    for name, value in refined.items():
        consts[name].CopyFrom(numpy_helper.from_array(value, name))
