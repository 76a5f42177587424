"""Streaming statistics of one activation tensor: exact min/max and a fixed-bin histogram.

The histogram has a fixed number of equal bins centred on zero, with a bin width that is
a power of two. When a value falls outside the covered range the width doubles (as many
times as needed) and neighbouring bins merge; because every bin edge is a multiple of the
width, merging is exact, however much the range grows at once (a merge of 2**k bins into one
is an integer shift by k, capped where every old bin already lands in one of the two middle
ones). So memory stays constant however many samples stream through, and the result does not
depend on how the data were split into batches. Counts are int64 and exact; ranges are those of
float64 (any float32 value, up to float32's max, is covered). The counting runs in
C where it can (``onnxq.native.stats``, one pass with the same float32 arithmetic), else in numpy.

For the same reason two histograms of different parts of the data merge exactly (:meth:`Histogram.merge`): both are
brought to the wider width by the same merging of bins, then added. The result is, bit for bit, the histogram of all
the data fed to one object, however the data were split: a calibration pass can run in shards on several workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from onnxq.native import stats

DEFAULT_BINS = 4096
_START_EXPONENT = -40  # the first width is 2**-40: any real activation widens it at once


@dataclass
class Histogram:
    """Counts of values in ``bins`` bins of width ``2**exponent`` covering [-half, half) * width.

    Attributes:
        counts: (bins,) counts; bin i covers [(i - bins/2) * width, (i - bins/2 + 1) * width).
        exponent: log2 of the bin width.
        min: smallest value seen (inf before any).
        max: largest value seen (-inf before any).
    """

    bins: int = DEFAULT_BINS
    counts: np.ndarray = field(init=False)
    exponent: int = _START_EXPONENT
    min: float = math.inf
    max: float = -math.inf

    def __post_init__(self) -> None:
        if self.bins < 4 or self.bins % 2:
            raise ValueError(f"a histogram needs an even number of bins >= 4, got {self.bins}")
        self.counts = np.zeros(self.bins, dtype=np.int64)

    @property
    def width(self) -> float:
        """Width of one bin."""
        return math.ldexp(1.0, self.exponent)

    @property
    def total(self) -> int:
        """Number of values seen."""
        return int(self.counts.sum())

    @property
    def observed(self) -> bool:
        """Whether any value was seen (min/max are set even where only :meth:`observe` ran)."""
        return self.min <= self.max

    @property
    def centers(self) -> np.ndarray:
        """(bins,) centre of every bin."""
        return (np.arange(self.bins, dtype=np.float64) - self.bins // 2 + 0.5) * self.width

    @property
    def edges(self) -> np.ndarray:
        """(bins + 1,) bin edges."""
        return (np.arange(self.bins + 1, dtype=np.float64) - self.bins // 2) * self.width

    def observe(self, values: np.ndarray) -> np.ndarray:
        """Update min/max only (all min-max calibration needs); returns ``values`` as a flat float array."""
        values = np.asarray(values)
        if values.dtype not in (np.float32, np.float64):
            values = values.astype(np.float64)
        values = values.ravel()
        if values.size == 0:
            return values
        lo, hi = float(values.min()), float(values.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("activation values include NaN or infinity")
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        return values

    def add(self, values: np.ndarray) -> None:
        """Count ``values`` (any shape); NaN and infinities are rejected."""
        values = self.observe(values)
        if values.size == 0:
            return
        self._cover(max(-self.min, self.max))
        inverse_width = math.ldexp(1.0, -self.exponent)
        if stats.takes(values):
            stats.count_centred(values, inverse_width, self.counts)
        else:
            self.counts += np.bincount(bin_index(values, inverse_width, self.bins), minlength=self.bins)

    def _cover(self, peak: float) -> None:
        """Widen the bins (exactly, by merging) until |value| <= ``peak`` falls strictly inside."""
        half = self.bins // 2
        needed = self.exponent
        while peak >= half * math.ldexp(1.0, needed):
            needed += 1
        if needed == self.exponent:
            return
        self.counts = merge_bins(self.counts[None, :], np.array([needed - self.exponent]))[0]
        self.exponent = needed

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s counts and range to these (``other`` is left as it is).

        Both go to the wider of the two widths by :func:`merge_bins`: bin k at width 2**e lands in bin floor(k / 2**s)
        at width 2**(e + s), exactly where each of its values would have been counted at that width. The width one object
        fed all the values ends at is the smallest covering the largest |value|, the wider of the parts' widths, so the
        merge equals it bit for bit. An empty histogram (width 2**-40, no counts) changes nothing.
        """
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        exponent = max(self.exponent, other.exponent)
        mine = _widened(self.counts[None, :], np.array([self.exponent]), np.array([exponent]))
        theirs = _widened(other.counts[None, :], np.array([other.exponent]), np.array([exponent]))
        self.counts = (mine + theirs)[0]
        self.exponent = exponent
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)


