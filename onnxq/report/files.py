"""The files ``--report PATH`` writes: a JSON account of a quantization run, a Markdown summary, a PNG chart.

:class:`QuantizationReport` holds what the files say. Per-layer measurements that need
calibration data (``output_sqnr_db``, ``sensitivity_db``) are optional fields: the JSON has
them only when they are set, and the Markdown table gains a column for each one that is. A
new optional measurement is one more such field, with its column header in the field's
metadata.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxq.analysis.fidelity import Fidelity
from onnxq.config import QuantizeConfig
from onnxq.errors import OnnxqError
from onnxq.pipeline import LayerResult, QuantizationResult
from onnxq.plan.weights import Skipped
from onnxq.report.summary import file_size, human_bytes

#: What ``--report`` says when it cannot draw the chart.
NO_MATPLOTLIB = "chart skipped: matplotlib is not installed (pip install 'onnxq[report]')"


@dataclass(frozen=True)
class ReportPaths:
    """Where ``--report PATH`` writes: PATH as JSON with PATH.md and PATH.png beside it (PATH.md: the JSON goes beside)."""

    json: Path
    markdown: Path
    chart: Path

    @classmethod
    def from_option(cls, path: Path) -> ReportPaths:
        """The three paths for the value of ``--report``."""
        if path.suffix.lower() == ".md":
            return cls(path.with_suffix(".json"), path, path.with_suffix(".png"))
        if path.suffix.lower() == ".png":
            raise OnnxqError(path, "--report takes the .json or .md path; the chart goes beside it as .png")
        return cls(path, path.with_suffix(".md"), path.with_suffix(".png"))

    def check(self, models: Iterable[Path]) -> None:
        """Fail before any work if a report file would land on a model or a folder, or its folder is missing."""
        taken = {m.resolve() for m in models}
        taken |= {m.with_name(m.name + ".data") for m in taken}
        for path in (self.json, self.markdown, self.chart):
            resolved = path.resolve()
            if resolved in taken:
                raise OnnxqError(path, "report file would overwrite a model; choose another --report path")
            if not resolved.parent.is_dir():
                raise OnnxqError(path, f"report folder {resolved.parent} does not exist")
            if resolved.is_dir():
                raise OnnxqError(path, "report path is a folder; give a file name")


@dataclass(frozen=True)
class AlphaSummary:
    """A layer's range factors: median, extremes, and each output channel's (None when per tensor)."""

    median: float
    min: float
    max: float
    per_channel: tuple[float, ...] | None

    @classmethod
    def of(cls, alpha: Iterable[float], per_channel: bool) -> AlphaSummary:
        """Summarise the alphas of a layer's rows."""
        values = np.asarray(tuple(alpha), dtype=np.float64)
        if not values.size:
            return cls(math.nan, math.nan, math.nan, None)
        return cls(float(np.median(values)), float(values.min()), float(values.max()), tuple(map(float, values)) if per_channel else None)


@dataclass(frozen=True)
class LayerReport:
    """One quantized weight tensor as the report shows it; the last fields are measured only with calibration data."""

    tensor: str
    nodes: tuple[str, ...]
    op_types: tuple[str, ...]
    bits: int
    storage_bits: int
    format: str
    op: str
    granularity: str
    sqrt: bool
    alpha: AlphaSummary
    weight_sqnr_db: float
    float_bytes: int
    quantized_bytes: int
    output_sqnr_db: float | None = field(default=None, metadata={"header": "output SQNR dB"})
    sensitivity_db: float | None = field(default=None, metadata={"header": "sensitivity dB"})
    qdq_reason: str = ""  # why onnxq's ops do not run it although --format int/post asked for them

    @classmethod
    def from_result(cls, layer: LayerResult) -> LayerReport:
        """The report's view of a quantizer's :class:`LayerResult`."""
        return cls(
            tensor=layer.tensor,
            nodes=layer.nodes,
            op_types=layer.op_types,
            bits=layer.bits,
            storage_bits=layer.storage_bits,
            format="post" if layer.op == "PostConv" else "uniform",
            op=layer.op,
            granularity=(f"block {layer.block_size}" if layer.block_size else "channel") if layer.per_channel else "tensor",
            sqrt=layer.sqrt,
            alpha=AlphaSummary.of(layer.alpha or (layer.alpha_median,), layer.per_channel),
            weight_sqnr_db=layer.sqnr_db,
            float_bytes=layer.float_bytes,
            quantized_bytes=layer.quantized_bytes,
            qdq_reason=layer.qdq_reason,
        )


