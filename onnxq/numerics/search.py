"""REQuant range search: the clipping factor alpha that minimises weight MSE, by golden-section search.

For a row of weights w (a whole tensor, or one output channel) with peak m = max|w|, a
quantizer maps |w| to the nearest of a few non-negative magnitudes; all of them scale
with alpha, the fraction of m the range covers. The squared error as a function of
alpha is locally convex, so a coarse scan brackets the best alpha (guarding against the
non-convex tails) and golden-section search narrows it down.

Every error evaluation is cheap because |w| is summarised once per row in a fine
histogram of the normalised magnitudes (counts; sums taken at the bin centres). The
error of a whole codebook is then a handful of look-ups in cumulative sums, with
linear interpolation inside the bin a rounding boundary falls in. All rows are
searched at once, vectorised. This module knows nothing of ONNX.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_INV_PHI = (np.sqrt(5.0) - 1.0) / 2.0  # 0.618...


@dataclass(frozen=True)
class Codebook:
    """The magnitudes a quantizer can output at alpha = 1, in units of max|w|.

    Attributes:
        levels: (L,) increasing magnitudes, levels[0] == 0.
        bounds: (L-1,) rounding boundaries between neighbouring levels, in the histogram
            domain (|w|/max|w|, or its square root when ``sqrt_domain``), at alpha = 1.
        level_power: levels scale with alpha ** level_power (2 for sqrt mode, 1 otherwise);
            bounds always scale with alpha.
        sqrt_domain: rounding happens on sqrt(|w|), so the histogram is built there.
    """

    levels: np.ndarray
    bounds: np.ndarray
    level_power: int = 1
    sqrt_domain: bool = False

    def __post_init__(self) -> None:
        if self.levels.ndim != 1 or len(self.bounds) != len(self.levels) - 1:
            raise ValueError("a codebook needs L levels and L-1 bounds")


@dataclass(frozen=True)
class RowHistograms:
    """Cumulative per-bin statistics of normalised magnitudes, one histogram per row.

    ``count``, ``sum1`` and ``sum2`` have shape (R, bins + 1) and start with 0, so the
    totals over bins [i, j) are ``c[:, j] - c[:, i]``. ``sum1``/``sum2`` hold sums of
    u and u**2 with u = |w| / peak.
    """

    count: np.ndarray
    sum1: np.ndarray
    sum2: np.ndarray
    peak: np.ndarray
    sqrt_domain: bool

    @property
    def bins(self) -> int:
        """Number of bins per row."""
        return self.count.shape[1] - 1

    @property
    def rows(self) -> int:
        """Number of rows."""
        return self.count.shape[0]


@dataclass(frozen=True)
class SearchResult:
    """Best alpha per row and the weight MSE it gives (mean over the row's elements)."""

    alpha: np.ndarray
    mse: np.ndarray


def default_bins(row_length: int) -> int:
    """Bins per row: 4096 for long rows (enough to resolve 8-bit steps), fewer for short ones."""
    return int(np.clip(2 ** int(np.ceil(np.log2(max(row_length, 1)))), 1024, 4096))


def build_histograms(rows: np.ndarray, sqrt_domain: bool, bins: int | None = None) -> RowHistograms:
    """Summarise |rows| (R, n) as per-row histograms over [0, 1] after dividing by each row's peak.

    Only counts are gathered (one pass of float32 work and a bincount); the sums of u and
    u**2 per bin are taken at the bin centres, which moves each value by at most half a
    bin: far below a quantization step at the bin counts used.
    """
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ValueError(f"expected a 2-D array of rows, got shape {rows.shape}")
    n_rows, length = rows.shape
    bins = default_bins(length) if bins is None else int(bins)
    mag = np.abs(rows.astype(np.float32, copy=False))
    peak = mag.max(axis=1) if length else np.zeros(n_rows, dtype=np.float32)
    if sqrt_domain:
        np.sqrt(mag, out=mag)
        top = np.sqrt(peak)
    else:
        top = peak
    top64 = top.astype(np.float64)
    factor = np.where(top64 > 0, bins / np.where(top64 > 0, top64, 1.0), 0.0)
    tiny = factor > np.finfo(np.float32).max  # peaks below ~1e-35 (subnormal weights): bins/peak is inf in float32
    if tiny.any():
        mag[tiny] /= top[tiny, None]
        factor[tiny] = bins
    mag *= factor.astype(np.float32)[:, None]
    idx = mag.astype(np.intp)  # np.bincount's own type: int32 would cost it a converted copy
    np.minimum(idx, bins - 1, out=idx)
    if n_rows > 1:
        idx += (np.arange(n_rows, dtype=np.intp) * bins)[:, None]
    counts = np.bincount(idx.ravel(), minlength=n_rows * bins).reshape(n_rows, bins).astype(np.float64)
    centre = (np.arange(bins) + 0.5) / bins
    u_centre = centre**2 if sqrt_domain else centre

    def cumulative(per_bin: np.ndarray) -> np.ndarray:
        out = np.zeros((n_rows, bins + 1))
        np.cumsum(per_bin, axis=1, out=out[:, 1:])
        return out

    return RowHistograms(
        cumulative(counts), cumulative(counts * u_centre), cumulative(counts * u_centre**2), peak.astype(np.float64), sqrt_domain
    )


def codebook_error(hist: RowHistograms, codebook: Codebook, alpha: np.ndarray) -> np.ndarray:
    """Sum of squared errors (in units of peak**2) of each row for alpha of shape (R,) or (R, G).

    Level l takes the values between rounding bounds l-1 and l (the top level also the clipped ones). Summed by parts,
    the error needs the cumulative count A_k and sum B_k only at the L-1 bounds:
    err = S2 + c_top**2 N - 2 c_top S1 + sum_k [A_k (c_{k-1}**2 - c_k**2) - 2 B_k (c_{k-1} - c_k)],
    two dot products over k instead of per-level intervals (8-bit codebooks have 128 levels).
    """
    if codebook.sqrt_domain != hist.sqrt_domain:
        raise ValueError("histogram and codebook disagree on the sqrt domain")
    alpha = np.asarray(alpha, dtype=np.float64)
    squeeze = alpha.ndim == 1
    a = alpha[:, None] if squeeze else alpha  # (R, G)
    bins = hist.bins
    pos = np.clip(a[..., None] * codebook.bounds * bins, 0.0, float(bins))  # (R, G, L-1)
    lo = np.minimum(pos.astype(np.int64), bins - 1)
    frac = pos - lo
    lo += (np.arange(hist.rows, dtype=np.int64) * (bins + 1))[:, None, None]

    def at_bounds(cum: np.ndarray) -> np.ndarray:
        flat = cum.ravel()
        below = flat[lo]
        return below + frac * (flat[lo + 1] - below)  # (R, G, L-1)

    levels = codebook.levels
    scale = a**codebook.level_power  # (R, G): every level is scale * levels
    squares = at_bounds(hist.count) @ (levels[:-1] ** 2 - levels[1:] ** 2) + levels[-1] ** 2 * hist.count[:, -1:]
    linear = at_bounds(hist.sum1) @ (levels[:-1] - levels[1:]) + levels[-1] * hist.sum1[:, -1:]
    err = hist.sum2[:, -1:] + scale * (scale * squares - 2.0 * linear)
    err = np.maximum(err, 0.0)
    return err[:, 0] if squeeze else err


def golden_section(f: Callable[[np.ndarray], np.ndarray], lo: np.ndarray, hi: np.ndarray, iterations: int) -> np.ndarray:
    """Minimise ``f`` (vectorised: one value per row) over [lo, hi], independently for every row."""
    lo, hi = lo.astype(np.float64).copy(), hi.astype(np.float64).copy()
    x1 = hi - _INV_PHI * (hi - lo)
    x2 = lo + _INV_PHI * (hi - lo)
    f1, f2 = f(x1), f(x2)
    for _ in range(iterations):
        left = f1 <= f2  # the minimum lies in [lo, x2]: x1 becomes the new upper interior point
        hi = np.where(left, x2, hi)
        lo = np.where(left, lo, x1)
        new_x = np.where(left, hi - _INV_PHI * (hi - lo), lo + _INV_PHI * (hi - lo))
        f_new = f(new_x)
        x1, f1, x2, f2 = (
            np.where(left, new_x, x2),
            np.where(left, f_new, f2),
            np.where(left, x1, new_x),
            np.where(left, f1, f_new),
        )
    return np.where(f1 <= f2, x1, x2)


def minimise_on_grid(
    f: Callable[[np.ndarray], np.ndarray], upper: np.ndarray, grid: int = 32, iterations: int = 14
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the x in (0, upper] with the least f(x), and that least value.

    ``f`` maps an (R,) or (R, K) array of candidates to errors of the same shape. A scan of
    ``grid`` evenly spaced points brackets the minimum and ``iterations`` golden-section
    steps refine it; the answer is never worse than the best grid point, so a non-convex
    tail cannot mislead it.
    """
    upper = np.asarray(upper, dtype=np.float64)
    n_rows = len(upper)
    fractions = np.linspace(1.0 / grid, 1.0, grid)
    candidates = upper[:, None] * fractions
    grid_err = f(candidates)
    best = np.argmin(grid_err, axis=1)
    step = upper * (fractions[1] - fractions[0] if grid > 1 else 1.0)
    picked = candidates[np.arange(n_rows), best]
    lo = np.maximum(picked - step, 1e-6 * upper)
    hi = np.minimum(picked + step, upper)
    x = golden_section(f, lo, hi, iterations)
    err = f(x)
    grid_best = grid_err[np.arange(n_rows), best]
    use_grid = grid_best < err
    return np.where(use_grid, picked, x), np.where(use_grid, grid_best, err)


#: Grids of more codes than this are scanned coarsely.
FINE_SCAN_MAX_CODES = 128


def per_candidate(error: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``error`` of one range factor per row, (R,), also for the bracketing scan's (R, C): one column of candidates at a time.

    A wrapper, not a closure that calls itself: that is a reference cycle, which kept the layer's rows and H (its
    closure's) alive after the search until the garbage collector ran, into the next layers (CREPE: two 8 MB H).
    """
    def each(alpha: np.ndarray) -> np.ndarray:
        if alpha.ndim == 2:
            return np.stack([error(alpha[:, i]) for i in range(alpha.shape[1])], axis=1)
        return error(alpha)

    return each


def scan_points(codes: int) -> int:
    """Points of the bracketing scan for a grid of ``codes`` values: 32 up to 7 bits' worth (128), 8 above.

    With few codes the error has bumps in the range (a level crossing a cluster of values) that a
    fine scan must see. With 255 or more each bump is small against the trend, and every scan point
    costs a pass over all levels: on the shipped models' 8-bit weights 8 points give per-tensor
    errors as low as 32 points do, in less time (`tools/bench_search.py --grids` prints both).
    """
    return 32 if codes <= FINE_SCAN_MAX_CODES else 8


def grid_points(codebook: Codebook) -> int:
    """:func:`scan_points` for a symmetric codebook: its magnitudes (zero included) give 2L - 1 codes."""
    return scan_points(2 * len(codebook.levels) - 1)


def search_alpha(
    rows: np.ndarray,
    codebook: Codebook,
    *,
    grid: int | None = None,
    iterations: int = 14,
    bins: int | None = None,
    hist: RowHistograms | None = None,
) -> SearchResult:
    """Find, per row of ``rows`` (R, n), the alpha in (0, 1] with the least weight MSE.

    A scan of ``grid`` evenly spaced alphas (default: :func:`grid_points`) brackets the
    minimum; ``iterations`` golden-section steps refine it inside the bracket. The result
    is never worse than the best grid point, so a non-convex tail cannot mislead it.
    """
    rows = np.asarray(rows)
    if hist is None:
        hist = build_histograms(rows, codebook.sqrt_domain, bins)
    grid = grid_points(codebook) if grid is None else grid
    alpha, err = minimise_on_grid(lambda a: codebook_error(hist, codebook, a), np.ones(hist.rows), grid, iterations)
    length = max(rows.shape[1], 1) if rows.ndim == 2 else 1
    return SearchResult(alpha=alpha, mse=err * hist.peak**2 / length)


#: Rows up to this length get the exact polish; longer rows fill the histogram densely enough without it.
REFINE_MAX_ROW = 4096


def refine_alpha(rows: np.ndarray, codebook: Codebook, alpha: np.ndarray, steps: int = 2) -> np.ndarray:
    """Lloyd-style polish of alpha on the exact weights, never making any row's error worse.

    With every weight's level fixed, the error is a quadratic in c = alpha**level_power, so
    the best c has a closed form; a new alpha is kept only where the exact error drops.
    This removes what the histogram's smoothing hides on short or sparse rows.
    """
    u = np.abs(rows).astype(np.float64)
    peak = u.max(axis=1) if u.shape[1] else np.zeros(len(u))
    u /= np.where(peak > 0, peak, 1.0)[:, None]
    t = np.sqrt(u) if codebook.sqrt_domain else u
    power = codebook.level_power

    def levels_and_error(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.searchsorted(codebook.bounds, t / a[:, None], side="right")
        level = codebook.levels[index]
        return level, np.sum((u - a[:, None] ** power * level) ** 2, axis=1)

    alpha = np.asarray(alpha, dtype=np.float64)
    level, err = levels_and_error(alpha)
    for _ in range(steps):
        den = np.sum(level * level, axis=1)
        c = np.sum(u * level, axis=1) / np.where(den > 0, den, 1.0)
        candidate = np.clip(np.maximum(c, 0.0) ** (1.0 / power), 1e-6, 1.0)
        new_level, new_err = levels_and_error(candidate)
        better = (new_err < err) & (den > 0)
        if not better.any():
            break
        alpha = np.where(better, candidate, alpha)
        level = np.where(better[:, None], new_level, level)
        err = np.where(better, new_err, err)
    return alpha


def best_alpha(rows: np.ndarray, codebook: Codebook) -> np.ndarray:
    """The alpha per row a quantizer should use: histogram search, then the exact polish on short rows."""
    alpha = search_alpha(rows, codebook).alpha
    if rows.shape[1] <= REFINE_MAX_ROW:
        alpha = refine_alpha(rows, codebook, alpha)
    return alpha
