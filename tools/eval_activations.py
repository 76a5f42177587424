"""Accuracy of activation quantization: onnxq's calibration methods beside onnxruntime's quantize_static.

Per model (the shipped Fashion-MNIST ones by default): the first 512 images of the train split
calibrate, the full test split (10,000 images) measures top-1. Settings:
  W8A8  8-bit weights, uint8 activations
  W4A8  4-bit weights (first and last layers 8-bit), uint8 activations
  W4A4  4-bit weights as above, uint4 on the inputs of the 4-bit layers (8-bit elsewhere)
  W4A4-all  (only on request) as W4A4 with the first and last layers 4-bit too, where a fixed
        scale has more to lose, so that ASQ's per-input steps have more to win back
onnxq runs each of its methods (minmax, percentile, entropy, mse, asq), with its default bias
correction (measured with 4-bit activations; analytic at W4A8 since the weights are chosen on the data)
and, at W4A4, once more with the analytic correction alone. quantize_static (QDQ,
per channel, QUInt8 activations, QInt8/QInt4 weights) runs MinMax, Entropy and Percentile on the
same BN-folded model onnxq sees (onnxq.model.prepare.prepare), with the same calibration batches and the
same bit allocation: onnxq's 8-bit first/last weights and its 4-bit activation tensors are given to
quantize_static as TensorQuantOverrides. Two more rows show quantize_static's plain calls (every
weight int4; every activation uint4), which have no onnxq counterpart.

    python tools/eval_activations.py [MODEL ...] [--settings W8A8 W4A8 W4A4 W4A4-all] [--out table.md]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxq import QuantizeConfig, quantize_with_report  # noqa: E402
from onnxq.analysis.datasets import FASHION_MNIST_DIR, LabelledImages, load_labelled  # noqa: E402
from onnxq.analysis.evaluate import accuracy  # noqa: E402
from onnxq.config import ActivationConfig, BiasCorrection, CalibrationMethod  # noqa: E402
from onnxq.model.prepare import prepare  # noqa: E402
from tools.machine import cpu_description  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = [REPO / "models" / "fmnist_resnet20.onnx", REPO / "models" / "fmnist_mobilenetv2.onnx"]
ONNXQ_METHODS = [CalibrationMethod.MINMAX, CalibrationMethod.PERCENTILE, CalibrationMethod.ENTROPY, CalibrationMethod.MSE, CalibrationMethod.ASQ]
ORT_METHODS = ["MinMax", "Entropy", "Percentile"]
FIXED = [m.value for m in ONNXQ_METHODS if m is not CalibrationMethod.ASQ]
BATCH = 32


@dataclass(frozen=True)
class Setting:
    """A bit-width setting of the table: weight bits and activation bits."""

    name: str
    weight_bits: int
    activation_bits: int
    first_last_bits: int = 8  # onnxq's default: first and last layers' weights stay 8-bit


SETTINGS = {
    s.name: s
    for s in (
        Setting("W8A8", 8, 8),
        Setting("W4A8", 4, 8),
        Setting("W4A4", 4, 4),
        Setting("W4A4-all", 4, 4, first_last_bits=4),  # first/last layers 4-bit too: more for the activation steps to win back
    )
}
DEFAULT_SETTINGS = ["W8A8", "W4A8", "W4A4"]


@dataclass
class Row:
    """One line of the table: top-1 per column (None where the column does not apply)."""

    model: str
    setting: str
    cells: dict[str, float | None] = field(default_factory=dict)
    note: str = ""


def calibration_batches(images: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"input": images[i : i + BATCH]} for i in range(0, len(images), BATCH)]


class ListReader:
    """onnxruntime's CalibrationDataReader over a list of batches (the same batches onnxq gets)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._items: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch, or None at the end."""
        return next(self._items, None)

    def rewind(self) -> None:
        """Nothing: onnxruntime reads the data once (some of its calibrators call this)."""


