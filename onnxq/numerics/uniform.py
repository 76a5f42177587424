"""Symmetric uniform b-bit weights, optionally in the square-root domain (REQuant).

A b-bit code q is an integer in [-Q, Q] with Q = 2**(b-1) - 1 (the most negative
value is left unused, so the grid is symmetric). With scale s the weight is q*s; in
sqrt mode q*s approximates sign(w)*sqrt(|w|) and the weight is (q*s)*|q*s|.
Weights are handled as rows (R, n): one row per tensor or per output channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq.config import check_bits
from onnxq.numerics.search import Codebook, best_alpha, minimise_on_grid, per_candidate, scan_points


def max_code(bits: int) -> int:
    """Largest code magnitude Q of a symmetric b-bit grid."""
    return 2 ** (check_bits(bits) - 1) - 1


def storage_bits(bits: int) -> int:
    """Bits per stored code: 2-4 bit weights live in int4, 5-8 bit ones in int8."""
    return 4 if check_bits(bits) <= 4 else 8


def quantized_bytes(weights: int, bits: int, scales: int, scale_bytes: int = 4) -> int:
    """Stored bytes of a quantized weight tensor: its codes (int4 packed two to a byte) plus its scales (one at least).

    ``scale_bytes``: each scale's (float32 unless said otherwise).
    """
    return (weights * storage_bits(bits) + 7) // 8 + scale_bytes * max(scales, 1)


def codebook(bits: int, sqrt: bool) -> Codebook:
    """The magnitudes a b-bit symmetric grid reaches at alpha = 1, as the range search sees them."""
    q = max_code(bits)
    k = np.arange(q + 1, dtype=np.float64) / q
    bounds = (np.arange(q, dtype=np.float64) + 0.5) / q
    if sqrt:
        return Codebook(levels=k**2, bounds=bounds, level_power=2, sqrt_domain=True)
    return Codebook(levels=k, bounds=bounds, level_power=1, sqrt_domain=False)


@dataclass(frozen=True)
class UniformWeights:
    """Integer codes (R, n) int8 with one float32 scale per row; ``sqrt`` says how to decode."""

    codes: np.ndarray
    scale: np.ndarray
    bits: int
    sqrt: bool
    alpha: np.ndarray

    def dequantize(self) -> np.ndarray:
        """The float32 weights these codes stand for, as ONNX's DequantizeLinear (+ y*|y|) computes them."""
        return dequantize(self.codes, self.scale, self.sqrt)


def scales_for(rows: np.ndarray, alpha: np.ndarray, bits: int, sqrt: bool, half: bool = False) -> np.ndarray:
    """Per-row float32 scale for range alpha*max|w| (alpha*sqrt(max|w|) in sqrt mode); 1 for all-zero rows.

    ``half``: each scale the nearest float16 value where float16 holds it (:func:`half_scales`).
    """
    scale = steps_for(alpha, row_tops(rows, sqrt), bits)
    return half_scales(scale) if half else scale


def row_tops(rows: np.ndarray, sqrt: bool) -> np.ndarray:
    """Each row's max|w| in float64 (its square root in sqrt mode): what a range factor of 1 spans."""
    peak = np.abs(rows).max(axis=1).astype(np.float64) if rows.shape[1] else np.zeros(len(rows))
    return np.sqrt(peak) if sqrt else peak


def steps_for(alpha: np.ndarray, top: np.ndarray, bits: int) -> np.ndarray:
    """float32 steps alpha * top / Q (broadcast as given), 1 where that is 0 (a row of zeros): :func:`scales_for`'s rule."""
    scale = (alpha * top / max_code(bits)).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1.0))


class Rounding:
    """Rows (R, n) rounded to nearest on a b-bit grid at any per-row range factors.

    What does not depend on the factor (the rows in the grid's domain, as float32, and their tops) is computed once:
    the range searches try ~50 factors each, and :func:`quantize_rows` would compute both again for every one.
    """

    def __init__(self, rows: np.ndarray, bits: int, sqrt: bool) -> None:
        self.bits, self.sqrt = bits, sqrt
        self.domain = np.ascontiguousarray(to_domain(np.asarray(rows, dtype=np.float32), sqrt))
        self.top = row_tops(rows, sqrt)

    def values(self, alpha: np.ndarray) -> np.ndarray:
        """The float32 values the rows round to at range factors ``alpha`` (R,): :func:`quantize_rows`' then dequantized."""
        scale = steps_for(alpha, self.top, self.bits)[:, None]
        codes = nearest_codes(self.domain, scale, max_code(self.bits))
        return decoded(codes, scale, self.sqrt, out=codes)


#: Smallest positive normal float16: scales below it would lose precision in float16, and stay float32.
HALF_TINY = float(np.finfo(np.float16).tiny)


def half_scales(scale: np.ndarray) -> np.ndarray:
    """float32 ``scale`` rounded to float16 values where they are normal float16 numbers (the rest as they are).

    A scale per block of 32 inputs costs a bit per weight in float32 and half that in float16, whose 11-bit precision
    moves a scale by 0.05 % at most: nothing beside a 4-bit step. A tensor whose scales all hold is stored in float16
    (onnxq/rewrite/qdq.py, :func:`fits_half`).
    """
    scale = np.asarray(scale, dtype=np.float32)
    rounded = scale.astype(np.float16).astype(np.float32)
    return np.where((np.abs(scale) >= HALF_TINY) & np.isfinite(rounded), rounded, scale)