def optional_fields() -> list[dataclasses.Field]:
    """The per-layer fields that may be absent (declared with a column header)."""
    return [f for f in dataclasses.fields(LayerReport) if "header" in f.metadata]


@dataclass(frozen=True)
class QuantizationReport:
    """Everything ``--report`` writes about one run."""

    onnxq_version: str
    input: str | None
    output: str
    input_file_bytes: int | None
    output_file_bytes: int
    config: QuantizeConfig
    layers: tuple[LayerReport, ...]
    skipped: tuple[Skipped, ...]
    check: Fidelity | None = None  # the written model against the float one, when the run had data

    def with_layer_values(self, values: Mapping[str, Mapping[str, float]]) -> QuantizationReport:
        """A copy with optional per-layer fields set, given as ``{tensor: {field: value}}`` (e.g. sensitivity)."""
        allowed = {f.name for f in optional_fields()}
        unknown = {k for v in values.values() for k in v} - allowed
        if unknown:
            raise ValueError(f"not optional layer fields: {', '.join(sorted(unknown))} (known: {', '.join(sorted(allowed))})")
        layers = tuple(dataclasses.replace(layer, **values.get(layer.tensor, {})) for layer in self.layers)
        return dataclasses.replace(self, layers=layers)

    def most_sensitive(self, count: int = 3) -> list[LayerReport]:
        """Up to ``count`` layers with a measured sensitivity, the most sensitive (lowest model-output SQNR) first."""
        measured = [layer for layer in self.layers if layer.sensitivity_db is not None]
        return sorted(measured, key=lambda layer: layer.sensitivity_db)[:count]

    def totals(self) -> dict[str, object]:
        """Counts and sizes over all layers (and the most sensitive layer's nodes, when sensitivity was measured)."""
        float_bytes = sum(layer.float_bytes for layer in self.layers)
        quantized_bytes = sum(layer.quantized_bytes for layer in self.layers)
        sensitive = {"most_sensitive": list(self.most_sensitive(1)[0].nodes)} if self.most_sensitive(1) else {}
        return sensitive | {
            "layers": len(self.layers),
            "skipped": len(self.skipped),
            "layers_by_bits": {str(b): n for b, n in sorted(Counter(layer.bits for layer in self.layers).items())},
            "sqrt_layers": sum(layer.sqrt for layer in self.layers),
            "float_bytes": float_bytes,
            "quantized_bytes": quantized_bytes,
            "weight_ratio": quantized_bytes / float_bytes if float_bytes else None,
            "input_file_bytes": self.input_file_bytes,
            "output_file_bytes": self.output_file_bytes,
            "file_ratio": self.output_file_bytes / self.input_file_bytes if self.input_file_bytes else None,
        }

    def to_dict(self) -> dict[str, object]:
        """The report as JSON-ready values (non-finite numbers as the strings "inf", "-inf", "nan")."""
        out = plain(self)
        out["totals"] = plain(self.totals())
        return out

    def to_json(self) -> str:
        """The JSON file's text."""
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"