def ort_quantize(src: Path, out: Path, batches: list[dict[str, np.ndarray]], method: str, weight_bits: int, act_bits: int, overrides: dict) -> None:
    """quantize_static, QDQ, per channel, uint activations; its progress prints are swallowed."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization import CalibrationMethod as OrtMethod

    class Reader(ListReader, CalibrationDataReader):
        pass

    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(src),
            str(out),
            Reader(batches),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8 if act_bits == 8 else QuantType.QUInt4,
            weight_type=QuantType.QInt8 if weight_bits == 8 else QuantType.QInt4,
            calibrate_method=getattr(OrtMethod, method),
            extra_options={"TensorQuantOverrides": overrides} if overrides else None,
        )


def matched_overrides(report, setting: Setting) -> dict:
    """TensorQuantOverrides giving quantize_static onnxq's allocation: 8-bit weights and 4-bit activations where onnxq has them."""
    from onnxruntime.quantization import QuantType

    overrides = {}
    if setting.weight_bits == 4:
        overrides.update({layer.tensor: [{"quant_type": QuantType.QInt8}] for layer in report.layers if layer.bits == 8})
    if setting.activation_bits == 4:
        overrides.update({q.tensor: [{"quant_type": QuantType.QUInt4}] for q in report.activations if q.params.bits == 4})
    return overrides


def model_digest(path: Path) -> str:
    """Digest of a model's initializers (to notice two methods that chose identical ranges)."""
    model = onnx.load(str(path))
    h = hashlib.sha256()
    for tensor in sorted(model.graph.initializer, key=lambda t: t.name):
        h.update(tensor.name.encode())
        h.update(tensor.SerializeToString())
    return h.hexdigest()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluate_model(
    model: Path, settings: list[Setting], calib: list[dict[str, np.ndarray]], test: LabelledImages, tmp: Path
) -> tuple[list[Row], list[str]]:
    """The rows of one model, and notes on identical quantize_static outputs."""
    base = accuracy(model, test).top1
    rows = [Row(model.stem, "float", {"float": base})]
    notes: list[str] = []
    src = tmp / f"{model.stem}.prepared.onnx"
    onnx.save(prepare(onnx.load(str(model))), str(src))
    for setting in settings:
        row = Row(model.stem, setting.name)
        report = None
        for method in ONNXQ_METHODS:
            start = time.perf_counter()
            act = ActivationConfig(bits=setting.activation_bits, method=method)
            config = QuantizeConfig(bits=setting.weight_bits, first_last_bits=setting.first_last_bits, activations=act)
            report = quantize_with_report(model, config, calib)
            row.cells[method.value] = accuracy(report.model.SerializeToString(), test).top1
            log(f"{model.stem} {setting.name} onnxq {method.value}: {100 * row.cells[method.value]:.2f} ({time.perf_counter() - start:.0f} s)")
        overrides = matched_overrides(report, setting)
        digests = {}
        for method in ORT_METHODS:
            start = time.perf_counter()
            out = tmp / f"{model.stem}.{setting.name}.{method}.onnx"
            ort_quantize(src, out, calib, method, setting.weight_bits, 8, overrides)
            row.cells[f"ort {method}"] = accuracy(out, test).top1
            digests[method] = model_digest(out)
            log(f"{model.stem} {setting.name} quantize_static {method}: {100 * row.cells[f'ort {method}']:.2f} ({time.perf_counter() - start:.0f} s)")
        same = [m for m in ORT_METHODS[1:] if digests[m] == digests["MinMax"]]
        if same:
            notes.append(f"{model.stem} {setting.name}: quantize_static's {' and '.join(same)} output is identical to its MinMax output")
        rows.append(row)
        if setting.activation_bits == 4 and setting.first_last_bits == 8:
            rows.append(analytic_row(model, setting, calib, test))
        if setting.weight_bits == 4 and setting.first_last_bits == 8:
            rows.append(plain_ort_row(model, src, setting, calib, test, tmp))
    return rows, notes


def analytic_row(model: Path, setting: Setting, calib: list[dict[str, np.ndarray]], test: LabelledImages) -> Row:
    """The row of onnxq's methods with the analytic bias correction only (no measured pass): each method on its own."""
    row = Row(model.stem, f"{setting.name}, onnxq with analytic bias correction only")
    for method in ONNXQ_METHODS:
        act = ActivationConfig(bits=setting.activation_bits, method=method, bias_correction=BiasCorrection.ANALYTIC)
        report = quantize_with_report(model, QuantizeConfig(bits=setting.weight_bits, activations=act), calib)
        row.cells[method.value] = accuracy(report.model.SerializeToString(), test).top1
        log(f"{model.stem} {row.setting} {method.value}: {100 * row.cells[method.value]:.2f}")
    return row


