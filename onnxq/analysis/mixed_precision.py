"""Mixed precision by sensitivity: raise the layers whose quantization hurts the output most, within a budget.

Every layer starts at its planned bits (``-b``, first/last rule, per-node overrides). Each
layer can climb a short ladder of widths that cost more bytes: the widest of each storage
class above its start (int4 holds 2-4 bits, int8 5-8, so 4 -> 8 and 2 -> 4 -> 8; 5-7 bits
would cost as much as 8). A layer's cost of a rung is its measured model-output noise
energy with only it quantized at that width. Noise of independent layers adds up, so the
greedy step raises the layer that removes the most noise per extra byte, until the size
budget is spent (``--target-size``) or the output is good enough (``--max-drop``).

The result is a set of per-node bit widths: the ordinary quantizer then runs with them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.analysis.sensitivity import SensitivityAnalysis, energy_sqnr_db
from onnxq.errors import OnnxqError
from onnxq.numerics.uniform import quantized_bytes
from onnxq.numerics.weights import blocked, uses_blocks
from onnxq.report.summary import human_bytes

#: Widths a layer may be raised to: the widest of each storage class.
LADDER = (4, 8)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*([a-z]*|%)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class TargetSize:
    """A weight-size budget: bytes, a ratio of the float weights' bytes, or an average number of bits per weight.

    Sizes count what the report counts: weight codes (int4 packed two to a byte) plus float32 scales.
    """

    value: float
    unit: str  # "bytes", "ratio" or "bits"
    text: str

    @classmethod
    def parse(cls, text: str) -> TargetSize:
        """``300000``, ``300KB``, ``1.5MiB``, ``0.2x`` or ``20%`` (of the float weights) or ``5bits`` (average per weight)."""
        match = _SIZE.match(str(text))
        if match is None:
            raise ValueError(f"target size {text!r} is not a size: give bytes (300000, 300KB, 1.5MiB), a ratio of the float "
                             "weights (0.2x, 20%) or average bits per weight (5bits)")
        value = float(match.group(1)) * 10.0 ** int(match.group(2) or 0)
        unit = match.group(3).lower()
        if value <= 0 or not math.isfinite(value):
            raise ValueError(f"target size {text!r} must be positive")
        if unit in ("x", "%"):
            return cls(value / 100 if unit == "%" else value, "ratio", text)
        if unit in ("bit", "bits"):
            if not 1 <= value <= 32:
                raise ValueError(f"target size {text!r}: average bits must be from 1 to 32")
            return cls(value, "bits", text)
        if unit not in _UNITS:
            raise ValueError(f"target size {text!r} has an unknown unit {match.group(3)!r} (B, KB, MB, GB, KiB, MiB, GiB, x, % or bits)")
        return cls(value * _UNITS[unit], "bytes", text)

    def to_bytes(self, float_bytes: int, weights: int, scale_bytes: int) -> int:
        """The budget in bytes for weights taking ``float_bytes`` in float (``weights`` values, ``scale_bytes`` of scales)."""
        if self.unit == "ratio":
            return int(self.value * float_bytes)
        if self.unit == "bits":
            return int(self.value * weights / 8) + scale_bytes
        return int(self.value)


@dataclass(frozen=True)
class Rung:
    """One width a layer can take: its bits, its bytes, and the model-output noise energy it causes alone."""

    bits: int
    bytes: int
    noise: float


@dataclass(frozen=True)
class Candidate:
    """A layer and the widths it can climb through, its starting width first."""

    tensor: str
    nodes: tuple[str, ...]
    rungs: tuple[Rung, ...]


@dataclass(frozen=True)
class Raise:
    """One greedy step: a layer moved one rung up, with what it buys and costs."""

    tensor: str
    nodes: tuple[str, ...]
    before: Rung
    after: Rung

    @property
    def extra_bytes(self) -> int:
        """Bytes the step adds."""
        return self.after.bytes - self.before.bytes

    @property
    def gain(self) -> float:
        """Model-output noise energy the step removes."""
        return self.before.noise - self.after.noise

    def describe(self, signal: float) -> str:
        """One line: which layer, from and to how many bits, its alone-quantized output SQNR before and after, the cost."""
        names = f"{', '.join(self.nodes)} [{self.tensor}]"
        return (f"raised {names} {self.before.bits} -> {self.after.bits} bits: model output SQNR with only it quantized "
                f"{energy_sqnr_db(signal, self.before.noise):.1f} -> {energy_sqnr_db(signal, self.after.noise):.1f} dB, "
                f"+{human_bytes(self.extra_bytes)}")


def greedy_raises(candidates: Sequence[Candidate], budget: int | None = None) -> list[Raise]:
    """Steps in order of most noise removed per extra byte, each fitting what is left of ``budget`` (bytes of all layers).

    A step that removes no noise is never taken; one that costs nothing and removes some goes first.
    """
    level = {c.tensor: 0 for c in candidates}
    used = sum(c.rungs[0].bytes for c in candidates)
    steps: list[Raise] = []
    while True:
        best: tuple[float, float, int] | None = None
        chosen: Raise | None = None
        for order, c in enumerate(candidates):
            i = level[c.tensor]
            if i + 1 >= len(c.rungs):
                continue
            step = Raise(c.tensor, c.nodes, c.rungs[i], c.rungs[i + 1])
            if step.gain <= 0 or (budget is not None and used + step.extra_bytes > budget):
                continue
            ratio = step.gain / step.extra_bytes if step.extra_bytes > 0 else math.inf
            key = (ratio, step.gain, -order)
            if best is None or key > best:
                best, chosen = key, step
        if chosen is None:
            return steps
        steps.append(chosen)
        level[chosen.tensor] += 1
        used += chosen.extra_bytes


def ladder(bits: int) -> tuple[int, ...]:
    """The widths a layer starting at ``bits`` can take: ``bits`` and the wider ones of :data:`LADDER`."""
    return (bits,) + tuple(b for b in LADDER if b > bits)


#: A user metric: takes a model (the float one, or one with fake-quantized weights), returns a score, higher is better.
Metric = Callable[[onnx.ModelProto], float]


@dataclass(frozen=True)
class MixedPrecision:
    """The chosen widths, the steps that led there, and how the result measures."""

    bits: dict[str, int]  # tensor -> bits
    tensor_bits: dict[str, int]  # tensor -> bits where raised, for QuantizeConfig.tensor_bits
    raises: tuple[Raise, ...]
    min_bytes: int
    max_bytes: int
    bytes: int
    budget: int | None
    signal: float
    sqnr_db: float  # model output, every chosen width at once, weights only
    drop: float | None  # of the metric, or of the SQNR from the widest model's, when --max-drop asked
    max_drop: float | None
    met: bool
    measured: bool = True  # sqnr_db measured by a run; else predicted from the layers' noises (a size budget alone)

    def lines(self) -> list[str]:
        """What the CLI prints: the budget, one line per raised layer, the outcome."""
        wanted = [f"budget {human_bytes(self.budget)}" if self.budget is not None else ""]
        if self.max_drop is not None:
            wanted.append(f"max drop {self.max_drop:g}")
        head = "; ".join(w for w in wanted if w)
        lines = [f"mixed precision ({head}): weights {human_bytes(self.bytes)} "
                 f"(all at planned bits {human_bytes(self.min_bytes)}, all raised {human_bytes(self.max_bytes)}); "
                 f"{len(self.raises)} layers raised"]
        lines += ["  " + r.describe(self.signal) for r in self.raises]
        how = "" if self.measured else ", predicted: the chosen layers' noises added"
        outcome = f"model output SQNR (weights only, on the sensitivity data{how}) {self.sqnr_db:.1f} dB"
        if self.drop is not None:
            outcome += f", drop {self.drop:.3g}"
        lines.append(outcome + ("" if self.met else " -- the drop target is NOT met within the budget"))
        return lines


def choose_bits(
    analysis: SensitivityAnalysis,
    target: TargetSize | None = None,
    max_drop: float | None = None,
    metric: Metric | None = None,
) -> MixedPrecision:
    """Widths per tensor: greedy raises by noise removed per byte, within ``target``, stopping once ``max_drop`` holds.

    ``max_drop`` is in dB of model-output SQNR below the model with every layer at its widest
    rung (the float model's SQNR is infinite), or, with ``metric``, in the metric's units below
    its value on the float model. Raises ``OnnxqError`` when the target is below the smallest size.
    """
    if target is None and max_drop is None:
        raise ValueError("mixed precision needs a target size or a max drop")
    if max_drop is not None and (not math.isfinite(max_drop) or max_drop < 0):
        raise ValueError(f"max drop must be a non-negative number, got {max_drop!r}")
    candidates = _candidates(analysis)
    min_bytes = sum(c.rungs[0].bytes for c in candidates)
    max_bytes = sum(c.rungs[-1].bytes for c in candidates)
    budget = None
    if target is not None:
        float_bytes = sum(w.nbytes for w in analysis.weights.values())
        weights = sum(w.size for w in analysis.weights.values())
        at = min(8, max(2, math.ceil(target.value))) if target.unit == "bits" else 8  # (the scales of a "bits" target at its width)
        scales = sum(layout[1] * layout[2] for layout in (_stored_layout(analysis, c.tensor, at) for c in candidates))
        budget = target.to_bytes(float_bytes, weights, scales)
        if budget < min_bytes:
            raise OnnxqError(analysis.label, f"--target-size {target.text} is {budget} bytes of weights, below the smallest possible "
                             f"{min_bytes} bytes ({min_bytes / float_bytes:.3f}x, every layer at its planned bits); ask for at least that")
    steps = greedy_raises(candidates, budget)
    start = {c.tensor: c.rungs[0].bits for c in candidates}
    taken, drop, met = len(steps), None, True
    if max_drop is not None:
        score = _scorer(analysis, metric)
        reference = metric(analysis.model) if metric is not None else score(_apply(start, _all_raises(candidates)))
        taken = None
        for n in range(len(steps) + 1):
            drop = reference - score(_apply(start, steps[:n]))
            if drop <= max_drop:
                taken = n
                break
        met = taken is not None
        taken = len(steps) if taken is None else taken
    chosen = steps[:taken]
    bits = _apply(start, chosen)
    tensor_bits = {t: b for t, b in bits.items() if b != start[t]}
    size = sum(c.rungs[0].bytes for c in candidates) + sum(r.extra_bytes for r in chosen)
    signal, sqnr_db = _mix_sqnr(analysis, candidates, chosen, measure=max_drop is not None)
    return MixedPrecision(bits, tensor_bits, tuple(chosen), min_bytes, max_bytes, size, budget, signal, sqnr_db, drop, max_drop, met,
                          measured=max_drop is not None)


def _mix_sqnr(analysis: SensitivityAnalysis, candidates: Sequence[Candidate], chosen: Sequence[Raise], measure: bool) -> tuple[float, float]:
    """(signal, model output SQNR) of the chosen mix: measured by a run, or predicted as the choice predicts it.

    A size budget alone takes the layers' noises as adding up (what the greedy choice assumes) rather than a run over
    the sensitivity data: on the layout detector that run was 64 runs of the model, and the CLI measures the written
    model against the float one afterwards anyway. --max-drop measured the chosen mix already (its last score).
    """
    if measure:
        measured = analysis.combined(_apply({c.tensor: c.rungs[0].bits for c in candidates}, chosen)).model
        return measured.signal, measured.sqnr_db
    rung = {c.tensor: c.rungs[0] for c in candidates}
    for step in chosen:
        rung[step.tensor] = step.after
    return analysis.signal, energy_sqnr_db(analysis.signal, sum(r.noise for r in rung.values()))


def _candidates(analysis: SensitivityAnalysis) -> list[Candidate]:
    """Each planned tensor with the bytes and measured noise of each width on its ladder."""
    analysis.measure((plan.tensor, b) for plan in analysis.plans for b in ladder(plan.bits))  # at once: on Dask workers where there are some
    out = []
    for plan in analysis.plans:
        rungs = tuple(Rung(b, _stored_bytes(analysis, plan.tensor, b), analysis.layer(plan.tensor, b).noise) for b in ladder(plan.bits))
        out.append(Candidate(plan.tensor, plan.nodes, rungs))
    return out


def _stored_bytes(analysis: SensitivityAnalysis, tensor: str, bits: int) -> int:
    """Bytes the tensor is stored in at ``bits``: its codes and scales (:func:`_stored_layout`)."""
    codes, scales, scale_bytes = _stored_layout(analysis, tensor, bits)
    return quantized_bytes(codes, bits, scales, scale_bytes)


def _stored_layout(analysis: SensitivityAnalysis, tensor: str, bits: int) -> tuple[int, int, int]:
    """(codes, scales, bytes per scale) of the tensor at ``bits``.

    A scale per output channel, or one; with --block-size below 8 bits, a float16 scale per channel and block.
    """
    from onnxq.config import Granularity

    plan = analysis.plan(tensor)
    weight = analysis.weights[tensor]
    if analysis.config.granularity is Granularity.TENSOR or plan.channel_axis is None:
        return weight.size, 1, 4
    channels = int(np.shape(weight)[plan.channel_axis])
    block = analysis.config.block_size
    if not blocked(bits, block) or not uses_blocks(weight, plan.channel_axis, block):
        return weight.size, channels, 4
    assert block is not None
    blocks = -(-(weight.size // channels) // block)
    return weight.size, channels * blocks, 2


def _all_raises(candidates: Sequence[Candidate]) -> list[Raise]:
    return [Raise(c.tensor, c.nodes, c.rungs[0], c.rungs[-1]) for c in candidates if len(c.rungs) > 1]


def _apply(start: Mapping[str, int], steps: Sequence[Raise]) -> dict[str, int]:
    bits = dict(start)
    for step in steps:
        bits[step.tensor] = step.after.bits
    return bits


def _scorer(analysis: SensitivityAnalysis, metric: Metric | None) -> Callable[[dict[str, int]], float]:
    """Score of a choice of widths: the metric on the fake-quantized model, or the model-output SQNR."""
    if metric is not None:
        return lambda bits: float(metric(analysis.fake_quantized(bits)))
    return lambda bits: analysis.combined(bits).model_sqnr_db
