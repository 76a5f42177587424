"""Balanced rounding: each row's rounding errors made to sum to (nearly) zero, without data.

A weight row w rounded to q changes its output by (w - q) x, whose mean is (w - q) E[x]. Behind a Relu every input is
positive, so E[x] is far from zero, and the errors of a row rounded to nearest, which sum to a random walk of about
sqrt(K / 12) levels, become a steady shift of that channel's output; every layer adds its own, and the next layers
amplify them. With data, onnxq folds the measured shift into the biases (onnxq/calibrate/mean_shift.py). Without data
E[x] is unknown, but where its entries are alike, (w - q) E[x] is their mean times the sum of the row's errors: balancing
moves the cheapest codes one level each (those whose weights lay nearest a tie, so the weight error rises the least)
until that sum is as near zero as the levels allow. The weight MSE rises a little; the mean shift goes.

Measured (one-off, openwakeword 0.4.0's speech embedding model, 20 convolutions behind leaky Relus, on synthetic
speech-like audio): 8-bit max|w| codes 20.9 -> 34.7 dB output SQNR, 4-bit 3.1 -> 10.1 dB (docs/output-aware.md).

Works on any grid whose values grow with the code (uniform codes, plain or in the sqrt domain, and POST codes): a move
is one code up or down, priced by the square error it adds per unit of the sum it removes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def balance_codes(rows: np.ndarray, codes: np.ndarray, values: Callable[[np.ndarray], np.ndarray], top: int) -> np.ndarray:
    """``codes`` (R, K) of ``rows`` moved so each row's summed error sum(values(codes) - rows) is nearest zero.

    ``values`` maps codes (R, K) to the float values they stand for on each row (the row's scale bound in), increasing
    with the code; codes stay within [-top, top]. Each row moves the fewest codes, the cheapest first (added square
    error per unit of sum removed), one level each, in the one direction that shrinks its sum, and stops where one more
    move would leave the sum further from zero. Returns new codes (int8); a row already within half a move stays.
    """
    rows = np.asarray(rows, dtype=np.float64)
    codes = np.asarray(codes)
    if codes.size == 0:
        return codes.copy()
    now = np.asarray(values(codes), dtype=np.float64)
    excess = np.sum(now - rows, axis=1)  # what each row's errors sum to
    direction = np.where(excess > 0, -1, 1).astype(np.int16)[:, None]
    moved = codes.astype(np.int16) + direction
    allowed = (moved >= -top) & (moved <= top)
    moved = np.clip(moved, -top, top)
    after = np.asarray(values(moved.astype(codes.dtype)), dtype=np.float64)
    gain = np.where(allowed, np.abs(after - now), 0.0)  # how much of the sum a move removes
    cost = np.where(allowed & (gain > 0), ((after - rows) ** 2 - (now - rows) ** 2) / np.where(gain > 0, gain, 1.0), np.inf)
    order = np.argsort(cost, axis=1, kind="stable")
    gains = np.take_along_axis(gain, order, axis=1)
    gains[~np.isfinite(np.take_along_axis(cost, order, axis=1))] = 0.0
    removed = np.concatenate([np.zeros((len(rows), 1)), np.cumsum(gains, axis=1)], axis=1)  # the sum removed by the first n moves
    count = np.argmin(np.abs(np.abs(excess)[:, None] - removed), axis=1)  # the n that leaves the sum nearest zero
    take = np.arange(codes.shape[1])[None, :] < count[:, None]
    chosen = np.zeros(codes.shape, dtype=bool)
    np.put_along_axis(chosen, order, take, axis=1)
    return np.where(chosen, moved, codes).astype(codes.dtype)
