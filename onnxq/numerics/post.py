"""POST weights: powers of sqrt(2) (ASQ's non-uniform grid), as signed magnitude indices.

A b-bit POST code is a sign and a (b-1)-bit magnitude index m in [0, M], M = 2**(b-1) - 1.
m = 0 is zero; m >= 1 stands for alpha * max|w| * sqrt(2)**-(M - m). At 4 bits the
magnitudes are {0} and alpha*max|w| times 2**-3, 2**-2.5, ..., 2**-0.5, 1: M + 1 = 8 values,
which is all a sign plus 3 bits can hold (the ASQ paper's formula lists one more).

Codes are stored as the signed integer q = sign * m in [-M, M], so they pack into int4/int8
exactly like uniform codes. Rounding goes to the nearest level in the linear domain
(boundaries halfway between neighbouring levels), not to the nearest exponent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq.config import check_bits
from onnxq.numerics import uniform
from onnxq.numerics.search import Codebook, best_alpha


def max_index(bits: int) -> int:
    """Largest magnitude index M of a b-bit POST code."""
    return 2 ** (check_bits(bits) - 1) - 1


def magnitudes(bits: int) -> np.ndarray:
    """Magnitude of each index m = 0..M at alpha * max|w| = 1: 0, then sqrt(2)**-(M - m)."""
    m = np.arange(max_index(bits) + 1, dtype=np.float64)
    levels = np.sqrt(2.0) ** -(max_index(bits) - m)
    levels[0] = 0.0
    return levels


def codebook(bits: int) -> Codebook:
    """The POST grid as the range search sees it: levels and midpoint boundaries, both linear in alpha."""
    levels = magnitudes(bits)
    return Codebook(levels=levels, bounds=(levels[1:] + levels[:-1]) / 2, level_power=1, sqrt_domain=False)


@dataclass(frozen=True)
class PostWeights:
    """Signed magnitude indices (R, n) int8 and one float32 scale (alpha * max|w|) per row."""

    codes: np.ndarray
    scale: np.ndarray
    bits: int
    alpha: np.ndarray

    def dequantize(self) -> np.ndarray:
        """The float32 weights these codes stand for."""
        return dequantize(self.codes, self.scale, self.bits)


def quantize_rows(rows: np.ndarray, alpha: np.ndarray, bits: int) -> PostWeights:
    """Round each weight to the nearest POST level of its row's range alpha * max|w|."""
    rows = np.asarray(rows, dtype=np.float32)
    peak = np.abs(rows).max(axis=1).astype(np.float64) if rows.shape[1] else np.zeros(len(rows))
    scale = (np.asarray(alpha, dtype=np.float64) * peak).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0))
    bounds = codebook(bits).bounds.astype(np.float32)
    index = np.searchsorted(bounds, np.abs(rows) / scale[:, None], side="right")
    codes = (np.sign(rows) * index).astype(np.int8)
    return PostWeights(codes=codes, scale=scale, bits=bits, alpha=np.asarray(alpha, dtype=np.float64))


def dequantize(codes: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """sign(q) * scale * sqrt(2)**-(M - |q|), and 0 for q = 0, in float32."""
    levels = magnitudes(bits).astype(np.float32)
    return (np.sign(codes) * levels[np.abs(codes)] * uniform.row_scales(scale, codes.ndim)).astype(np.float32)


def quantize_best(rows: np.ndarray, bits: int) -> PostWeights:
    """Search alpha per row for the least weight MSE on the POST grid, then quantize."""
    return quantize_rows(rows, best_alpha(rows, codebook(bits)), bits)
