"""The report's PNG bar chart of a per-layer measurement, drawn with matplotlib when it is installed (extra ``report``)."""

from __future__ import annotations

import importlib.util
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnxq.report.files import QuantizationReport

#: Measurements the chart can show, in order of preference, with their axis labels.
CHART_METRICS = (
    ("sensitivity_db", "model output SQNR with only this layer quantized (dB)"),
    ("weight_sqnr_db", "weight SQNR (dB)"),
)


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def chart_metric(report: QuantizationReport) -> tuple[str, str]:
    """The first measurement in :data:`CHART_METRICS` that some layer has, and its label."""
    for name, label in CHART_METRICS:
        if any(getattr(layer, name) is not None for layer in report.layers):
            return name, label
    return CHART_METRICS[-1]


def render_chart(report: QuantizationReport) -> bytes | None:
    """A horizontal bar per layer, coloured by bits, as PNG bytes; None when matplotlib is missing."""
    if not matplotlib_available():
        return None
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    name, label = chart_metric(report)
    layers = report.layers
    values = [getattr(layer, name) for layer in layers]
    values = [v if v is not None and math.isfinite(v) else math.nan for v in values]
    bits = sorted({layer.bits for layer in layers})
    palette = {b: f"C{i % 10}" for i, b in enumerate(bits)}
    figure = Figure(figsize=(8, 1.2 + 0.28 * max(len(layers), 1)), layout="constrained")
    axes = figure.add_subplot()
    positions = range(len(layers))
    axes.barh(positions, values, color=[palette[layer.bits] for layer in layers])
    axes.set_yticks(positions, [_short(", ".join(layer.nodes)) for layer in layers], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel(label)
    axes.set_title(f"{Path(report.output).name}: {len(layers)} quantized layers", fontsize=9)
    axes.grid(axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    axes.legend(handles=[Patch(color=palette[b], label=f"{b} bits") for b in bits], loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else name[: limit - 3] + "..."
