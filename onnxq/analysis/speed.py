"""What the written model costs against the float one in onnxruntime on this CPU, measured after writing.

A quantized model is smaller, but not always faster: onnxruntime dequantizes weight-only QDQ weights on every run
unless it fuses them into an integer kernel (it does for some 4-bit MatMuls), and an independent check found the
accurate settings running at 0.56-0.8x float while users assumed the opposite. So the CLI times both files on one run's
inputs (a batch of the calibration data, or the synthetic inputs of the fidelity check), one thread as the
benchmarks use, alternating the two models and keeping each one's fastest run (the machine's noise only ever slows a
run down), and prints the ratio. It is a few runs on one batch, a hint of the cost, not a benchmark
(tools/bench_ops.py measures the formats side by side).

Which format would be faster is measured too, not guessed: the same model is built in the other formats (qdq, int,
post) as a timing twin and timed in the same alternation. A twin has the written model's graph, its bits per layer and
its activation sites, but cheap numbers: weights at the full range (no search, no data), activation steps from the
timed batch alone (min/max, or ASQ's adapters where the model uses ASQ), biases corrected by the formula alone. Those
change no op and no shape, so the twin runs as the format would; its accuracy is not what the format would give
(quantize with that --format to see it). Models over COMPARE_BYTES, or with external data files, are not twinned (the
builds would cost more than the hint is worth).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxq.config import BiasCorrection, CalibrationMethod, QuantizeConfig, RangeMethod, WeightFormat
from onnxq.errors import first_line
from onnxq.native.domain import MATMUL_NBITS, ORT_DOMAIN
from onnxq.native.session import session_options, uses_onnxq_ops

logger = logging.getLogger(__name__)

#: Timed runs of each model at most, and the seconds the timing may take at most (after one warm-up run each).
SPEED_RUNS = 10
SPEED_SECONDS = 1.0
#: Samples in the timed batch (when the data has that many in its first run).
SPEED_SAMPLES = 8
#: Below this ratio the line says the model runs slower than float, and what may help.
SLOWER = 0.95
#: A twin format is called faster when its ratio is this much above the written one's (a few runs differ by a few %).
FASTER = 1.1
#: Model files larger than this get no timing twins.
COMPARE_BYTES = 256 << 20


@dataclass(frozen=True)
class FormatTime:
    """The fastest run of the written model's twin in another format (see the module docstring)."""

    format: WeightFormat
    ms: float


