"""What the written model costs against the float one in onnxruntime on this CPU, measured after writing.

A quantized model is smaller, but not always faster: onnxruntime dequantizes weight-only QDQ weights on every run
unless it fuses them into an integer kernel (it does for some 4-bit MatMuls), and an independent check found the
accurate settings running at 0.56-0.8x float while users assumed the opposite. So the CLI times both files on one run's
inputs (a batch of the calibration data, or the synthetic inputs of the fidelity check), one thread as the
benchmarks use, alternating the two models and keeping each one's fastest run (the machine's noise only ever slows a
run down), and prints the ratio. It is a few runs on one batch, a hint of the cost, not a benchmark
(tools/bench_ops.py measures the formats side by side).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.native.domain import MATMUL_NBITS, ORT_DOMAIN
from onnxq.native.session import session_options, uses_onnxq_ops

#: Timed runs of each model at most, and the seconds the timing may take at most (after one warm-up run each).
SPEED_RUNS = 10
SPEED_SECONDS = 1.0
#: Samples in the timed batch (when the data has that many in its first run).
SPEED_SAMPLES = 8
#: Below this ratio the line says the model runs slower than float, and what may help.
SLOWER = 0.95


@dataclass(frozen=True)
class Speed:
    """The fastest of a few runs of each model on the same inputs, one onnxruntime thread."""

    float_ms: float
    quantized_ms: float
    samples: int
    integer_ops: bool  # whether the written model uses onnxq's ops (the int/post formats)
    dequantizes: bool = True  # whether it has weight DequantizeLinear nodes (onnxruntime may run them on every run)
    nbits: bool = False  # whether it has onnxruntime MatMulNBits nodes

    @property
    def ratio(self) -> float:
        """Speed-up over float: above 1 the written model is faster."""
        return self.float_ms / self.quantized_ms if self.quantized_ms > 0 else float("inf")

    def line(self) -> str:
        """What the CLI prints: the ratio, and below SLOWER what in the model may cost the time and what may help."""
        runs = f"{self.samples} sample{'s' if self.samples != 1 else ''}"
        text = (f"speed: {self.ratio:.2f}x the float model's on this CPU ({self.quantized_ms:.3g} ms against {self.float_ms:.3g} ms "
                f"for a run of {runs}, onnxruntime, one thread)")
        if self.ratio >= SLOWER:
            return text
        causes = []
        if self.dequantizes:
            causes.append("the layers outside onnxq's ops dequantize their weights on every run" if self.integer_ops else
                          "onnxruntime dequantizes most QDQ weights on every run, and --format int, which runs Conv, Gemm and "
                          "MatMul layers as onnxq's integer ops, may be faster (docs/formats.md)")
        if self.nbits:
            causes.append("onnxruntime's MatMulNBits can be slower than its float MatMul on small weights and long inputs "
                          "(BENCHMARKS: MatMul weights)")
        return text + ("; slower than float: " + "; ".join(causes) if causes else "")


def written_kinds(model: onnx.ModelProto) -> tuple[bool, bool]:
    """Whether a model's main graph dequantizes weights (DequantizeLinear of an initializer), and runs MatMulNBits."""
    weights = {t.name for t in model.graph.initializer}
    dequantizes = any(n.op_type == "DequantizeLinear" and n.input[0] in weights for n in model.graph.node)
    return dequantizes, any(n.op_type == MATMUL_NBITS and n.domain == ORT_DOMAIN for n in model.graph.node)


def measure_speed(float_path: str | os.PathLike[str], quantized_path: str | os.PathLike[str], feed: Mapping[str, np.ndarray],
                  samples: int) -> Speed:
    """Time both files on ``feed`` (one run's inputs, ``samples`` samples): each one's fastest of a few alternating runs."""
    import onnxruntime as ort

    written = onnx.load(os.fspath(quantized_path), load_external_data=False)  # read once for what it holds
    integer_ops = uses_onnxq_ops(written)
    sessions = []
    for path, custom_ops in ((float_path, uses_onnxq_ops(float_path)), (quantized_path, integer_ops)):
        options = session_options(threads=1, custom_ops=custom_ops)
        options.inter_op_num_threads = 1
        sessions.append(ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"]))
    feed = dict(feed)
    best = [float("inf"), float("inf")]
    for session in sessions:  # warm-up: the first run allocates and packs weights
        session.run(None, feed)
    deadline = time.perf_counter() + SPEED_SECONDS
    for _ in range(SPEED_RUNS):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feed)
            best[i] = min(best[i], time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return Speed(1e3 * best[0], 1e3 * best[1], samples, integer_ops, *written_kinds(written))
