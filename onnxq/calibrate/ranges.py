"""Activation ranges from histograms: min-max, percentile, entropy (KL) and MSE-optimal.

Activations are quantized asymmetrically to unsigned codes 0..2**bits-1 (uint8, uint4):
x -> clip(round(x / scale) + zero_point). The range [lo, hi] always contains 0, so zero is
exact. Percentile, entropy and MSE choose among ranges [a*lo0, a*hi0], a in (0, 1], where
[lo0, hi0] is the min-max range: the zero point is then the same for every a and only the
step size changes, which is the one-dimensional search REQuant uses for weights. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq.calibrate.histogram import Histogram
from onnxq.numerics.search import minimise_on_grid, scan_points


@dataclass(frozen=True)
class Range:
    """A quantization range [lo, hi] with lo <= 0 <= hi."""

    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not self.lo <= 0.0 <= self.hi:
            raise ValueError(f"an activation range must contain 0, got [{self.lo}, {self.hi}]")

    def scaled(self, factor: float) -> Range:
        """The range [factor*lo, factor*hi]."""
        return Range(self.lo * factor, self.hi * factor)


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of unsigned ``bits``-bit codes."""

    scale: float
    zero_point: int
    bits: int

    @property
    def qmax(self) -> int:
        """Largest code."""
        return (1 << self.bits) - 1

    @property
    def value_range(self) -> tuple[float, float]:
        """The smallest and largest values the codes stand for."""
        return (0 - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale


def quant_params(r: Range, bits: int) -> QuantParams:
    """Scale and zero point that put ``r`` on codes 0..2**bits-1 with zero exact."""
    qmax = (1 << bits) - 1
    span = r.hi - r.lo
    if span <= 0.0:
        return QuantParams(1.0, 0, bits)
    scale = span / qmax
    return QuantParams(scale, int(np.clip(np.rint(-r.lo / scale), 0, qmax)), bits)


def fake_quantize(x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, bits: int) -> np.ndarray:
    """Quantize and dequantize as ONNX QuantizeLinear/DequantizeLinear do (round half to even, saturate)."""
    q = np.clip(np.rint(x / scale) + zero_point, 0, (1 << bits) - 1)
    return (q - zero_point) * scale


def minmax_range(h: Histogram) -> Range:
    """The full observed range (widened to include 0)."""
    if not h.min <= h.max:  # nothing observed
        return Range(0.0, 0.0)
    return Range(min(h.min, 0.0), max(h.max, 0.0))


def percentile_range(h: Histogram, percentile: float = 99.99) -> Range:
    """Drop the (100 - percentile) % most extreme values on each side (inside-bin linear interpolation)."""
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    full = minmax_range(h)
    if h.total == 0 or percentile == 100.0:
        return full
    tail = (100.0 - percentile) / 100.0
    cdf = np.concatenate([[0.0], np.cumsum(h.counts)]) / h.total
    edges = h.edges
    hi = float(np.interp(1.0 - tail, cdf, edges))
    lo = float(np.interp(tail, cdf, edges))
    return Range(max(min(lo, 0.0), full.lo), min(max(hi, 0.0), full.hi))


def range_errors(centers: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Squared error of fake-quantizing binned data with ranges [lo, hi], one per row.

    ``centers``/``counts`` are (R, n) (each bin stands for ``count`` values at its centre);
    ``lo``/``hi`` are (R,) or (R, K) ranges; returns the summed error in the same shape.
    """
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    extra = (slice(None),) + (None,) * (lo.ndim - 1) + (slice(None),)
    qmax = (1 << bits) - 1
    span = hi - lo
    scale = np.where(span > 0, span / qmax, 1.0)
    zp = np.clip(np.rint(-lo / scale), 0, qmax)
    c = centers[extra]
    s, z = scale[..., None], zp[..., None]
    # (clip(rint(c / s) + z, 0, qmax) - z) * s, as clip(rint(c / s), -z, qmax - z) * s (integers: the same
    # values), in one buffer: the largest calibration cost (ASQ's per-sample searches) is these passes.
    t = np.divide(c, s)
    np.rint(t, out=t)
    np.maximum(t, -z, out=t)
    np.minimum(t, qmax - z, out=t)
    t *= s
    np.subtract(c, t, out=t)
    t *= t
    t *= counts[extra]
    return np.sum(t, axis=-1)


def range_sqnr_db(h: Histogram, r: Range, bits: int) -> float:
    """SQNR (dB) of the histogram's values quantized with ``r`` at ``bits``: how well one step holds the tensor."""
    centers, counts = _occupied(h)
    if not counts.size:
        return float("inf")
    params = quant_params(r, bits)
    lo, hi = params.value_range
    noise = float(range_errors(centers[None], counts[None], np.array([lo]), np.array([hi]), bits)[0])
    signal = float(np.sum(counts * centers**2))
    if noise <= 0.0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")


def mse_range(h: Histogram, bits: int) -> Range:
    """The range [a*lo0, a*hi0] with the least quantization MSE over the histogram (grid + golden section)."""
    full = minmax_range(h)
    if full.hi - full.lo <= 0.0:
        return full
    centers, counts = _occupied(h)
    alpha = mse_fractions(centers[None], counts[None], np.array([full.lo]), np.array([full.hi]), bits)
    return full.scaled(float(alpha[0]))


def mse_fractions(centers: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Per row, the a in (0, 1] whose range [a*lo, a*hi] quantizes the row's binned data with the least MSE.

    Bins empty in every row add nothing to any error and are dropped first (after a Relu the negative
    half of each channel's histogram is empty).
    """
    occupied = counts.any(axis=0)
    if not occupied.all():
        centers, counts = centers[:, occupied], counts[:, occupied]

    def error(a: np.ndarray) -> np.ndarray:
        return range_errors(centers, counts, a * (lo if a.ndim == 1 else lo[:, None]), a * (hi if a.ndim == 1 else hi[:, None]), bits)

    alpha, _ = minimise_on_grid(error, np.ones(len(lo)), scan_points(1 << bits))
    return alpha


#: TensorRT's geometry: 2048 histogram bins for 128 codes, i.e. the full range holds 16 bins per code.
ENTROPY_BINS_PER_CODE = 16


def entropy_range(h: Histogram, bits: int, candidates: int = 128) -> Range:
    """The range [a*lo0, a*hi0] whose quantized histogram loses the least information (KL divergence).

    As in TensorRT's calibrator: the reference P is the histogram with values outside the
    range clamped into its edge bins; the candidate Q spreads each code's in-range count
    evenly over that code's non-empty bins, outliers left out, so clipping costs divergence
    and coarse steps cost divergence. The histogram is first coarsened to TensorRT's
    geometry (16 bins per code over the full range) and ``a`` runs from 1/16 to 1, so each
    code always covers at least one bin, at any bit width.
    """
    full = minmax_range(h)
    if full.hi - full.lo <= 0.0 or np.count_nonzero(h.counts) <= 1:  # one value (a constant tensor): nothing to trade
        return full
    centers, counts = _coarsen(h, full, ENTROPY_BINS_PER_CODE << bits)
    width = centers[1] - centers[0] if len(centers) > 1 else h.width
    alphas = np.linspace(1.0 / ENTROPY_BINS_PER_CODE, 1.0, candidates)
    alphas = alphas[[_clipped_fraction(centers, counts, full.scaled(a), width) <= ENTROPY_MAX_CLIPPED for a in alphas]]
    divergences = np.array([_kl_divergence(centers, counts, full.scaled(a), bits, width) for a in alphas])
    if not np.isfinite(divergences).any():
        return full
    return full.scaled(float(alphas[np.argmin(divergences)]))


#: Entropy calibration never picks a range that clips more than this fraction of the values. KL compares
#: histograms bin by bin, so moving a spike into the edge bin costs it little however far the spike moves:
#: on Fashion-MNIST's normalised images (half the pixels are background, one value) at 4 bits it chose a
#: range that clamped every background pixel and most of the rest, and the model fell to chance (10 %;
#: `tools/eval_activations.py --settings W4A4-all` without this bound).
ENTROPY_MAX_CLIPPED = 0.01


def _clipped_fraction(centers: np.ndarray, counts: np.ndarray, r: Range, width: float) -> float:
    """The fraction of the histogram's values in bins wholly outside ``r`` (the full range clips none).

    A bin [a, a + width) lies wholly below ``r`` when a + width <= r.lo, wholly above when a > r.hi: a bin starting at
    r.hi holds r.hi itself (a constant tensor's one value).
    """
    total = counts.sum()
    outside = (centers + width / 2 <= r.lo) | (centers - width / 2 > r.hi)
    return float(counts[outside].sum() / total) if total > 0 else 0.0


def _coarsen(h: Histogram, full: Range, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The histogram re-binned into ``bins`` equal bins over ``full``, one bin edge at 0 (never finer than it is)."""
    width = max((full.hi - full.lo) / bins, h.width)
    index = np.floor(h.centers / width).astype(np.int64)
    first = int(np.floor(full.lo / width))
    counts = np.bincount(np.clip(index - first, 0, None), weights=h.counts.astype(np.float64))
    centers = (np.arange(len(counts)) + first + 0.5) * width
    return centers, counts


def _kl_divergence(centers: np.ndarray, counts: np.ndarray, r: Range, bits: int, width: float) -> float:
    """KL(P || Q): P clamps the histogram to ``r``; Q spreads each code's in-range count over its bins."""
    params = quant_params(r, bits)
    within = (centers >= r.lo) & (centers <= r.hi)
    if not within.any():
        return float("inf")
    p = np.bincount(_edge_bins(within), weights=counts, minlength=len(centers))
    kept = np.where(within, counts, 0.0)
    code = np.clip(np.rint(centers / params.scale) + params.zero_point, 0, params.qmax).astype(np.int64)
    # Zero is exact in every range; the bin holding it, [0, width) (a spike after Relu), is its own group.
    code[(centers - width / 2 <= 0.0) & (centers + width / 2 > 0.0)] = params.qmax + 1
    occupied = kept > 0
    mass = np.bincount(code, weights=kept, minlength=params.qmax + 2)
    members = np.bincount(code, weights=occupied.astype(np.float64), minlength=params.qmax + 2)
    q = np.where(occupied, mass[code] / np.maximum(members[code], 1.0), 0.0)
    if q.sum() <= 0:  # no value's bin centre lies in the range: Q holds nothing
        return float("inf")
    p, q = p / p.sum(), q / q.sum()
    nonzero = p > 0
    return float(np.sum(p[nonzero] * np.log(p[nonzero] / np.maximum(q[nonzero], 1e-300))))


def _edge_bins(within: np.ndarray) -> np.ndarray:
    """For every bin, the bin its count lands in after clamping values into the bins ``within`` the range."""
    inside = np.flatnonzero(within)
    return np.clip(np.arange(len(within)), inside[0], inside[-1])


def _occupied(h: Histogram) -> tuple[np.ndarray, np.ndarray]:
    """Centres and counts of the non-empty bins (the rest add nothing to any error)."""
    keep = h.counts > 0
    return h.centers[keep], h.counts[keep].astype(np.float64)
