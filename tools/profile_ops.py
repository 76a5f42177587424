"""Where a model's time goes in onnxruntime: the share of each op type, one thread, from onnxruntime's own profiler.

    python tools/profile_ops.py models/fmnist_vit.onnx --batch 8

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
    """One thread, the profiler on, onnxq's ops registered."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = profile_prefix
    import onnxq

    options.register_custom_ops_library(onnxq.get_library_path())
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def random_feeds(sess: ort.InferenceSession, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard normal float inputs (ids 0 for integer inputs), free dimensions at ``batch``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in sess.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in info.shape]
        feeds[info.name] = rng.standard_normal(shape).astype(np.float32) if "float" in info.type else np.zeros(shape, np.int64)
    return feeds


def weighted_nodes(model: Path) -> set[str]:
    """Names of the nodes onnxq would quantize the weights of (as it plans them, after its preparation passes)."""
    from onnxq.config import QuantizeConfig
    from onnxq.pipeline import load_and_prepare
    from onnxq.plan.weights import plan_weights

    plans, _ = plan_weights(load_and_prepare(model).model.graph, QuantizeConfig(bits=4))
    return {node for plan in plans for node in plan.nodes}


def op_times(model: Path, batch: int, runs: int) -> tuple[float, float, collections.Counter[str]]:
    """(mean microseconds a run, mean microseconds of the nodes' kernels a run, microseconds a run per op type).

    The op types of nodes with a weight onnxq quantizes get " (weighted)" added, so their share reads apart from the
    same ops between activations (a transformer's attention products).
    """
    weighted = weighted_nodes(model)
    with tempfile.TemporaryDirectory() as folder:
        sess = session(model, os.path.join(folder, "profile"))
        feeds = random_feeds(sess, batch)
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
    args = parser.parse_args()
    print(cpu_description())
    run_us, nodes_us, per_op = op_times(args.model, args.batch, args.runs)
    print(f"{args.model} batch {args.batch}: {run_us:.1f} us a run, nodes' kernels {nodes_us:.1f} us (profiler's)")
    print("| op type | us a run | share |")
    print("|---|---:|---:|")
    for op, us in per_op.most_common():
        print(f"| {op} | {us:.1f} | {100 * us / nodes_us:.1f} % |")


if __name__ == "__main__":
    main()
