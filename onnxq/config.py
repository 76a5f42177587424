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
    INT and POST apply to 2-D Conv layers and to Gemm/MatMul with a constant 2-D weight (as 1x1
    convolutions, onnxq/rewrite/gemm.py); other layers, and the first and last, use QDQ.
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
    AUTO = "auto"  # per layer, whichever of plain/sqrt gives the lower error (weight MSE up to 5 bits without data; output error with data)


class NBitsMode(enum.Enum):
    """Which weight-only Gemm/MatMul weights run as onnxruntime's MatMulNBits (the rest are decoded when the model loads).

    MatMulNBits keeps the codes in memory and multiplies them directly, which pays where reading the weight dominates
    (large weights, few input rows: 1.2-5x float at one row, tools/bench_ops.py); with many rows a float product of the
    weight decoded at load ran as fast or faster on the AVX-512 machines measured (BENCHMARKS: MatMul weights).
    """

    AUTO = "auto"  # weights of NBITS_AUTO_WEIGHTS values or more
    ON = "on"  # every weight-only Gemm/MatMul weight the op can run
    OFF = "off"


#: NBitsMode.AUTO's least weight size (values): 4 MB in float32, past the caches of the CPUs measured.
NBITS_AUTO_WEIGHTS = 1 << 20


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if onnxq can store it, else raise ValueError naming the allowed range."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return int(bits)


class CalibrationMethod(enum.Enum):
    """How an activation's range is chosen from calibration data."""

    MINMAX = "minmax"  # the observed min/max
    PERCENTILE = "percentile"  # drop the most extreme (100 - percentile) % on each side
    ENTROPY = "entropy"  # least KL divergence between the histogram and its quantized copy (TensorRT)
    MSE = "mse"  # least quantization MSE, by the golden-section search used for weights
    ASQ = "asq"  # MSE range times a per-input factor computed in the graph by a tiny adapter


class ReduceRange(enum.Enum):
    """Whether 8-bit weights that an integer product reads beside uint8 are cut to 7 bits (values -63..63).

    CPUs without VNNI add uint8 x int8 products in pairs into 16-bit sums (vpmaddubsw), which
    full 8-bit weights can saturate and 7-bit weights never do. onnxruntime's kernels then give
    wrong sums; onnxq's ops stay exact by running 8-bit codes as two streams of 4-bit halves,
    which costs them their speed (an 8-bit IntConv runs at 0.5-1.15x float as on an AVX2-only
    CPU, a 7-bit one at 1.45-2x: BENCHMARKS "8-bit weights in the ops").

    AUTO: when the machine running onnxq lacks VNNI, the weights of onnxq's ops (--format
    int/post, weight-only too) and of onnxruntime's integer kernels (QDQ beside quantized
    activations); weights decoded to float keep 8 bits. The seventh bit is worth keeping where
    it can be: it took MiniLM's output SQNR from 22.7 to 8.4 dB (BENCHMARKS). ON: every 8-bit
    weight, for files that run on CPUs without VNNI. OFF: none.
    """

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class BiasCorrection(enum.Enum):
    """How Conv/Gemm biases absorb the mean output shift that quantization causes (needs calibration data).

    ANALYTIC: each layer's weight error times its float input's channel means (one formula per layer).
    MEASURED: ANALYTIC, then each layer's remaining shift measured in a simulation of the quantized
        model on calibration samples, layer by layer (a pass over the samples per level of depth).
    AUTO: MEASURED when activations have fewer than 7 bits, or weights have and were not chosen for their layers'
        outputs (``output_aware``); else ANALYTIC (at 7-8 bits the shifts are tiny and the passes not worth their
        time; with weights chosen on the data the measured passes took real models apart at W4A8, pipeline.py).
    """

    AUTO = "auto"
    MEASURED = "measured"
    ANALYTIC = "analytic"
    OFF = "off"


ACTIVATION_BITS = (4, 8)


