"""The ``onnxq`` command line: ``onnxq quantize``, ``onnxq inspect`` and ``onnxq evaluate``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from onnxq.config import (
    ACTIVATION_BITS,
    ActivationConfig,
    BiasCorrection,
    CalibrationMethod,
    Granularity,
    NBitsMode,
    QuantizeConfig,
    RangeMethod,
    ReduceRange,
    SqrtMode,
    WeightFormat,
)
from onnxq.errors import OnnxqError

if TYPE_CHECKING:
    from distributed import Client

    from onnxq.analysis.sensitivity import SensitivityAnalysis
    from onnxq.analysis.speed import Speed
    from onnxq.pipeline import CalibratedRun
    from onnxq.report.files import ReportPaths

BIT_CHOICES = range(2, 9)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors said in one line (exit status 2), like onnxq's other errors."""

    def error(self, message: str) -> NoReturn:
        """Print one line naming the problem and how to get help, then exit with status 2.

        The line starts ``onnxq: error:`` whatever the subcommand, like every other error.
        """
        self.exit(2, f"onnxq: error: {message} (see {self.prog} --help)\n")


def default_output(model: Path, bits: int, activation_bits: int | None = None) -> Path:
    """``model.onnx`` -> ``model.q4.onnx`` beside it (``model.w4a8.onnx`` with quantized activations)."""
    tag = f"q{bits}" if activation_bits is None else f"w{bits}a{activation_bits}"
    return model.with_name(f"{model.stem}.{tag}{model.suffix or '.onnx'}")


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    return common


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        parents=[_common_options()],
        help="quantize the weights of an ONNX model",
        description="Quantize the weights of Conv, ConvTranspose, Gemm, MatMul, Einsum, LSTM/GRU/RNN nodes and embedding "
        "tables (Gather) with REQuant's range search, float32 or float16, control-flow bodies included, and write a model "
        "that stock onnxruntime runs (int8/int4 weights decoded when the model loads, or by DequantizeLinear where "
        "activations are quantized; large MatMul weights as MatMulNBits; embeddings as GatherBlockQuantized).",
    )
    p.add_argument("model", type=Path, help="the float ONNX model (opset 13 or newer is best; older ones are converted)")
    p.add_argument("-b", "--bits", type=int, choices=BIT_CHOICES, default=4, metavar="BITS",
                   help="weight bits, 2-8 (default 4); 2-4 are stored as int4 (opset 21), 5-8 as int8")
    p.add_argument("-o", "--output", type=Path, help="output path (default: MODEL.qBITS.onnx beside the input)")
    p.add_argument("--granularity", choices=[g.value for g in Granularity], default=Granularity.CHANNEL.value,
                   help="one range per output channel (default) or per weight tensor")
    p.add_argument("--sqrt", choices=[m.value for m in SqrtMode], default=SqrtMode.AUTO.value,
                   help="quantize sign(w)*sqrt(|w|) and square after dequantization: 'auto' (default) picks "
                   "per layer whichever of plain/sqrt has the lower error, and plain codes where the weight runs as an "
                   "integer product (onnxq's ops, MatMulNBits, onnxruntime's kernels with 8-bit activations); 'on' forces sqrt")
    p.add_argument("--format", choices=[f.value for f in WeightFormat], default=WeightFormat.QDQ.value,
                   help="'qdq' (default): int8/int4 codes, runs in stock onnxruntime; "
                   "'int': Conv layers and large enough Gemm/MatMul run as integer convolutions by onnxq's op library (IntConv), "
                   "which quantize float inputs themselves at every call (a Gemm/MatMul's each row, a transformer's each token, "
                   "with its own step) unless activations are calibrated; "
                   "'post': the same layers use powers-of-sqrt(2) codes (2-4 bits) run with shifts (PostConv). "
                   "Models in 'int'/'post' need onnxq.get_library_path() registered in onnxruntime")
    p.add_argument("--matmul-nbits", choices=[m.value for m in NBitsMode], default=NBitsMode.AUTO.value,
                   help="weight-only Gemm/MatMul weights that run as onnxruntime's MatMulNBits, which multiplies the stored codes "
                   "(fast with few input rows, e.g. one token at a time): 'auto' (default) weights of 2^20 values or more, "
                   "'on' every one it can run, 'off' none. The others are decoded when onnxruntime loads the model and run "
                   "at float speed")
    p.add_argument("--block-size", type=int, metavar="N",
                   help="weight-only models (no quantized activations, qdq format): one scale per output channel and block of N "
                   "consecutive inputs (a power of two, 16 or more) instead of one per channel. Finer steps where a channel's "
                   "weights differ in size: at 4 bits, blocks of 32 about halve the rounding error for about half a bit more per "
                   "weight (a float16 scale per block). Codes below 8 bits only. MatMulNBits runs the same blocks. Default: one "
                   "scale per channel")
    p.add_argument("--range", choices=[r.value for r in RangeMethod], default=RangeMethod.SEARCH.value,
                   help="'search' (default): REQuant's MSE-optimal clipping; 'absmax': full range, plain round-to-nearest")
    p.add_argument("--rounding", choices=["balanced", "nearest"], default="balanced",
                   help="codes chosen without data (no --calibration), 2-7 bits: "
                   "'balanced' (default) rounds each row so its errors sum to nearly zero, which removes the steady output "
                   "shift rounding causes behind Relu-like layers; 'nearest' rounds each weight to its nearest code. "
                   "8-bit codes and --range absmax always round to nearest")
    p.add_argument("--first-last-bits", type=int, choices=BIT_CHOICES, default=8, metavar="N",
                   help="bits for the first and last weighted layers (default 8); give the same value as -b to treat them like the rest")
    p.add_argument("--depthwise-bits", type=int, choices=BIT_CHOICES, default=8, metavar="N",
                   help="qdq format: depthwise convolutions keep at least N bits (default 8: a few KB of a model, and at 4 bits "
                   "its most fragile layers); give the same value as -b to treat them like the rest. The op formats keep -b")
    p.add_argument("--exclude", nargs="+", default=[], metavar="NODE", help="names of nodes to leave in float")
    p.add_argument("--external-data", action="store_true",
                   help="store tensors in MODEL.data beside the output (automatic for inputs with external data and models over 1 GB)")
    p.add_argument("-v", "--verbose", action="store_true", help="print a line per quantized layer")
    p.add_argument("--no-speed", dest="speed", action="store_false",
                   help="do not time the written model against the float one (by default a few runs on one batch of the "
                        "calibration data, or of synthetic inputs, print its speed-up over float on this CPU, and the same "
                        "for the model built in the other formats, so the line says which format would be faster)")
    p.add_argument("--no-format-speeds", dest="format_speeds", action="store_false",
                   help="time the written model only, not its twins in the other formats (each twin is a quick build with "
                        "full-range weights: the same ops and shapes, not the same accuracy; models over 256 MB get none)")
    p.add_argument("--report", type=Path, metavar="PATH",
                   help="also write PATH as JSON (per layer: bits, format, alpha, weight SQNR, sizes; skipped layers; config), "
                   "a Markdown summary as PATH.md and, with matplotlib, a chart as PATH.png (PATH.md: the JSON goes beside it)")
    _add_activation_options(p)
    _add_sensitivity_options(p)
    _add_scale_out_options(p)
    p.set_defaults(run=_run_quantize)