def plain_ort_row(model: Path, src: Path, setting: Setting, calib: list[dict[str, np.ndarray]], test: LabelledImages, tmp: Path) -> Row:
    """quantize_static's plain call for a 4-bit setting: every weight int4 (and at A4 every activation uint4)."""
    what = "every weight int4" + (", every activation uint4" if setting.activation_bits == 4 else "")
    row = Row(model.stem, f"{setting.name}, quantize_static alone: {what}")
    for method in ORT_METHODS:
        out = tmp / f"{model.stem}.{setting.name}.plain.{method}.onnx"
        ort_quantize(src, out, calib, method, setting.weight_bits, setting.activation_bits, {})
        row.cells[f"ort {method}"] = accuracy(out, test).top1
        log(f"{model.stem} {row.setting} {method}: {100 * row.cells[f'ort {method}']:.2f}")
    return row


COLUMNS = [m.value for m in ONNXQ_METHODS] + [f"ort {m}" for m in ORT_METHODS]


def table(rows: list[Row]) -> list[str]:
    header = "| model | setting | " + " | ".join(f"onnxq {c}" if not c.startswith("ort ") else f"quantize_static {c[4:]}" for c in COLUMNS) + " |"
    lines = [header, "|---|---|" + "---:|" * len(COLUMNS)]
    base = {}
    for row in rows:
        if row.setting == "float":
            base[row.model] = row.cells["float"]
            lines.append(f"| {row.model} | float | {100 * base[row.model]:.2f} |" + " |" * (len(COLUMNS) - 1))
            continue
        cells = []
        for column in COLUMNS:
            value = row.cells.get(column)
            cells.append("" if value is None else f"{100 * value:.2f} ({100 * (value - base[row.model]):+.2f})")
        lines.append(f"| {row.model} | {row.setting} | " + " | ".join(cells) + " |")
    return lines


def verdicts(rows: list[Row]) -> list[str]:
    """The issue's targets, checked against the measured rows."""
    limits = {"W8A8": 0.2, "W4A8": 1.0}
    base = {r.model: r.cells["float"] for r in rows if r.setting == "float"}
    lines = []
    for row in rows:
        if row.setting not in SETTINGS:
            continue
        drop = {c: 100 * (base[row.model] - v) for c, v in row.cells.items() if v is not None}
        best_onnxq = max(FIXED + ["asq"], key=lambda c: row.cells[c])
        best_ort = max((c for c in row.cells if c.startswith("ort ")), key=lambda c: row.cells[c])
        gap = 100 * (row.cells[best_onnxq] - row.cells[best_ort])
        text = f"- {row.model} {row.setting}: best onnxq {best_onnxq} {-drop[best_onnxq]:+.2f} pp"
        text += f", best quantize_static {best_ort[4:]} {-drop[best_ort]:+.2f} pp (onnxq {gap:+.2f} pp)"
        worse = [c for c in FIXED + ["asq"] if row.cells[c] < row.cells[best_ort]]
        if worse:
            text += f"; below quantize_static's best: {', '.join(worse)}"
        if row.setting in limits:
            within = [c for c in FIXED + ["asq"] if drop[c] <= limits[row.setting]]
            text += f"; within {limits[row.setting]} pp of float: {', '.join(within) or 'none'}"
        if row.setting.startswith("W4A4"):
            best_fixed = max(FIXED, key=lambda c: row.cells[c])
            text += f"; ASQ vs best fixed ({best_fixed}): {100 * (row.cells['asq'] - row.cells[best_fixed]):+.2f} pp"
        lines.append(text)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, default=MODELS)
    parser.add_argument(
        "--settings", nargs="+", choices=list(SETTINGS), default=DEFAULT_SETTINGS, help="default: W8A8 W4A8 W4A4 (W4A4-all on request)"
    )
    parser.add_argument("--data", type=Path, default=FASHION_MNIST_DIR)
    parser.add_argument("--calibration", type=int, default=512, help="calibration images: the first N of the train split")
    parser.add_argument("--test-size", type=int, help="evaluate on the first N test images only (a quick check; default all)")
    parser.add_argument("--out", type=Path, help="also write the Markdown to this file")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice to pre-process, once per call
    import onnxruntime

    train = load_labelled(args.data, "train").head(args.calibration)
    test = load_labelled(args.data, "test").head(args.test_size)
    calib = calibration_batches(train.images)
    rows, notes = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            model_rows, model_notes = evaluate_model(model, [SETTINGS[s] for s in args.settings], calib, test, Path(tmp))
            rows += model_rows
            notes += model_notes
    lines = [
        cpu_description(),
        f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, numpy {np.__version__}; {time.perf_counter() - start:.0f} s",
        f"calibration: the first {len(train.labels)} train images in batches of {BATCH}",
        f"top-1 % on {len(test.labels)} test images (change vs float in pp)",
        "",
        *table(rows),
        "",
        *verdicts(rows),
        *(f"- {n}" for n in notes),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
