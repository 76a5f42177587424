"""Where a model's time goes in onnxruntime: the share of each op type, one thread, from onnxruntime's own profiler.

    python tools/profile_ops.py models/fmnist_vit.onnx --batch 8
    python tools/profile_ops.py model.onnx --feeds run.npz      # one run's inputs by name, where synthetic ones do not fit

Prints the mean time of a whole run, the sum of the nodes' kernel times (the profiler's; it adds its own cost, so read
the shares, not the microseconds), and per op type its time and share, largest first. Models with onnxq's ops run
with its op library registered. A bound follows: quantizing what a share covers can speed the model up at most by
1 / (1 - share), whatever the kernels do (Amdahl), before the quantize/dequantize steps the rewrite adds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np
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
    import onnx

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


def op_times(model: Path, batch: int, runs: int, feeds_file: Path | None = None) -> tuple[float, float, collections.Counter[str]]:
    """(mean microseconds a run, mean microseconds of the nodes' kernels a run, microseconds a run per op type).

    The op types of nodes with a weight onnxq quantizes get " (weighted)" added, so their share reads apart from the
    same ops between activations (a transformer's attention products).
    """
    weighted = weighted_nodes(model)
    with tempfile.TemporaryDirectory() as folder:
        sess = session(model, os.path.join(folder, "profile"))
        feeds = batch_feeds(model, batch) if feeds_file is None else dict(np.load(feeds_file))
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    model_runs = [e["dur"] for e in events if e.get("name") == "model_run"]
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"].removesuffix("_kernel_time")
            per_op[event["args"]["op_name"] + (" (weighted)" if node in weighted else "")] += event["dur"] / runs
    return sum(model_runs) / len(model_runs), sum(per_op.values()), per_op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=1, help="the free dimensions' size (default 1)")
    parser.add_argument("--runs", type=int, default=300, help="runs profiled (default 300)")
    parser.add_argument("--feeds", type=Path, default=None,
                        help="an .npz of one run's inputs by name (a streaming model's state, a sample rate), instead of synthetic ones")
    args = parser.parse_args()
    print(cpu_description())
    run_us, nodes_us, per_op = op_times(args.model, args.batch, args.runs, args.feeds)
    shape = f"feeds {args.feeds}" if args.feeds else f"batch {args.batch}"
    print(f"{args.model} {shape}: {run_us:.1f} us a run, nodes' kernels {nodes_us:.1f} us (profiler's)")
    print("| op type | us a run | share |")
    print("|---|---:|---:|")
    for op, us in per_op.most_common():
        print(f"| {op} | {us:.1f} | {100 * us / nodes_us:.1f} % |")


if __name__ == "__main__":
    main()