def fits_half(scale: np.ndarray) -> bool:
    """Whether every scale is a normal float16 value (stored as float16 without a change)."""
    scale = np.asarray(scale, dtype=np.float32)
    with np.errstate(over="ignore"):
        half = scale.astype(np.float16)
    return bool(np.all(np.isfinite(half)) and np.all(np.abs(scale) >= HALF_TINY) and np.array_equal(half.astype(np.float32), scale))


def to_domain(values: np.ndarray, sqrt: bool) -> np.ndarray:
    """The values the grid is uniform in: sign(w) sqrt|w| in sqrt mode, w itself otherwise."""
    return np.sign(values) * np.sqrt(np.abs(values)) if sqrt else values


def nearest_codes(domain: np.ndarray, scale: np.ndarray, q: int) -> np.ndarray:
    """Codes of ``domain`` / ``scale`` (broadcast as given) rounded to nearest and clipped to [-q, q], as whole floats.

    Worked in the quotient's own memory, without np.clip's Python-level wrapper: GPTQ and the diagonal alpha search
    call this once per column or candidate, where the wrapper cost more than the work.
    """
    codes = np.divide(domain, scale)
    np.rint(codes, out=codes)
    np.minimum(codes, q, out=codes)
    np.maximum(codes, -q, out=codes)
    return codes


def decoded(codes: np.ndarray, scale: np.ndarray, sqrt: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Float32 codes times float32 scales (broadcast as given), squared back with the sign kept in sqrt mode."""
    y = np.multiply(codes, scale, out=out)
    if sqrt:
        y *= np.abs(y)
    return y


def quantize_rows(rows: np.ndarray, alpha: np.ndarray, bits: int, sqrt: bool, half: bool = False) -> UniformWeights:
    """Quantize rows (R, n) with the given per-row alpha: round to nearest, clip to [-Q, Q] (``half``: :func:`scales_for`'s)."""
    rows = np.asarray(rows, dtype=np.float32)
    scale = scales_for(rows, alpha, bits, sqrt, half)
    codes = nearest_codes(to_domain(rows, sqrt), scale[:, None], max_code(bits)).astype(np.int8)
    return UniformWeights(codes=codes, scale=scale, bits=bits, sqrt=sqrt, alpha=np.asarray(alpha, dtype=np.float64))


def dequantize(codes: np.ndarray, scale: np.ndarray, sqrt: bool) -> np.ndarray:
    """Codes (R, n) times per-row scales (R,) or per-code ones (R, n) in float32; squared back with the sign kept in sqrt mode."""
    return decoded(codes.astype(np.float32), row_scales(scale, codes.ndim), sqrt)


def expand_blocks(scale: np.ndarray, block_size: int, columns: int) -> np.ndarray:
    """Scales per row and block (R, B) as a scale per code (R, ``columns``): each repeated over its block's inputs."""
    return np.repeat(np.asarray(scale), block_size, axis=1)[:, :columns]


def row_scales(scale: np.ndarray, ndim: int = 2) -> np.ndarray:
    """float32 ``scale`` shaped to multiply rows (R, n): per row (R,) as a column, per code (R, n) as it is."""
    scale = np.asarray(scale, dtype=np.float32)
    return scale if scale.ndim == ndim else scale.reshape(*scale.shape, *([1] * (ndim - scale.ndim)))


def quantize_best(rows: np.ndarray, bits: int, sqrt: bool) -> UniformWeights:
    """Search alpha per row for the least weight MSE (polished on the exact data for short rows), then quantize."""
    return quantize_rows(rows, best_alpha(rows, codebook(bits, sqrt)), bits, sqrt)


def quantize_exact(rows: np.ndarray, bits: int, sqrt: bool, half: bool = False) -> UniformWeights:
    """:func:`quantize_best` for short rows: alpha per row by the weight MSE of the row's own values rounded, no histogram.

    The same scan and golden-section search (search.minimise_on_grid), every candidate rounded exactly as
    :func:`quantize_rows` rounds; for rows of a few dozen values (blocks of inputs) this is cheaper than histograms of a
    thousand bins each, and exact.
    """
    rows = np.asarray(rows, dtype=np.float32)
    rounding = Rounding(rows, bits, sqrt)
    reference = rows.astype(np.float64)

    def error(alpha: np.ndarray) -> np.ndarray:
        return np.sum((reference - rounding.values(alpha)) ** 2, axis=1)

    alpha = minimise_on_grid(per_candidate(error), np.ones(len(rows)), scan_points(2 * max_code(bits) + 1), 14)[0]
    return quantize_rows(rows, alpha, bits, sqrt, half)


def absmax_rows(rows: np.ndarray, bits: int, sqrt: bool = False, half: bool = False) -> UniformWeights:
    """Plain round-to-nearest over the full range (alpha = 1): the baseline REQuant improves on."""
    return quantize_rows(rows, np.ones(len(rows)), bits, sqrt, half)