def _add_activation_options(p: argparse.ArgumentParser) -> None:
    """Options of activation quantization; activations are quantized when --calibration is given."""
    a = p.add_argument_group("activations", "quantize activations too (W8A8, W4A8, W4A4); needs --calibration")
    a.add_argument("--calibration", type=Path, metavar="DATA",
                   help="calibration inputs: an .npy (one input) or an .npz keyed by input name, each array holding the "
                   "samples along the input's batch axis as the model declares it (axis 0 for [N, ...]; axis 1 for a "
                   "[2, N, H] recurrent state); scalars and fixed-size inputs are stored once and fed to every run "
                   "(-v says which axis each input uses); or a folder of images (resized to the model's input, scaled to [0, 1])")
    a.add_argument("--calibration-size", type=int, default=None, metavar="N",
                   help=f"use at most N calibration samples (default {ActivationConfig.samples})")
    a.add_argument("--calibrate", choices=[m.value for m in CalibrationMethod], default=None,
                   help="how activation ranges are chosen: 'minmax'; 'percentile' (see --percentile); 'entropy' (least KL "
                   "divergence, as TensorRT); 'mse' (default: least quantization error, golden-section search); "
                   "'asq': the MSE range times a per-input factor that a tiny adapter computes in the graph")
    a.add_argument("--activations", choices=[*map(str, ACTIVATION_BITS), "none"], default=None, metavar="BITS",
                   help="activation bits: 8 (uint8, default) or 4 (uint4, opset 21); 'none' keeps activations float and uses "
                   "the data for the weights only (see --output-aware)")
    a.add_argument("--output-aware", choices=["auto", "off"], default="auto",
                   help="'auto' (default): with --calibration, each weight's range and rounding minimise its layer's output "
                   "error on the data (GPTQ's compensated rounding on the second moments of the layer's inputs), not the "
                   "weight's own error; 'off': by the weight's own error, as without data"),
    a.add_argument("--percentile", type=float, default=None, metavar="P",
                   help=f"percentile kept by --calibrate percentile (default {ActivationConfig.percentile})")
    a.add_argument("--reduce-range", choices=[r.value for r in ReduceRange], default=ReduceRange.AUTO.value,
                   help="8-bit weights that integer products read become 7-bit codes, because CPUs without VNNI sum "
                   "uint8 x int8 products in 16-bit pairs that 8-bit weights can saturate: onnxruntime's kernels then go "
                   "wrong and onnxq's ops run them at float's speed or slower. 'auto' (default): when this CPU lacks VNNI, "
                   "the weights of onnxq's ops (--format int/post) and those beside quantized activations; 'on': every "
                   "8-bit weight (a file for CPUs without VNNI, quantized on one with it); 'off': none")
    a.add_argument("--equalize", choices=["auto", "off"], default=None,
                   help="'auto' (default): MatMul/Gemm inputs with outlier channels (a transformer's hidden states) are "
                   "divided per channel before they are quantized and the weight rows multiplied back, where an estimate "
                   "of the output error says it pays (not with --calibrate asq); 'off' never")
    a.add_argument("--bias-correction", choices=[b.value for b in BiasCorrection], default=None,
                   help="Conv/Gemm biases absorb the mean output shift quantization causes: 'analytic' (weight error times "
                   "the float input means), 'measured' (analytic, then the shift left in a simulation of the quantized model, "
                   "layer by layer, on 64 calibration samples), 'auto' (default: measured with 4-bit activations, "
                   "or 4-bit weights not chosen for the output; else analytic), 'off'")


