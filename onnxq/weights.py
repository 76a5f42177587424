"""Quantize one weight tensor: rows per channel or per tensor, range search, plain or sqrt mode.

Pure numpy; the ONNX side only hands in an array and an axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq.config import RangeMethod, SqrtMode
from onnxq.formats import post, uniform


def to_rows(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """View a tensor as rows: one per index of ``axis``, or a single row when ``axis`` is None."""
    if axis is None:
        return weight.reshape(1, -1)
    return np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)


def from_rows(rows: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    """Inverse of :func:`to_rows`."""
    if axis is None:
        return rows.reshape(shape)
    axis %= len(shape)
    moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
    return np.moveaxis(rows.reshape(moved), 0, axis)


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight tensor as integer codes plus scales, ready to be written as DequantizeLinear inputs.

    ``codes`` has the original shape; ``scale`` has shape (C,) along ``axis``, or () when
    ``axis`` is None (per tensor).
    """

    codes: np.ndarray
    scale: np.ndarray
    axis: int | None
    bits: int
    sqrt: bool
    alpha: np.ndarray
    mse: float
    sqnr_db: float
    post: bool = False

    def dequantize(self) -> np.ndarray:
        """The float32 weights the model will compute with."""
        rows, scale = to_rows(self.codes, self.axis), np.atleast_1d(self.scale)
        approx = post.dequantize(rows, scale, self.bits) if self.post else uniform.dequantize(rows, scale, self.sqrt)
        return from_rows(approx, self.codes.shape, self.axis)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    noise = float(np.sum((reference.astype(np.float64) - approx) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(signal / noise)) if signal > 0 else float("-inf")


def quantize_weight(
    weight: np.ndarray,
    bits: int,
    axis: int | None,
    sqrt: SqrtMode = SqrtMode.AUTO,
    method: RangeMethod = RangeMethod.SEARCH,
) -> QuantizedTensor:
    """Quantize ``weight`` to ``bits`` per row along ``axis`` (None: per tensor).

    With SqrtMode.AUTO both plain and sqrt codes are tried and the one with the lower
    weight MSE is kept.
    """
    weight = np.asarray(weight, dtype=np.float32)
    rows = to_rows(weight, axis)
    modes = {SqrtMode.OFF: (False,), SqrtMode.ON: (True,), SqrtMode.AUTO: (False, True)}[sqrt]
    best: QuantizedTensor | None = None
    for use_sqrt in modes:
        if method is RangeMethod.SEARCH:
            q = uniform.quantize_best(rows, bits, use_sqrt)
        else:
            q = uniform.absmax_rows(rows, bits, use_sqrt)
        candidate = _from_row_codes(rows, q, weight.shape, axis, sqrt=use_sqrt, is_post=False)
        if best is None or candidate.mse < best.mse:
            best = candidate
    assert best is not None
    return best


def quantize_post_weight(weight: np.ndarray, bits: int, axis: int | None) -> QuantizedTensor:
    """Quantize ``weight`` to b-bit POST codes (powers of sqrt 2) per row along ``axis``, alpha searched."""
    weight = np.asarray(weight, dtype=np.float32)
    rows = to_rows(weight, axis)
    return _from_row_codes(rows, post.quantize_best(rows, bits), weight.shape, axis, sqrt=False, is_post=True)


def _from_row_codes(
    rows: np.ndarray, q: uniform.UniformWeights | post.PostWeights, shape: tuple[int, ...], axis: int | None, sqrt: bool, is_post: bool
) -> QuantizedTensor:
    """Row-wise codes back in the tensor's shape, with the error they leave measured against ``rows``."""
    approx = q.dequantize()
    return QuantizedTensor(
        codes=from_rows(q.codes, shape, axis),
        scale=q.scale if axis is not None else q.scale.reshape(()),
        axis=axis,
        bits=q.bits,
        sqrt=sqrt,
        alpha=q.alpha,
        mse=float(np.mean((rows.astype(np.float64) - approx) ** 2)) if rows.size else 0.0,
        sqnr_db=sqnr_db(rows, approx),
        post=is_post,
    )
