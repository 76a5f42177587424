"""Where a model's time goes in onnxruntime: the share of each op type, one thread, from onnxruntime's own profiler.

    python tools/profile_ops.py models/fmnist_vit.onnx --batch 8
    python tools/profile_ops.py model.onnx --feeds run.npz      # one run's inputs by name, where synthetic ones do not fit
    python tools/profile_ops.py model.q4.onnx --against model.onnx   # layer by layer against the float model

Prints the mean time of a whole run, the sum of the nodes' kernel times (the profiler's; it adds its own cost, so read
the shares, not the microseconds), and per op type its time and share, largest first. Models with onnxq's ops run
with its op library registered. A bound follows: quantizing what a share covers can speed the model up at most by
1 / (1 - share), whatever the kernels do (Amdahl), before the quantize/dequantize steps the rewrite adds.

With --against FLOAT, a quantized model's weighted layers beside the float model's, layer by layer (each layer's
kernel time in both, and float's over the quantized), then everything else: which layers the integer kernels speed up
and which they slow down. Layers are matched by name: onnxq's ops keep the names of the nodes they replace, and
onnxruntime's fused float nodes are named after the tensor their chain writes, traced back to the layer that starts it.
The profiler adds its own cost to every node, more to nodes with many inputs such as onnxq's ops (up to 8): on chains of
tiny layers a Conv took 0.34 us and an IntConvQ 0.73 us unprofiled, 2.1 and 3.2 us profiled (BENCHMARKS, stop 34), so
small layers read slower in the quantized model than they run; time whole models with tools/bench_integer.py.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from tools.machine import cpu_description


def session(model: Path, profile_prefix: str) -> ort.InferenceSession:
    """One thread (onnxq's session options, its op library registered), the profiler on."""
    from onnxq.native.session import session_options

    options = session_options(threads=1, custom_ops=True)
    options.enable_profiling = True
    options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def batch_feeds(model: Path, batch: int) -> dict[str, np.ndarray]:
    """``batch`` of onnxq's synthetic inputs (shapes as the model declares them, values as their types suggest) as one run."""
    from onnxq.analysis.fidelity import synthetic_inputs
    from onnxq.calibrate.samples import input_specs, sample_axes

    proto = onnx.load(str(model), load_external_data=False)
    samples = synthetic_inputs(proto, samples=batch)
    axes = sample_axes(input_specs(proto))
    return {name: samples[0][name] if axes[name] is None else np.concatenate([f[name] for f in samples], axis=axes[name])
            for name in samples[0]}


def weighted_nodes(model: Path) -> set[str]:
    """Names of the nodes onnxq would quantize the weights of (as it plans them, after its preparation passes)."""
    from onnxq.config import QuantizeConfig
    from onnxq.pipeline import load_and_prepare
    from onnxq.plan.weights import plan_weights

    plans, _ = plan_weights(load_and_prepare(model).model.graph, QuantizeConfig(bits=4))
    return {node for plan in plans for node in plan.nodes}


def node_times(models: list[Path], batch: int, runs: int, feeds_file: Path | None = None) -> list[tuple[float, dict[str, tuple[str, float]]]]:
    """Per model: mean microseconds a run, and per profiled node (in the order it first ran) its op type and mean microseconds.

    Several models run in turns, one run each, so that the machine's load falls on all of them alike.
    """
    with tempfile.TemporaryDirectory() as folder:
        sessions = [session(model, os.path.join(folder, f"profile{i}")) for i, model in enumerate(models)]
        feeds = [batch_feeds(model, batch) if feeds_file is None else dict(np.load(feeds_file)) for model in models]
        for _ in range(runs):
            for sess, feed in zip(sessions, feeds, strict=True):
                sess.run(None, feed)
        traces = [json.loads(Path(sess.end_profiling()).read_text()) for sess in sessions]
    results = []
    for events in traces:
        nodes: dict[str, tuple[str, float]] = {}
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                node = event["name"].removesuffix("_kernel_time")
                op, us = nodes.get(node, (event["args"]["op_name"], 0.0))
                nodes[node] = (op, us + event["dur"] / runs)
        model_runs = [e["dur"] for e in events if e.get("name") == "model_run"]
        results.append((sum(model_runs) / len(model_runs), nodes))
    return results


def op_times(model: Path, batch: int, runs: int, feeds_file: Path | None = None) -> tuple[float, float, collections.Counter[str]]:
    """(mean microseconds a run, mean microseconds of the nodes' kernels a run, microseconds a run per op type).

    The op types of nodes with a weight onnxq quantizes get " (weighted)" added, so their share reads apart from the
    same ops between activations (a transformer's attention products).
    """
    weighted = weighted_nodes(model)
    [(run_us, nodes)] = node_times([model], batch, runs, feeds_file)
    per_op: collections.Counter[str] = collections.Counter()
    for node, (op, us) in nodes.items():
        per_op[op + (" (weighted)" if node in weighted else "")] += us
    return run_us, sum(per_op.values()), per_op


# Nodes a fused chain may run through after its layer: activations, normalizations, a residual sum, the quantize steps.
CHAIN_OPS = {"Relu", "Clip", "BatchNormalization", "Add", "Sum", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu",
             "QuantizeLinear", "DequantizeLinear"}


def producers_of(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Each tensor's producing node, for :func:`layer_of`."""
    return {output: node for node in graph.node for output in node.output}


def layer_of(producers: dict[str, onnx.NodeProto], profiled: str, layers: set[str], depth: int = 4) -> str | None:
    """The layer (a node name in ``layers``) whose work the profiled node ``profiled`` does, or None.

    The node itself where it kept its name; else, with onnxruntime's suffix for channel-blocked nodes ("_nchwc") cut, the
    tensor of that name: its producer (``producers``, the graph's :func:`producers_of`), or back through at most
    ``depth`` chain ops (CHAIN_OPS: for a sum, the input that reaches a layer first) to the layer that starts the chain.
    """
    if profiled in layers:
        return profiled

    def back(tensor: str, left: int) -> str | None:
        node = producers.get(tensor)
        if node is None:
            return None
        if node.name in layers:
            return node.name
        if left == 0 or node.op_type not in CHAIN_OPS:
            return None
        found = [layer for layer in (back(name, left - 1) for name in node.input if name) if layer is not None]
        return found[0] if found else None

    return back(profiled.removesuffix("_nchwc"), depth)


def layer_shape(graph: onnx.GraphProto, name: str) -> str:
    """A layer's weight shape, group and strides, as a short text ("96x1x3x3 g96 /2")."""
    from onnx import numpy_helper

    node = next(n for n in graph.node if n.name == name)
    weights = {init.name: init for init in graph.initializer}
    dims = list(weights[node.input[1]].dims) if len(node.input) > 1 and node.input[1] in weights else []
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if not dims and len(node.input) > 1:  # (a Constant node's weight)
        constant = next((n for n in graph.node if node.input[1] in n.output and n.op_type == "Constant"), None)
        if constant is not None:
            dims = list(numpy_helper.to_array(constant.attribute[0].t).shape)
    text = "x".join(str(d) for d in dims) if dims else node.op_type
    if attributes.get("group", 1) != 1:
        text += f" g{attributes['group']}"
    strides = attributes.get("strides", [1])
    if max(strides) > 1:
        text += " /" + "x".join(str(s) for s in sorted(set(strides)))
    return text


@dataclass
class LayerRow:
    """One layer's kernel time in the float and the quantized model (microseconds a run)."""

    layer: str
    shape: str
    float_us: float
    quantized_us: float


def compare_layers(float_graph: onnx.GraphProto, quantized_graph: onnx.GraphProto, float_nodes: dict[str, tuple[str, float]],
                   quantized_nodes: dict[str, tuple[str, float]], layers: set[str]) -> tuple[list[LayerRow], float, float]:
    """The layers in the float model's order, each with the time of the nodes that do its work in either model.

    Then the float and the quantized time of every other node.
    """
    rows: dict[str, LayerRow] = {}
    rest = [0.0, 0.0]
    for side, (graph, nodes) in enumerate(((float_graph, float_nodes), (quantized_graph, quantized_nodes))):
        producers = producers_of(graph)
        for node, (_, us) in nodes.items():
            layer = layer_of(producers, node, layers)
            if layer is None:
                rest[side] += us
                continue
            if layer not in rows:
                rows[layer] = LayerRow(layer, layer_shape(float_graph, layer), 0.0, 0.0)
            row = rows[layer]
            if side == 0:
                row.float_us += us
            else:
                row.quantized_us += us
    order = [node.name for node in float_graph.node if node.name in rows]
    return [rows[name] for name in order], rest[0], rest[1]


def print_layers(model: Path, against: Path, batch: int, runs: int, feeds_file: Path | None) -> None:
    """The per-layer table of --against."""
    float_graph = onnx.load(str(against), load_external_data=False).graph
    quantized_graph = onnx.load(str(model), load_external_data=False).graph
    layers = weighted_nodes(against) & {node.name for node in float_graph.node}
    (float_run, float_nodes), (quantized_run, quantized_nodes) = node_times([against, model], batch, runs, feeds_file)
    rows, float_rest, quantized_rest = compare_layers(float_graph, quantized_graph, float_nodes, quantized_nodes, layers)
    shape = f"feeds {feeds_file}" if feeds_file else f"batch {batch}"
    print(f"{model} against {against}, {shape}, the two in turns: a run {quantized_run:.1f} us against {float_run:.1f} us "
          f"(with the profiler's own cost)")
    print("| layer | weight | float us | quantized us | float / quantized |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        ratio = f"{row.float_us / row.quantized_us:.2f}x" if row.quantized_us > 0 else ""
        print(f"| {row.layer} | {row.shape} | {row.float_us:.1f} | {row.quantized_us:.1f} | {ratio} |")
    layer_float, layer_quantized = sum(r.float_us for r in rows), sum(r.quantized_us for r in rows)
    print(f"| the layers | | {layer_float:.1f} | {layer_quantized:.1f} | {layer_float / max(layer_quantized, 1e-9):.2f}x |")
    print(f"| every other node | | {float_rest:.1f} | {quantized_rest:.1f} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=1, help="the free dimensions' size (default 1)")
    parser.add_argument("--runs", type=int, default=300, help="runs profiled (default 300)")
    parser.add_argument("--feeds", type=Path, default=None,
                        help="an .npz of one run's inputs by name (a streaming model's state, a sample rate), instead of synthetic ones")
    parser.add_argument("--against", type=Path, default=None,
                        help="the float model MODEL was quantized from: the weighted layers side by side instead of op types")
    args = parser.parse_args()
    print(cpu_description())
    if args.against is not None:
        print_layers(args.model, args.against, args.batch, args.runs, args.feeds)
        return
    run_us, nodes_us, per_op = op_times(args.model, args.batch, args.runs, args.feeds)
    shape = f"feeds {args.feeds}" if args.feeds else f"batch {args.batch}"
    print(f"{args.model} {shape}: {run_us:.1f} us a run, nodes' kernels {nodes_us:.1f} us (profiler's)")
    print("| op type | us a run | share |")
    print("|---|---:|---:|")
    for op, us in per_op.most_common():
        print(f"| {op} | {us:.1f} | {100 * us / nodes_us:.1f} % |")


if __name__ == "__main__":
    main()