def merge_bins(counts: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Counts (rows, bins) of centred bins re-binned at 2**shifts[r] times their width, summed exactly in int64.

    Bin i - bins/2 goes to floor((i - bins/2) / 2**shift) + bins/2: an arithmetic shift. Shifting by log2(bins/2)
    bits already sends every bin to one of the two middle ones, so larger shifts (a range that grew by 2**40, or
    2**300, in one batch) are capped there and never overflow.
    """
    rows, bins = counts.shape
    half = bins // 2
    shift = np.minimum(np.asarray(shifts, dtype=np.int64), max(half.bit_length(), 1))
    old = np.arange(bins, dtype=np.int64) - half
    new_index = np.right_shift(old[None, :], shift[:, None]) + half + np.arange(rows, dtype=np.int64)[:, None] * bins
    merged = np.zeros(rows * bins, dtype=np.int64)
    np.add.at(merged, new_index.ravel(), counts.astype(np.int64, copy=False).ravel())
    return merged.reshape(rows, bins)


def _widened(counts: np.ndarray, exponents: np.ndarray, to: np.ndarray) -> np.ndarray:
    """A copy of ``counts`` (rows, bins) with each row re-binned from width 2**exponents[r] to 2**to[r] (to >= exponents)."""
    out = counts.copy()
    rows = np.flatnonzero(to > exponents)  # only these are merged (rows already at the width are copied as they are)
    if len(rows):
        out[rows] = merge_bins(counts[rows], to[rows] - exponents[rows])
    return out


def bin_index(values: np.ndarray, inverse_width: float | np.ndarray, bins: int) -> np.ndarray:
    """floor(value / width) + bins/2 per value, clipped to [0, bins): the bin of each value, as np.intp.

    Widths are powers of two, so value * (1 / width) is exact in the values' own precision (float32
    stays float32, half the memory traffic of float64) and so is its floor; ``inverse_width`` is a
    scalar or broadcasts against ``values`` (one width per row). The index is np.intp, the type
    np.bincount counts in: int32 would cost it a converted copy (twice the time of the whole binning).
    """
    dtype = values.dtype if values.dtype in (np.float32, np.float64) else np.float64
    scaled = np.multiply(values, np.asarray(inverse_width, dtype=dtype), dtype=dtype)
    np.floor(scaled, out=scaled)
    index = scaled.astype(np.intp)
    index += bins // 2
    return np.clip(index, 0, bins - 1, out=index)


def sample_histograms(batch: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample histograms of a batch (first axis = samples), each over that sample's own [min, max].

    Returns (counts (B, bins), lo (B,), hi (B,)); a constant sample puts everything in one bin.
    float32 batches (what onnxruntime returns) are binned in float32, several times faster than in
    float64 (a one-off measurement); a value within a rounding of a bin edge may then land in the neighbouring bin, which the
    per-sample step search these histograms serve cannot tell apart.
    """
    dtype = np.float32 if np.asarray(batch).dtype == np.float32 else np.float64
    rows = np.asarray(batch, dtype=dtype).reshape(len(batch), -1)
    lo, hi = rows.min(axis=1), rows.max(axis=1)
    with np.errstate(over="ignore"):
        span = np.where(hi > lo, hi - lo, 1).astype(dtype)
    if not np.isfinite(span).all():  # a float32 sample spanning more than float32's range: bin it in float64
        return sample_histograms(rows.astype(np.float64), bins)
    if stats.takes(rows):
        return stats.count_spans(rows, lo, span, bins), lo.astype(np.float64), hi.astype(np.float64)
    rows = rows.copy()  # worked on in place
    rows -= lo[:, None]
    rows /= span[:, None]
    rows *= bins
    np.floor(rows, out=rows)
    np.clip(rows, 0, bins - 1, out=rows)
    index = rows.astype(np.intp)
    index += np.arange(len(rows), dtype=np.intp)[:, None] * bins
    counts = np.bincount(index.ravel(), minlength=len(rows) * bins).reshape(len(rows), bins)
    return counts, lo.astype(np.float64), hi.astype(np.float64)