def _add_sensitivity_options(p: argparse.ArgumentParser) -> None:
    """Options of per-layer sensitivity (in --report) and of mixed precision chosen by it."""
    from onnxq.analysis.sensitivity import SENSITIVITY_SAMPLES

    s = p.add_argument_group(
        "sensitivity and mixed precision",
        "per layer, the model output's SQNR with only that layer's weights quantized (activations float); measured on "
        "--sensitivity-data, else on --calibration's data, for --report, --target-size and --max-drop",
    )
    s.add_argument("--sensitivity-data", type=Path, metavar="DATA",
                   help="inputs to measure sensitivity on, in --calibration's formats, without quantizing activations")
    s.add_argument("--sensitivity", choices=["proxy", "measured"], default="proxy",
                   help="'proxy' (default): each layer's sensitivity predicted from its own output error on the data (one "
                   "pass of the model, the quantizer's own when the data are --calibration's and activations stay float; one "
                   "measured run to scale it: seconds); 'measured': a run of the model per layer and "
                   "width (minutes on large models; recurrent layers and layers in control-flow bodies are measured either way)")
    s.add_argument("--sensitivity-size", type=int, default=SENSITIVITY_SAMPLES, metavar="N",
                   help=f"use at most N samples to measure sensitivity (default {SENSITIVITY_SAMPLES}); the proxy's H are "
                   "summed over all --calibration samples where it shares the quantizer's pass")
    s.add_argument("--target-size", metavar="SIZE",
                   help="raise the most sensitive layers from -b bits to 8 while the weights fit SIZE: bytes (300000, 300KB, "
                   "1.5MiB), a ratio of the float weights (0.2x or 20%%) or average bits per weight (5bits); sizes count codes and scales")
    s.add_argument("--max-drop", type=float, metavar="DB",
                   help="raise the most sensitive layers until the model output's SQNR is at most DB below that of the "
                   "model with every raisable layer at 8 bits (with --target-size: within that size)")


