"""Typed configuration of a quantization run, validated once where it is built."""

from __future__ import annotations

import enum
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

MIN_BITS = 2
MAX_BITS = 8


class Granularity(enum.Enum):
    """One range per weight tensor, or one per output channel."""

    TENSOR = "tensor"
    CHANNEL = "channel"


class WeightFormat(enum.Enum):
    """How quantized weights are stored and run.

    QDQ: uniform codes + DequantizeLinear, standard ONNX that stock onnxruntime runs.
    INT: uniform codes run as an integer convolution by onnxq's op library (IntConv).
    POST: powers-of-sqrt(2) codes run with shifts by onnxq's op library (PostConv); 2-4 bits.
    INT and POST apply to 2-D Conv layers; other layers, and the first and last, use QDQ.
    """

    QDQ = "qdq"
    INT = "int"
    POST = "post"


class RangeMethod(enum.Enum):
    """How the clipping range of a weight row is chosen."""

    SEARCH = "search"  # REQuant: the alpha with the least weight MSE
    ABSMAX = "absmax"  # the full range max|w| (plain round-to-nearest), for comparison


class SqrtMode(enum.Enum):
    """Whether weights are quantized in the square-root domain (REQuant's reshaping)."""

    OFF = "off"
    ON = "on"
    AUTO = "auto"  # per layer, whichever of plain/sqrt gives the lower weight MSE


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if onnxq can store it, else raise ValueError naming the allowed range."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return int(bits)


@dataclass(frozen=True)
class QuantizeConfig:
    """What to quantize and how.

    Attributes:
        bits: weight bit width for all layers not covered by another rule (2-8).
        granularity: per output channel (default) or per tensor.
        sqrt: quantize sign(w)*sqrt(|w|) instead of w; AUTO picks per layer.
        range: REQuant's alpha search (default) or the plain max|w| range.
        format: standard QDQ (default), or onnxq's integer ops (INT, POST) for Conv layers.
        first_last_bits: bit width of the first and last weighted layers; None treats them like any other.
        exclude: node names to leave in float.
        node_bits: per-node bit widths that override every other rule.
    """

    bits: int = 4
    granularity: Granularity = Granularity.CHANNEL
    sqrt: SqrtMode = SqrtMode.AUTO
    range: RangeMethod = RangeMethod.SEARCH
    format: WeightFormat = WeightFormat.QDQ
    first_last_bits: int | None = 8
    exclude: frozenset[str] = field(default_factory=frozenset)
    node_bits: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        for name, bits in self.node_bits.items():
            check_bits(bits, f"bits for node {name!r}")
        if not isinstance(self.granularity, Granularity):
            raise ValueError(f"granularity must be a Granularity, got {self.granularity!r}")
        if not isinstance(self.sqrt, SqrtMode):
            raise ValueError(f"sqrt must be a SqrtMode, got {self.sqrt!r}")
        if not isinstance(self.range, RangeMethod):
            raise ValueError(f"range must be a RangeMethod, got {self.range!r}")
        if not isinstance(self.format, WeightFormat):
            raise ValueError(f"format must be a WeightFormat, got {self.format!r}")
        if self.format is WeightFormat.POST and self.bits > 4:
            raise ValueError(f"POST weights take 2-4 bits, got {self.bits}")
        object.__setattr__(self, "exclude", frozenset(self.exclude))