@dataclass
class ChannelHistograms:
    """One streaming histogram per channel (rows), vectorised: the same scheme as :class:`Histogram`.

    Each row has its own power-of-two bin width, widened (exactly, by merging bins) when a
    value falls outside; ``counts`` is (channels, bins).
    """

    channels: int
    bins: int = 1024
    counts: np.ndarray = field(init=False)
    exponent: np.ndarray = field(init=False)
    min: np.ndarray = field(init=False)
    max: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.bins < 4 or self.bins % 2:
            raise ValueError(f"a histogram needs an even number of bins >= 4, got {self.bins}")
        self.counts = np.zeros((self.channels, self.bins), dtype=np.int64)
        self.exponent = np.full(self.channels, _START_EXPONENT, dtype=np.int64)
        self.min = np.full(self.channels, np.inf)
        self.max = np.full(self.channels, -np.inf)

    @property
    def centers(self) -> np.ndarray:
        """(channels, bins) bin centres."""
        k = np.arange(self.bins, dtype=np.float64) - self.bins // 2 + 0.5
        return k[None, :] * np.ldexp(1.0, self.exponent)[:, None]

    def add(self, rows: np.ndarray) -> None:
        """Count ``rows`` (channels, n)."""
        self.add_blocks(np.asarray(rows)[None])

    def add_batch(self, batch: np.ndarray, axis: int) -> None:
        """Count a batch whose channels lie along ``axis`` (a view of it, no transposed copy)."""
        batch = np.asarray(batch)
        outer = math.prod(batch.shape[:axis])
        self.add_blocks(batch.reshape(outer, batch.shape[axis], -1) if batch.size else np.zeros((0, batch.shape[axis], 0)))

    def add_blocks(self, blocks: np.ndarray) -> None:
        """Count ``blocks`` (outer, channels, inner): channel c's values are blocks[:, c, :]."""
        if blocks.dtype not in (np.float32, np.float64):
            blocks = blocks.astype(np.float64)
        if blocks.shape[0] * blocks.shape[2] == 0:
            return
        lo, hi = blocks.min(axis=(0, 2)).astype(np.float64), blocks.max(axis=(0, 2)).astype(np.float64)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise ValueError("activation values include NaN or infinity")
        self.min, self.max = np.minimum(self.min, lo), np.maximum(self.max, hi)
        self._cover(np.maximum(-lo, hi))
        inverse_widths = np.ldexp(1.0, -self.exponent)
        if stats.takes(blocks):
            stats.count_channels(blocks, inverse_widths, self.counts)
            return
        index = bin_index(blocks, inverse_widths[None, :, None], self.bins)
        index += (np.arange(self.channels, dtype=np.intp) * self.bins)[None, :, None]
        self.counts += np.bincount(index.ravel(), minlength=self.channels * self.bins).reshape(self.channels, self.bins)

    def _cover(self, peak: np.ndarray) -> None:
        half = self.bins // 2
        with np.errstate(divide="ignore"):
            needed = np.where(peak > 0, np.floor(np.log2(np.maximum(peak, 1e-300) / half)) + 1, _START_EXPONENT).astype(np.int64)
        needed = np.maximum(needed, self.exponent)
        needed += peak >= half * np.ldexp(1.0, needed)  # guard against log2 rounding
        grow = needed > self.exponent
        if not grow.any():
            return
        rows = np.flatnonzero(grow)  # only these are merged: after the first batches few channels still widen
        self.counts[rows] = merge_bins(self.counts[rows], needed[rows] - self.exponent[rows])
        self.exponent = needed

    def merge(self, other: ChannelHistograms) -> None:
        """Add ``other``'s counts and ranges, channel by channel, exactly (see :meth:`Histogram.merge`); ``other`` is left as it is."""
        if (other.channels, other.bins) != (self.channels, self.bins):
            raise ValueError(f"cannot merge histograms of {self.channels} channels x {self.bins} bins and {other.channels} x {other.bins}")
        exponent = np.maximum(self.exponent, other.exponent)
        self.counts = _widened(self.counts, self.exponent, exponent) + _widened(other.counts, other.exponent, exponent)
        self.exponent = exponent
        self.min, self.max = np.minimum(self.min, other.min), np.maximum(self.max, other.max)