def _add_scale_out_options(p: argparse.ArgumentParser) -> None:
    """Options that run the passes over the data on Dask workers."""
    d = p.add_argument_group(
        "scale-out", "run the passes over the data (calibration, the moments of output-aware weights, proxy sensitivity) on "
        "Dask workers, shard by shard; the written model is the one a run without them writes. Needs "
        '`pip install "onnxq[distributed]"`')
    d.add_argument("--workers", type=int, metavar="N", help="start N local worker processes (a dask.distributed LocalCluster)")
    d.add_argument("--scheduler", metavar="ADDRESS",
                   help="use the running Dask cluster whose scheduler is at ADDRESS (e.g. tcp://10.0.0.5:8786); its workers "
                   "need onnxq installed; the client reads the data and sends it to them")


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        parents=[_common_options()],
        help="list the weights of any ONNX model: format, bits, granularity, size per node",
        description="List what an ONNX model's weights are (float, int8/int4 QDQ, onnxruntime's QLinear/Integer/MatMulNBits "
        "ops, onnxq's IntConv/PostConv): per weighted node its format, bits, granularity, sqrt mode, activation "
        "quantization and stored bytes, then totals. Reads no weight values, so external data is not loaded.",
    )
    p.add_argument("model", type=Path, help="any ONNX model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_inspect)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from onnxq.analysis.datasets import FASHION_MNIST_DIR

    p = sub.add_parser(
        "evaluate",
        parents=[_common_options()],
        help="top-1 accuracy of image classifiers on labelled data",
        description="Print the top-1 accuracy of MODEL (and of a float baseline beside it) on labelled images.",
    )
    p.add_argument("model", type=Path, help="the model to evaluate")
    p.add_argument("--baseline", type=Path, help="a float model to compare against, evaluated on the same data")
    p.add_argument("--data", type=Path, default=FASHION_MNIST_DIR,
                   help=f"an IDX folder (MNIST layout) or an .npz with 'x' and 'y' (default: {FASHION_MNIST_DIR})")
    p.add_argument("--split", choices=["test", "train"], default="test", help="split of an IDX folder (default test)")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    p.set_defaults(run=_run_evaluate)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``onnxq`` command."""
    parser = _Parser(prog="onnxq", description="Post-training quantization of ONNX models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_quantize(sub)
    _add_inspect(sub)
    _add_evaluate(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> QuantizeConfig:
    """The QuantizeConfig the quantize options describe."""
    return QuantizeConfig(
        bits=args.bits,
        granularity=Granularity(args.granularity),
        sqrt=SqrtMode(args.sqrt),
        range=RangeMethod(args.range),
        format=WeightFormat(args.format),
        matmul_nbits=NBitsMode(args.matmul_nbits),
        first_last_bits=args.first_last_bits,
        depthwise_bits=args.depthwise_bits,
        exclude=frozenset(args.exclude),
        activations=_activation_config(args),
        output_aware=args.output_aware == "auto",
        balanced_rounding=args.rounding == "balanced",
        block_size=args.block_size,
        samples=ActivationConfig.samples if args.calibration_size is None else args.calibration_size,
        reduce_range=ReduceRange(args.reduce_range),
    )


#: Options that only mean something with --calibration.
_ACTIVATION_OPTIONS = ("calibration_size", "calibrate", "activations", "percentile", "bias_correction", "equalize")


def _activation_config(args: argparse.Namespace) -> ActivationConfig | None:
    """The ActivationConfig the activation options describe; None without --calibration."""
    given = [name for name in _ACTIVATION_OPTIONS if getattr(args, name) is not None]
    if args.calibration is None:
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --calibration DATA (activations are quantized only with calibration data)")
        return None
    if args.activations == "none":
        float_only = [name for name in given if name not in ("activations", "calibration_size")]
        if float_only:
            raise ValueError(f"--{float_only[0].replace('_', '-')} is about quantized activations, and --activations none keeps them float")
        return None
    d = ActivationConfig()
    return ActivationConfig(
        bits=d.bits if args.activations is None else int(args.activations),
        method=d.method if args.calibrate is None else CalibrationMethod(args.calibrate),
        percentile=d.percentile if args.percentile is None else args.percentile,
        samples=d.samples if args.calibration_size is None else args.calibration_size,
        bias_correction=d.bias_correction if args.bias_correction is None else BiasCorrection(args.bias_correction),
        equalize=d.equalize if args.equalize is None else args.equalize == "auto",
    )


def _run_quantize(args: argparse.Namespace) -> int:
    import dataclasses

    from onnxq.analysis.fidelity import SYNTHETIC_SAMPLES, RunKind, check_against_float, damage_warning, synthetic_check
    from onnxq.analysis.mixed_run import finish
    from onnxq.model.save import check_onnxruntime_loads, check_output_path, save_model
    from onnxq.report.summary import summary

    activation_bits = int(args.activations or ActivationConfig.bits) if args.calibration and args.activations != "none" else None
    output = args.output or default_output(args.model, args.bits, activation_bits)
    check_output_path(output, [args.model])
    report = _report_paths(args.report, [args.model, output])
    if not args.model.exists():
        raise OnnxqError(args.model, "no such file")
    try:
        config = config_from_args(args)
    except ValueError as e:
        raise OnnxqError(args.model, str(e)) from e
    unknown = sorted(config.exclude - _node_names(args.model))
    with _cluster(args) as client:
        analysis, config, run = _sensitivity(args, config, report is not None, client)
        if report is None:
            analysis = None  # only the report reads it: let its sessions and priced weights go before the weights are quantized
        result = finish(args.model, config, args.calibration, run, config.tensor_bits, client)
    if unknown:
        raise OnnxqError(args.model, f"--exclude names no node of this model: {', '.join(unknown)}")
    external = args.external_data or (result.source is not None and result.source.external_data)
    try:
        save_model(result.model, output, external_data=external)
    except OnnxqError:
        check_onnxruntime_loads(args.model)  # when onnxruntime refuses the input too, that is the problem to name
        raise
    print(summary(result, args.model, output, verbose=args.verbose))
    data, named = (args.sensitivity_data, "the sensitivity data") if args.sensitivity_data else (args.calibration, "the calibration data")
    if args.verbose and data is not None:
        from onnxq.calibrate.samples import describe_axes, input_specs
        from onnxq.model.load import read_model_file

        print(describe_axes(input_specs(read_model_file(args.model))))
    check = check_against_float(args.model, output, data) if data is not None else None
    if check is not None:
        print(check.line(named))
    synthetic = synthetic_check(args.model, output) if check is None else None
    blind = synthetic[0] if synthetic is not None else None
    run = RunKind(calibrated=args.calibration is not None, activations=config.activations is not None,
                  asq=config.activations is not None and config.activations.method is CalibrationMethod.ASQ,
                  op_inputs=config.activations is None and config.format is not WeightFormat.QDQ, bits=config.bits)
    if (warning := damage_warning(check, named, run) if check is not None
            else damage_warning(blind, f"{SYNTHETIC_SAMPLES} synthetic inputs", run) if blind is not None else None):
        print(warning)
    if args.speed and (speed := _speed(args.model, output, data, synthetic[1] if synthetic is not None else None,
                                       config, args.format_speeds)) is not None:
        print(speed.line())
    if report is not None:
        from onnxq.report.files import build_report, write_report

        built = dataclasses.replace(build_report(result, config, output, args.model), check=check)
        if analysis is not None:
            built = built.with_layer_values({layer.tensor: analysis.layer(layer.tensor, layer.bits).report_values() for layer in result.layers})
        print(write_report(built, report))
    return 0


def _speed(model: Path, output: Path, data: object, synthetic: list[dict] | None, config: QuantizeConfig,
           formats: bool) -> Speed | None:
    """The written model's speed against float on one run of the data (or of the synthetic inputs); None where none runs.

    With ``formats``, its twins in the other formats are timed beside it (onnxq/analysis/speed.py).
    """
    from onnxq.analysis.speed import SPEED_SAMPLES, measure_formats
    from onnxq.calibrate.data import calibration_batches
    from onnxq.calibrate.samples import batch_size, input_specs, sample_axes
    from onnxq.model.load import read_model_file

    specs = input_specs(read_model_file(model))
    if data is not None:
        feed = next(iter(calibration_batches(data, specs, SPEED_SAMPLES)), None)
    else:
        feed = synthetic[0] if synthetic else None
    if feed is None:
        return None
    try:
        return measure_formats(model, output, config, feed, batch_size(feed, sample_axes(specs)), formats)
    except Exception:  # noqa: BLE001  (the checks above ran these inputs; a failure here only loses the hint)
        return None


@contextlib.contextmanager
def _cluster(args: argparse.Namespace) -> Iterator[Client | None]:
    """The Dask client --workers/--scheduler ask for (None: everything runs here); its errors name the model."""
    from onnxq.distribute.cluster import cluster

    if (args.workers is not None or args.scheduler is not None) and args.calibration is None and args.sensitivity_data is None:
        option = "--workers" if args.workers is not None else "--scheduler"
        raise OnnxqError(args.model, f"{option} runs the passes over calibration data on Dask workers: give --calibration DATA")
    try:
        with cluster(args.workers, args.scheduler) as client:
            yield client
    except OnnxqError as e:
        if e.path is not None:
            raise
        raise OnnxqError(args.model, e.problem) from e


def _sensitivity(
    args: argparse.Namespace, config: QuantizeConfig, report: bool, client: Client | None = None
) -> tuple[SensitivityAnalysis | None, QuantizeConfig, CalibratedRun | None]:
    """The sensitivity analysis the options ask for (None if none), the config with mixed precision's bits, and a run.

    The run is the quantizer's, started where the analysis shares its calibration pass (onnxq/analysis/mixed_run.py;
    None: none, the quantizer runs afresh).
    """
    import dataclasses

    from onnxq.analysis.mixed_precision import TargetSize, choose_bits
    from onnxq.analysis.mixed_run import proxy_analysis
    from onnxq.analysis.sensitivity import SensitivityAnalysis

    mixed = args.target_size is not None or args.max_drop is not None
    data = args.sensitivity_data if args.sensitivity_data is not None else args.calibration
    try:
        target = TargetSize.parse(args.target_size) if args.target_size is not None else None
        if args.max_drop is not None and not args.max_drop >= 0:
            raise ValueError(f"--max-drop must be a non-negative number of dB, got {args.max_drop}")
        if args.sensitivity_size < 1:
            raise ValueError(f"--sensitivity-size must be a positive number of samples, got {args.sensitivity_size}")
        if mixed and data is None:
            option = "--target-size" if target else "--max-drop"
            raise ValueError(f"{option} needs data to measure sensitivity on: --sensitivity-data DATA or --calibration DATA")
        if args.sensitivity_data is not None and not (report or mixed):
            raise ValueError("--sensitivity-data is used by --report, --target-size and --max-drop; give one of them")
    except ValueError as e:
        raise OnnxqError(args.model, str(e)) from e
    if data is None or not (report or mixed):
        return None, config, None
    run = None
    if args.sensitivity == "proxy":
        analysis: SensitivityAnalysis
        analysis, run = proxy_analysis(args.model, config, args.calibration, args.sensitivity_data, args.sensitivity_size, client)
    else:
        analysis = SensitivityAnalysis(args.model, config, data, args.sensitivity_size, nodes=report, client=client)
    if not mixed:
        return analysis, config, run
    chosen = choose_bits(analysis, target, args.max_drop)
    print("\n".join(chosen.lines()))
    return analysis, dataclasses.replace(config, tensor_bits={**config.tensor_bits, **chosen.tensor_bits}), run


def _report_paths(option: Path | None, models: list[Path]) -> ReportPaths | None:
    """The files --report will write, checked before any work is done."""
    if option is None:
        return None
    from onnxq.report.files import ReportPaths

    paths = ReportPaths.from_option(option)
    paths.check(models)
    return paths


def _run_inspect(args: argparse.Namespace) -> int:
    import json

    from onnxq.analysis.inventory import inspect_model
    from onnxq.report.inventory import inventory_table

    inventory = inspect_model(args.model)
    print(json.dumps(inventory.to_dict(), indent=1) if args.json else inventory_table(inventory))
    return 0


def _node_names(model: Path) -> set[str]:
    """Node names as the quantizer sees them (after unnamed nodes get names), for checking --exclude."""
    from onnxq.model.load import read_model_file
    from onnxq.model.prepare import name_nodes

    graph = read_model_file(model).graph  # without external data: names only
    name_nodes(graph)
    return {n.name for n in graph.node}


def _run_evaluate(args: argparse.Namespace) -> int:
    from onnxq.analysis.datasets import load_labelled
    from onnxq.analysis.evaluate import accuracy

    data = load_labelled(args.data, args.split).head(args.limit)
    models = [args.baseline, args.model] if args.baseline else [args.model]
    results = [accuracy(m, data, threads=args.threads) for m in models]
    for r in results:
        print(f"{r.top1 * 100:7.2f} %  top-1  {r.model}")
    if args.baseline:
        print(f"{(results[1].top1 - results[0].top1) * 100:+7.2f} pp  vs baseline on {len(data.labels)} samples")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``onnxq`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.run(args)
    except OnnxqError as e:
        if args.debug:
            raise
        print(f"onnxq: error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, BrokenPipeError):
        return 130
    except Exception as e:  # a bug of ours: still one line, with the file, unless --debug
        if args.debug:
            raise
        where = getattr(args, "model", "")
        print(f"onnxq: error: {where}: unexpected {type(e).__name__}: {e} (rerun with --debug for a traceback)", file=sys.stderr)
        return 1
