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
from onnxq.search import Codebook, search_alpha


def max_code(bits: int) -> int:
    """Largest code magnitude Q of a symmetric b-bit grid."""
    return 2 ** (check_bits(bits) - 1) - 1


def storage_bits(bits: int) -> int:
    """Bits per stored code: 2-4 bit weights live in int4, 5-8 bit ones in int8."""
    return 4 if check_bits(bits) <= 4 else 8


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


def scales_for(rows: np.ndarray, alpha: np.ndarray, bits: int, sqrt: bool) -> np.ndarray:
    """Per-row float32 scale for range alpha*max|w| (alpha*sqrt(max|w|) in sqrt mode); 1 for all-zero rows."""
    peak = np.abs(rows).max(axis=1).astype(np.float64)
    top = np.sqrt(peak) if sqrt else peak
    scale = (alpha * top / max_code(bits)).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1.0))


def quantize_rows(rows: np.ndarray, alpha: np.ndarray, bits: int, sqrt: bool) -> UniformWeights:
    """Quantize rows (R, n) with the given per-row alpha: round to nearest, clip to [-Q, Q]."""
    rows = np.asarray(rows, dtype=np.float32)
    scale = scales_for(rows, alpha, bits, sqrt)
    x = np.sign(rows) * np.sqrt(np.abs(rows)) if sqrt else rows
    q = max_code(bits)
    codes = np.clip(np.rint(x / scale[:, None]), -q, q).astype(np.int8)
    return UniformWeights(codes=codes, scale=scale, bits=bits, sqrt=sqrt, alpha=np.asarray(alpha, dtype=np.float64))


def dequantize(codes: np.ndarray, scale: np.ndarray, sqrt: bool) -> np.ndarray:
    """Codes (R, n) times per-row scales in float32; squared back with the sign kept in sqrt mode."""
    y = codes.astype(np.float32) * scale.astype(np.float32)[:, None]
    return y * np.abs(y) if sqrt else y


#: Rows up to this length get the exact polish; longer rows fill the histogram densely enough without it.
REFINE_MAX_ROW = 4096


def quantize_best(rows: np.ndarray, bits: int, sqrt: bool, refine_steps: int = 2) -> UniformWeights:
    """Search alpha per row for the least weight MSE, polish it on the exact data if rows are short, then quantize."""
    alpha = search_alpha(rows, codebook(bits, sqrt)).alpha
    if rows.shape[1] <= REFINE_MAX_ROW:
        alpha = refine_alpha(rows, alpha, bits, sqrt, refine_steps)
    return quantize_rows(rows, alpha, bits, sqrt)


def refine_alpha(rows: np.ndarray, alpha: np.ndarray, bits: int, sqrt: bool, steps: int) -> np.ndarray:
    """Lloyd-style polish of alpha on the exact weights, never making any row's MSE worse.

    With the codes fixed, the error is a quadratic in s (in s**2 for sqrt mode), so the best
    scale has a closed form; a new alpha is kept only where the exact error drops. This
    removes what the histogram's smoothing hides on short or sparse rows.
    """
    target = np.abs(rows).astype(np.float64)
    x = np.sqrt(target) if sqrt else target
    top = x.max(axis=1) if x.shape[1] else np.zeros(len(x))
    q = max_code(bits)
    safe_top = np.where(top > 0, top, 1.0)

    def codes_and_error(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        step = (a * safe_top / q)[:, None]
        k = np.minimum(np.rint(x / step), q)
        rec = (k * step) ** 2 if sqrt else k * step
        return k, np.sum((target - rec) ** 2, axis=1)

    alpha = np.asarray(alpha, dtype=np.float64)
    k, err = codes_and_error(alpha)
    for _ in range(steps):
        power = 2 if sqrt else 1
        num = np.sum(target * k**power, axis=1)
        den = np.sum(k ** (2 * power), axis=1)
        best = num / np.where(den > 0, den, 1.0)  # best s (s**2 in sqrt mode) for these codes
        step = np.sqrt(best) if sqrt else best
        candidate = np.clip(step * q / safe_top, 1e-6, 1.0)
        new_k, new_err = codes_and_error(candidate)
        better = (new_err < err) & (den > 0)
        if not better.any():
            break
        alpha = np.where(better, candidate, alpha)
        k = np.where(better[:, None], new_k, k)
        err = np.where(better, new_err, err)
    return alpha


def absmax_rows(rows: np.ndarray, bits: int, sqrt: bool = False) -> UniformWeights:
    """Plain round-to-nearest over the full range (alpha = 1): the baseline REQuant improves on."""
    return quantize_rows(rows, np.ones(len(rows)), bits, sqrt)
