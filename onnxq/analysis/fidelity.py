"""The written model against the float one: output SQNR and top-1 agreement on sample inputs.

After a run with data (--calibration or --sensitivity-data) the CLI measures both files as onnxruntime runs them (the
quantized one with onnxq's op library where it needs it), so the user sees how close the model stayed before using it.
Without data it runs them on synthetic inputs and says nothing unless the output drifted far (a warning then): 4-bit
weights once turned a real text recognizer into garbage without a word.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxq.analysis.sensitivity import ErrorEnergy
from onnxq.calibrate.collect import sample_bytes
from onnxq.calibrate.data import CalibrationData, calibration_batches
from onnxq.calibrate.samples import RunSizer, batch_size, input_specs
from onnxq.model.load import read_model_file
from onnxq.native.session import session_options, uses_onnxq_ops

#: Samples the check runs (the same as a sensitivity measurement).
CHECK_SAMPLES = 64
_FLOAT_OUTPUTS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


@dataclass(frozen=True)
class Fidelity:
    """How the quantized model's outputs compare with the float model's on ``samples`` inputs.

    ``output_sqnr_db`` is the lowest over the float outputs (``worst_output`` names it when there are several);
    ``top1_agreement`` is the share of samples whose arg-max agrees, for the first output of shape (N, classes).
    """

    samples: int
    output_sqnr_db: float
    worst_output: str | None
    top1_agreement: float | None

    def line(self, data: str = "") -> str:
        """What the CLI prints; ``data`` says where the samples came from (e.g. "the calibration data")."""
        where = f" ({self.worst_output})" if self.worst_output else ""
        agree = f", top-1 agrees on {100 * self.top1_agreement:.1f}% of them" if self.top1_agreement is not None else ""
        of = f" of {data}" if data else ""
        return f"checked against the float model on {self.samples} samples{of}: output SQNR {self.output_sqnr_db:.1f} dB{where}{agree}"


def check_against_float(
    float_path: str | os.PathLike[str], quantized_path: str | os.PathLike[str], data: CalibrationData, samples: int = CHECK_SAMPLES,
    quiet: bool = False,
) -> Fidelity | None:
    """Run both files on up to ``samples`` inputs of ``data``; None when the model has no float output to compare.

    ``quiet``: onnxruntime logs nothing, not even the errors of a run that fails (inputs the model may reject).
    """
    import onnxruntime as ort

    header = read_model_file(Path(float_path))
    outputs = [o.name for o in header.graph.output if o.type.tensor_type.elem_type in _FLOAT_OUTPUTS]
    if not outputs:
        return None
    options = [session_options(custom_ops=uses_onnxq_ops(path)) for path in (float_path, quantized_path)]
    if quiet:
        for option in options:
            option.log_severity_level = 4  # fatal only
    sessions = [ort.InferenceSession(os.fspath(path), option, providers=["CPUExecutionProvider"])
                for path, option in zip((float_path, quantized_path), options, strict=True)]
    energies = {name: ErrorEnergy() for name in outputs}
    classes = _class_output(header, outputs)
    agree = seen = 0
    specs = input_specs(header)
    sizer = RunSizer(specs, sample_bytes(header, outputs))
    for batch in calibration_batches(data, specs, samples):
        for piece in sizer.pieces(batch):
            reference, quantized = (dict(zip(outputs, s.run(outputs, piece), strict=True)) for s in sessions)
            sizer.record(piece, reference.values())
            for name in outputs:
                energies[name].add(reference[name], quantized[name])
            if classes is not None and np.ndim(reference[classes]) == 2:
                agree += int(np.sum(np.argmax(reference[classes], axis=1) == np.argmax(quantized[classes], axis=1)))
            seen += batch_size(piece, sizer.axes)
    worst = min(outputs, key=lambda name: energies[name].sqnr_db)
    top1 = agree / seen if classes is not None and seen else None
    return Fidelity(seen, energies[worst].sqnr_db, worst if len(outputs) > 1 else None, top1)


def _class_output(model: onnx.ModelProto, outputs: list[str]) -> str | None:
    """The first float output declared as (N, classes) with more than one class, or None."""
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        if value.name in outputs and len(dims) == 2 and dims[1].dim_value > 1:
            return value.name
    return None


#: Output SQNR (dB) under which the written model is said to be damaged. The shipped models at -b 4 keep 15-23 dB on
#: real inputs and their top-1; at -b 3 without data they fall to 6-9 dB and lose 3-7 points (tools/eval_output_aware.py).
DAMAGED_SQNR_DB = 10.0
#: Synthetic inputs the check runs without data.
SYNTHETIC_SAMPLES = 16
#: Lengths given to free dimensions other than the sample axis (a sequence, an image side), tried in turn until the
#: model runs: 16 keeps the check cheap; an audio model padding its input by 64 samples needs more.
SYNTHETIC_LENGTHS = (16, 256, 4096)


def synthetic_inputs(
    model: onnx.ModelProto, samples: int = SYNTHETIC_SAMPLES, seed: int = 0, length: int = SYNTHETIC_LENGTHS[0]
) -> list[dict[str, np.ndarray]]:
    """Inputs shaped as the model declares them, valued as their types suggest.

    Floats standard normal; integers from 0 to the row count of the table a Gather looks them up in (token ids), else
    small counts; booleans at random. An input of another type: no inputs (empty list).
    """
    rng = np.random.default_rng(seed)
    tables = _lookup_rows(model)
    feeds = []
    for _ in range(samples):
        feed = {}
        for spec in input_specs(model):
            shape = [1 if axis == spec.sample_axis else (dim or length) for axis, dim in enumerate(spec.dims)]
            if spec.dtype.kind == "f":
                feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif spec.dtype.kind in "iu":
                feed[spec.name] = rng.integers(0, tables.get(spec.name, 4), size=shape).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                feed[spec.name] = rng.random(shape) < 0.5
            else:
                return []
        feeds.append(feed)
    return feeds


def _lookup_rows(model: onnx.ModelProto) -> dict[str, int]:
    """Model inputs read as Gather indices, and the rows of the constant table they index."""
    tables = {t.name: t.dims[0] for t in model.graph.initializer if t.dims}
    return {n.input[1]: int(tables[n.input[0]]) for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables}


def check_on_synthetic(float_path: str | os.PathLike[str], quantized_path: str | os.PathLike[str]) -> Fidelity | None:
    """The check of :func:`check_against_float` on synthetic inputs, for runs without data; None where they do not run."""
    found = synthetic_check(float_path, quantized_path)
    return found[0] if found is not None else None


def synthetic_check(
    float_path: str | os.PathLike[str], quantized_path: str | os.PathLike[str]
) -> tuple[Fidelity | None, list[dict[str, np.ndarray]]] | None:
    """:func:`check_on_synthetic`, and the synthetic inputs the model ran on; None where none run."""
    header = read_model_file(Path(float_path))
    for length in SYNTHETIC_LENGTHS:
        feeds = synthetic_inputs(header, length=length)
        if not feeds:
            return None
        try:
            return check_against_float(float_path, quantized_path, feeds, len(feeds), quiet=True), feeds
        except Exception:  # noqa: BLE001, S112  (a model these values cannot drive, e.g. too short for its padding: try longer)
            continue
    return None


@dataclass(frozen=True)
class RunKind:
    """What the quantization run did, for :func:`damage_warning`'s advice: data given, activations quantized, by ASQ.

    ``op_inputs``: weight-only in an op format (--format int/post), whose ops quantize their float inputs to uint8 at
    every call; ``bits``: -b.
    """

    calibrated: bool = False
    activations: bool = False
    asq: bool = False
    op_inputs: bool = False
    bits: int = 4


def damage_warning(check: Fidelity, data: str, run: RunKind = RunKind()) -> str | None:
    """A ``warning:`` line saying what to do, when the output SQNR of ``check`` is under DAMAGED_SQNR_DB; else None.

    What it suggests follows what ``run`` did: data for the weights where there was none; with quantized activations
    (fixed steps), ASQ's per-input steps or float activations (one-off, the real layout detector of
    tools/eval_real_models.py W4A8 on 32 calibration and 6 held-out pages: mse steps 9.2 dB of output SQNR, percentile
    11.0, entropy 10.1, ASQ 16.8, float activations 17.9; no single activation pair was to blame, each of 173 cost up to
    0.9 dB); float activations where ASQ was used already (the same detector W4A8 ASQ in the int format, 256 pages: F1 13,
    7.2 dB, against 92.9 and 21.1 dB weights only; one-off, 2026-12-05); and always more bits or the sensitive layers
    at 8. Weight-only in an op format, the qdq format, whose weight-only activations stay float (the real layout detector
    at -b 8 without data: 2.5 dB on synthetic inputs and F1 55 against the float model's detections in the int format,
    29.3 dB and F1 97.5 in qdq; BENCHMARKS). At -b 8 more bits are no answer: leaving the weakest layers float is.
    """
    if check.output_sqnr_db >= DAMAGED_SQNR_DB:
        return None
    advice = []
    if run.op_inputs:
        advice.append("--format qdq (its weight-only models keep activations float, where the ops quantize every input to uint8)")
    if not run.calibrated:
        advice.append("give --calibration DATA (weights then chosen for the layers' outputs)")
    elif run.activations and not run.asq:
        advice.append("--calibrate asq (a step per input: on a real detector it won back most of what fixed steps lost) or "
                      "--activations none (weights only)")
    elif run.activations:
        advice.append("--activations none (weights only)")
    if run.bits >= 8:
        advice.append("--exclude the layers that cannot take 8 bits (--report PATH with --sensitivity-data DATA ranks them)")
    else:
        advice.append("more bits (-b)")
        budget = "--max-drop DB with --sensitivity-data DATA" if not run.calibrated else "--max-drop DB or --target-size SIZE"
        advice.append(f"{budget} to keep the sensitive layers at 8 bits")
    listed = advice[0] if len(advice) == 1 else ", ".join(advice[:-1]) + ", or " + advice[-1]
    return (f"warning: the quantized model's output drifted from the float model's (output SQNR {check.output_sqnr_db:.1f} dB on "
            f"{data}; under {DAMAGED_SQNR_DB:.0f} dB models tend to lose accuracy): {listed}")