def plain(value: object) -> object:
    """``value`` as JSON values: dataclasses as objects (optional fields left out while None), enums by value."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None and "header" in f.metadata:
                continue
            out[f.name] = plain(item)
        return out
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.generic, float)) and not isinstance(value, (bool, np.bool_)):
        number = value.item() if isinstance(value, np.generic) else value
        if isinstance(number, float) and not math.isfinite(number):
            return str(number)
        return number
    return value


def build_report(result: QuantizationResult, config: QuantizeConfig, output: Path, source: Path | None = None) -> QuantizationReport:
    """The report of a run whose model was written to ``output`` (from the file ``source``, if it came from one)."""
    from onnxq import __version__

    return QuantizationReport(
        onnxq_version=__version__,
        input=str(source) if source is not None else None,
        output=str(output),
        input_file_bytes=file_size(source) if source is not None else None,
        output_file_bytes=file_size(output),
        config=config,
        layers=tuple(LayerReport.from_result(layer) for layer in result.layers),
        skipped=tuple(result.skipped),
    )


def _cell(value: object) -> str:
    """A Markdown table cell: numbers rounded, pipes escaped."""
    if isinstance(value, float):
        return f"{value:.2f}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|")


def to_markdown(report: QuantizationReport) -> str:
    """The Markdown summary: the run in a few lines, a table of layers, and the layers left in float."""
    totals = report.totals()
    by_bits = ", ".join(f"{n} at {b} bits" for b, n in totals["layers_by_bits"].items())
    config = ", ".join(f"{k} {v if isinstance(v, str) else json.dumps(v)}" for k, v in plain(report.config).items())
    lines = ["# onnxq quantization report", ""]
    size = f"{human_bytes(report.output_file_bytes)}"
    if report.input is not None and report.input_file_bytes:
        lines.append(f"- input: `{report.input}` ({human_bytes(report.input_file_bytes)})")
        size += f", {totals['file_ratio']:.3f}x of the input"
    lines += [
        f"- output: `{report.output}` ({size})",
        f"- onnxq {report.onnxq_version}; {config}",
        f"- {totals['layers']} weight tensors quantized: {by_bits} ({totals['sqrt_layers']} in sqrt mode); "
        f"weights {human_bytes(totals['float_bytes'])} -> {human_bytes(totals['quantized_bytes'])}",
    ]
    if report.check is not None:
        lines.append(f"- {report.check.line()}")
    if ranked := report.most_sensitive():
        named = "; ".join(f"`{', '.join(layer.nodes)}` {layer.sensitivity_db:.1f} dB at {layer.bits} bits" for layer in ranked)
        lines.append(f"- most sensitive (model output SQNR with only that layer's weights quantized): {named}")
    lines.append("")
    extra = [f for f in optional_fields() if any(getattr(layer, f.name) is not None for layer in report.layers)]
    header = ["nodes", "op types", "bits", "format", "op", "granularity", "sqrt", "alpha median (min-max)", "weight SQNR dB"]
    header += [f.metadata["header"] for f in extra] + ["bytes float -> quantized"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for layer in report.layers:
        alpha = f"{layer.alpha.median:.3f} ({layer.alpha.min:.3f}-{layer.alpha.max:.3f})"
        cells = [", ".join(layer.nodes), ", ".join(layer.op_types), layer.bits, layer.format, layer.op, layer.granularity,
                 "yes" if layer.sqrt else "no", alpha, layer.weight_sqnr_db]
        cells += [getattr(layer, f.name) if getattr(layer, f.name) is not None else "" for f in extra]
        cells.append(f"{layer.float_bytes} -> {layer.quantized_bytes}")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if kept := [layer for layer in report.layers if layer.qdq_reason]:
        lines += ["", "## Not run by onnxq's ops", "", "| nodes | runs as | reason |", "|---|---|---|"]
        lines += [f"| {_cell(', '.join(layer.nodes))} | {_cell(layer.op)} | {_cell(layer.qdq_reason)} |" for layer in kept]
    if report.skipped:
        lines += ["", "## Left in float", "", "| node | reason |", "|---|---|"]
        lines += [f"| {_cell(s.node)} | {_cell(s.reason)} |" for s in report.skipped]
    return "\n".join(lines) + "\n"


def write_report(report: QuantizationReport, paths: ReportPaths) -> str:
    """Write the JSON, Markdown and (with matplotlib) PNG files atomically; return the line the CLI prints."""
    from onnxq.model.save import write_files
    from onnxq.report.chart import render_chart

    files = {paths.json: report.to_json().encode(), paths.markdown: to_markdown(report).encode()}
    chart = render_chart(report)
    if chart is not None:
        files[paths.chart] = chart
    write_files(files)
    line = "report: " + ", ".join(str(p) for p in files)
    return line if chart is not None else f"{line} ({NO_MATPLOTLIB})"