@dataclass(frozen=True)
class ActivationConfig:
    """Quantization of activations (needs calibration data).

    Attributes:
        bits: activation code width: 8 (uint8) or 4 (uint4, opset 21).
        method: how ranges are chosen.
        percentile: the percentile kept by ``CalibrationMethod.PERCENTILE``.
        samples: most calibration samples to use.
        bias_correction: how each Conv/Gemm bias absorbs the mean output shift quantization causes
            (``True``/``False`` mean AUTO/OFF).
        equalize: divide MatMul/Gemm inputs with outlier channels per channel and multiply the weight rows back
            (onnxq/calibrate/equalize.py), where an estimate of the output noise says it pays. Not with ASQ, whose
            per-channel steps do that work and fought with it (the ViT at W4A4: 85.85 % against 86.31 % without).
    """

    bits: int = 8
    method: CalibrationMethod = CalibrationMethod.MSE
    percentile: float = 99.99
    samples: int = 512
    bias_correction: BiasCorrection = BiasCorrection.AUTO
    equalize: bool = True

    @property
    def equalizing(self) -> bool:
        """Whether activation-weight equalization runs (asked for, and not with ASQ)."""
        return self.equalize and self.method is not CalibrationMethod.ASQ

    def __post_init__(self) -> None:
        if isinstance(self.bias_correction, bool):
            object.__setattr__(self, "bias_correction", BiasCorrection.AUTO if self.bias_correction else BiasCorrection.OFF)
        if not isinstance(self.bias_correction, BiasCorrection):
            raise ValueError(f"bias_correction must be a BiasCorrection, got {self.bias_correction!r}")
        if self.bits not in ACTIVATION_BITS:
            raise ValueError(f"activation bits must be 4 or 8, got {self.bits!r}")
        if not isinstance(self.method, CalibrationMethod):
            raise ValueError(f"method must be a CalibrationMethod, got {self.method!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, numbers.Integral) or self.samples < 1:
            raise ValueError(f"calibration samples must be a positive integer, got {self.samples!r}")


def check_block_size(block_size: object) -> int:
    """``block_size`` if it is a power of two of 16 or more (MatMulNBits' rule for its blocks), else ValueError."""
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two of 16 or more, got {block_size!r}")
    return int(block_size)


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
        depthwise_bits: in the qdq format, the least bit width of depthwise convolution weights (a few KB of a model,
            and its most fragile layers at 4 bits); None treats them like any other. The op formats keep -b for them.
        exclude: node names to leave in float.
        node_bits: per-node bit widths that override the default and first/last rules (a tensor several nodes read gets the widest).
        tensor_bits: per-weight-tensor bit widths that override every other rule (what mixed precision chooses; a node may
            read several weights, e.g. an LSTM's W and R).
        activations: quantize activations too (needs calibration data); None keeps them float.
        output_aware: with calibration data, each weight's range and rounding minimise its layer's output error
            (second moments of its inputs, GPTQ's compensated rounding) instead of the weight's own error.
        samples: calibration samples the weights' statistics use when activations stay float (with activations, their
            ``samples``).
        fold_mean_shift: output-aware with float activations: weights whose layer has a bias (or takes an Add) are
            quantized for their inputs' covariance, and the mean output shift their codes cause goes into that bias.
        matmul_nbits: which weight-only Gemm/MatMul weights onnxruntime's MatMulNBits runs (the others are decoded
            when the model loads, or run by onnxq's ops in the int/post formats).
        block_size: weight-only models in the qdq format: a scale per output channel and block of this many consecutive
            inputs (a power of two, 16 or more: onnxruntime's MatMulNBits takes the same blocks) instead of one per
            channel, for codes below 8 bits; None: one per channel. Finer steps where a channel's weights differ in size,
            for a float16 scale a block (float32 where float16 does not hold it).
        balanced_rounding: without calibration data, codes below 8 bits are rounded so that each row's errors sum
            to nearly zero, which removes most of the steady output shift
            rounding causes behind Relu-like layers (onnxq/numerics/balance.py); False rounds each weight to nearest.
        reduce_range: which 8-bit weights become 7-bit codes, so that CPUs without VNNI sum their products in 16 bits
            without saturating (see ReduceRange).
    """

    bits: int = 4
    granularity: Granularity = Granularity.CHANNEL
    sqrt: SqrtMode = SqrtMode.AUTO
    range: RangeMethod = RangeMethod.SEARCH
    format: WeightFormat = WeightFormat.QDQ
    first_last_bits: int | None = 8
    depthwise_bits: int | None = 8
    exclude: frozenset[str] = field(default_factory=frozenset)
    node_bits: Mapping[str, int] = field(default_factory=dict)
    tensor_bits: Mapping[str, int] = field(default_factory=dict)
    activations: ActivationConfig | None = None
    output_aware: bool = True
    samples: int = 512
    fold_mean_shift: bool = True
    matmul_nbits: NBitsMode = NBitsMode.AUTO
    balanced_rounding: bool = True
    block_size: int | None = None
    reduce_range: ReduceRange = ReduceRange.AUTO

    @property
    def calibration_samples(self) -> int:
        """Samples a calibration pass reads: the activations' count with activations, else ``samples``."""
        return self.activations.samples if self.activations is not None else self.samples

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if isinstance(self.samples, bool) or not isinstance(self.samples, numbers.Integral) or self.samples < 1:
            raise ValueError(f"calibration samples must be a positive integer, got {self.samples!r}")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        if self.depthwise_bits is not None:
            check_bits(self.depthwise_bits, "depthwise_bits")
        for name, bits in self.node_bits.items():
            check_bits(bits, f"bits for node {name!r}")
        for name, bits in self.tensor_bits.items():
            check_bits(bits, f"bits for weight {name!r}")
        if not isinstance(self.granularity, Granularity):
            raise ValueError(f"granularity must be a Granularity, got {self.granularity!r}")
        if not isinstance(self.sqrt, SqrtMode):
            raise ValueError(f"sqrt must be a SqrtMode, got {self.sqrt!r}")
        if not isinstance(self.range, RangeMethod):
            raise ValueError(f"range must be a RangeMethod, got {self.range!r}")
        if not isinstance(self.matmul_nbits, NBitsMode):
            raise ValueError(f"matmul_nbits must be an NBitsMode, got {self.matmul_nbits!r}")
        if not isinstance(self.format, WeightFormat):
            raise ValueError(f"format must be a WeightFormat, got {self.format!r}")
        if not isinstance(self.reduce_range, ReduceRange):
            raise ValueError(f"reduce_range must be a ReduceRange, got {self.reduce_range!r}")
        if self.format is WeightFormat.POST and self.bits > 4:
            raise ValueError(f"POST weights take 2-4 bits, got {self.bits}")
        if self.activations is not None and not isinstance(self.activations, ActivationConfig):
            raise ValueError(f"activations must be an ActivationConfig or None, got {self.activations!r}")
        if self.block_size is not None:
            check_block_size(self.block_size)
            if self.bits == 8:
                raise ValueError("blocks of inputs with scales of their own are for codes below 8 bits (-b 2-7); 8-bit codes keep one per channel")
            if self.activations is not None or self.format is not WeightFormat.QDQ or self.granularity is not Granularity.CHANNEL:
                raise ValueError("blocks of inputs with scales of their own are for weight-only models in the qdq format, per channel "
                                 "(onnxruntime's integer kernels and onnxq's ops take one scale per channel): with --calibration, "
                                 "give --activations none")
        object.__setattr__(self, "exclude", frozenset(self.exclude))