@dataclass(frozen=True)
class Speed:
    """The fastest of a few runs of each model on the same inputs, one onnxruntime thread."""

    float_ms: float
    quantized_ms: float
    samples: int
    integer_ops: bool  # whether the written model uses onnxq's ops (the int/post formats)
    dequantizes: bool = True  # whether it has weight DequantizeLinear nodes (onnxruntime may run them on every run)
    nbits: bool = False  # whether it has onnxruntime MatMulNBits nodes
    others: tuple[FormatTime, ...] = ()  # the twins in the other formats, timed in the same runs

    @property
    def ratio(self) -> float:
        """Speed-up over float: above 1 the written model is faster."""
        return self.float_ms / self.quantized_ms if self.quantized_ms > 0 else float("inf")

    def ratio_of(self, other: FormatTime) -> float:
        """A twin's speed-up over float."""
        return self.float_ms / other.ms if other.ms > 0 else float("inf")

    @property
    def faster(self) -> FormatTime | None:
        """The fastest twin, where it beats the written model by FASTER or more."""
        best = min(self.others, key=lambda other: other.ms, default=None)
        return best if best is not None and self.ratio_of(best) >= FASTER * self.ratio else None

    def line(self) -> str:
        """What the CLI prints: the ratio, and below SLOWER what in the model may cost the time and what may help."""
        runs = f"{self.samples} sample{'s' if self.samples != 1 else ''}"
        text = (f"speed: {self.ratio:.2f}x the float model's on this CPU ({self.quantized_ms:.3g} ms against {self.float_ms:.3g} ms "
                f"for a run of {runs}, onnxruntime, one thread)")
        if self.others:
            twins = ", ".join(f"--format {other.format.value} {self.ratio_of(other):.2f}x" for other in self.others)
            faster = self.faster
            verdict = (f"--format {faster.format.value} would run faster" if faster is not None else
                       "none of them faster")
            text += f"; the same layers in the other formats, timed beside it: {twins} ({verdict})"
        if self.ratio >= SLOWER:
            return text
        causes = []
        if self.dequantizes:
            causes.append("the layers outside onnxq's ops dequantize their weights on every run" if self.integer_ops else
                          "onnxruntime dequantizes most QDQ weights on every run" + (
                              "" if self.others else ", and --format int, which runs Conv, Gemm and MatMul layers as onnxq's "
                              "integer ops, may be faster (docs/formats.md)"))
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
                  samples: int, twins: Mapping[WeightFormat, Path] | None = None) -> Speed:
    """Time the files on ``feed`` (one run's inputs, ``samples`` samples): each one's fastest of a few alternating runs.

    ``twins``: the written model built in other formats (:func:`build_twins`), timed in the same alternation.
    """
    import onnxruntime as ort

    written = onnx.load(os.fspath(quantized_path), load_external_data=False)  # read once for what it holds
    integer_ops = uses_onnxq_ops(written)
    twins = dict(twins or {})
    sessions = []
    for path in (float_path, quantized_path, *twins.values()):
        options = session_options(threads=1, custom_ops=integer_ops if path == quantized_path else uses_onnxq_ops(path))
        options.inter_op_num_threads = 1
        sessions.append(ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"]))
    feed = dict(feed)
    best = [float("inf")] * len(sessions)
    for session in sessions:  # warm-up: the first run allocates and packs weights
        session.run(None, feed)
    deadline = time.perf_counter() + SPEED_SECONDS * (len(sessions) - 1)
    for _ in range(SPEED_RUNS):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feed)
            best[i] = min(best[i], time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    others = tuple(FormatTime(fmt, 1e3 * ms) for fmt, ms in zip(twins, best[2:], strict=True))
    return Speed(1e3 * best[0], 1e3 * best[1], samples, integer_ops, *written_kinds(written), others=others)


def twin_config(config: QuantizeConfig, fmt: WeightFormat, samples: int) -> QuantizeConfig:
    """``config`` with ``fmt`` and the cheap numbers of a timing twin.

    Full-range weights, steps from one batch, biases corrected by the formula alone (a correction may give a bias-less
    layer a bias, which the twin must have too).
    """
    activations = config.activations
    if activations is not None:
        method = CalibrationMethod.ASQ if activations.method is CalibrationMethod.ASQ else CalibrationMethod.MINMAX
        correction = BiasCorrection.OFF if activations.bias_correction is BiasCorrection.OFF else BiasCorrection.ANALYTIC
        activations = dataclasses.replace(activations, samples=samples, method=method, bias_correction=correction)
    return dataclasses.replace(config, format=fmt, range=RangeMethod.ABSMAX, output_aware=False, activations=activations,
                               samples=samples)


def build_twins(model: Path, config: QuantizeConfig, feed: Mapping[str, np.ndarray], samples: int, folder: Path) -> dict[WeightFormat, Path]:
    """The written model's timing twins in the formats other than ``config.format``, saved in ``folder``.

    A format is left out where it would change nothing (no layer runs as onnxq's ops in it), where no layer of it
    differs from the written model (POST takes 2-4 bits), or where building it fails; the whole comparison where the
    model file is larger than COMPARE_BYTES or keeps its tensors in external data files.
    """
    from onnxq.model.load import read_model_file, uses_external_data
    from onnxq.model.save import save_model
    from onnxq.pipeline import quantize_with_report

    if model.stat().st_size > COMPARE_BYTES or uses_external_data(read_model_file(model)):
        return {}
    twins: dict[WeightFormat, Path] = {}
    data = [dict(feed)] if config.activations is not None else None
    for fmt in WeightFormat:
        if fmt is config.format:
            continue
        try:
            with _quiet():
                result = quantize_with_report(model, twin_config(config, fmt, samples), data)
        except Exception as e:  # noqa: BLE001  (a twin is a hint: one that cannot be built is left out, said at debug level)
            logger.debug("no %s timing twin: %s", fmt.value, first_line(e))
            continue
        if fmt is not WeightFormat.QDQ and not uses_onnxq_ops(result.model):
            continue  # every layer stayed as the qdq format writes it
        twins[fmt] = save_model(result.model, folder / f"twin.{fmt.value}.onnx")
    return twins


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep a twin's build from logging what the real run already said (its warnings are about numbers nobody keeps)."""
    package = logging.getLogger("onnxq")
    level = package.level
    package.setLevel(logging.ERROR)
    try:
        yield
    finally:
        package.setLevel(level)


def measure_formats(model: Path, output: Path, config: QuantizeConfig, feed: Mapping[str, np.ndarray], samples: int,
                    compare: bool = True) -> Speed:
    """:func:`measure_speed` of the written model, with its twins in the other formats where ``compare``."""
    with tempfile.TemporaryDirectory(prefix="onnxq-twins-") as folder:
        twins = build_twins(model, config, feed, samples, Path(folder)) if compare else {}
        return measure_speed(model, output, feed, samples, twins)
