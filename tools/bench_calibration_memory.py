"""Peak memory and time of activation calibration on a ResNet-50-shaped model at 224x224, runs cut or whole.

Memory and time do not depend on the weight values, so the model is ResNet-50's graph (bottleneck blocks, 25.5 M
weights, BatchNorm already folded) with random weights, built here with onnx.helper, and the data 64 random images.
Each setting runs `onnxq quantize` in a fresh subprocess, twice: as shipped (each onnxruntime run returns at most
onnxq.calibrate.data.RUN_BYTES of activations) and with whole batches of 32 samples a run (RUN_BYTES unbounded, how
calibration ran before). Peak memory is the subprocess's maximum resident set size.

    python tools/bench_calibration_memory.py [--samples 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.machine import cpu_description  # noqa: E402

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (bottleneck width, blocks, stride of the first)

SETTINGS = {
    "W4A8 mse (default: measured bias correction)": ["-b", "4"],
    "W4A8 mse, --bias-correction off": ["-b", "4", "--bias-correction", "off"],
    "W4A8 asq": ["-b", "4", "--calibrate", "asq"],
}


class _Builder:
    """Collects the nodes and random weights of the model."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> str:
        name = f"conv{len(self.inits) // 2}"
        w = (self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))).astype(np.float32)
        self.inits += [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}.b")]
        pad = k // 2
        self.nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name, strides=[stride] * 2, pads=[pad] * 4))
        if not relu:
            return name
        self.nodes.append(helper.make_node("Relu", [name], [f"{name}.r"]))
        return f"{name}.r"

    def bottleneck(self, x: str, cin: int, width: int, stride: int) -> str:
        y = self.conv(self.conv(self.conv(x, cin, width, 1), width, width, 3, stride), width, 4 * width, 1, relu=False)
        shortcut = self.conv(x, cin, 4 * width, 1, stride, relu=False) if stride != 1 or cin != 4 * width else x
        out = f"{y}.add"
        self.nodes += [helper.make_node("Add", [y, shortcut], [out]), helper.make_node("Relu", [out], [f"{out}.r"])]
        return f"{out}.r"


def resnet50() -> onnx.ModelProto:
    """ResNet-50's layers with random weights: input x[N, 3, 224, 224] -> logits[N, 1000]."""
    b = _Builder()
    x = b.conv("x", 3, 64, 7, 2)
    b.nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = "pool", 64
    for width, blocks, stride in STAGES:
        for i in range(blocks):
            x = b.bottleneck(x, cin, width, stride if i == 0 else 1)
            cin = 4 * width
    fc = (b.rng.standard_normal((1000, 2048)) * 0.02).astype(np.float32)
    b.inits += [numpy_helper.from_array(fc, "fc.w"), numpy_helper.from_array(np.zeros(1000, np.float32), "fc.b")]
    b.nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    v = helper.make_tensor_value_info
    inputs, outputs = [v("x", TensorProto.FLOAT, ["N", 3, 224, 224])], [v("logits", TensorProto.FLOAT, ["N", 1000])]
    graph = helper.make_graph(b.nodes, "resnet50", inputs, outputs, b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


_RUNNER = """
import sys
import onnxq.calibrate.data as data
if sys.argv[1] == "whole":
    data.RUN_BYTES = 1 << 62
from onnxq.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run(mode: str, args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident GiB of one `onnxq quantize` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, mode, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"onnxq quantize {' '.join(args)} failed: {proc.stderr.read().decode().strip()[-500:]}")
    return seconds, usage.ru_maxrss / 2**20  # KiB -> GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    print(cpu_description())
    with tempfile.TemporaryDirectory() as folder:
        model, data, out = Path(folder) / "resnet50.onnx", Path(folder) / "calib.npy", Path(folder) / "q.onnx"
        onnx.save(resnet50(), model)
        np.save(data, np.random.default_rng(1).random((args.samples, 3, 224, 224), dtype=np.float32))
        print(f"ResNet-50-shaped model, {args.samples} calibration samples of 3x224x224, fresh subprocess per run\n")
        print("| setting | cut runs: s | cut runs: peak GiB | whole batches: s | whole batches: peak GiB | memory ratio |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, extra in SETTINGS.items():
            common = ["quantize", str(model), "-o", str(out), "--calibration", str(data), *extra]
            cut, whole = run("cut", common), run("whole", common)
            print(f"| {name} | {cut[0]:.1f} | {cut[1]:.2f} | {whole[0]:.1f} | {whole[1]:.2f} | {cut[1] / whole[1]:.2f}x |")


if __name__ == "__main__":
    main()
