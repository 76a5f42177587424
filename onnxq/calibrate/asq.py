"""ASQ for post-training quantization: per-input, per-channel factors beta on an activation's step size.

A fixed step s fits the typical input and the typical channel; ASQ (Adaptive Step Size
Quantization) multiplies it by beta, computed from the input by a tiny adapter, so each
input and channel gets nearly its own best step. Post-training, without gradients, the
adapter is fit in two parts that one Gemm then carries:

- per channel c, the step s_c that minimises that channel's MSE over all calibration data
  (the same grid + golden-section search as everything else, on per-channel histograms);
- per sample i, the MSE-optimal factor beta_i of the whole tensor's range (zero point kept),
  predicted from the sample's channel means f by a ridge regression of log(beta):
  log beta = w . f + b, the ridge chosen on a held-out fifth.

So step[i, c] = s_c * exp(f_i . w + b) (the exponent clipped to b +- LOG_STEP_MARGIN): in the graph
a one-output Gemm, an Exp and a Mul by the C steps, which keeps the adapter's size linear in the
channels. With w = 0 it is a fixed per-channel step, written as constants (no adapter nodes). Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq.calibrate.ranges import Range, range_errors
from onnxq.numerics.search import minimise_on_grid, scan_points
from onnxq.numerics.threads import one_blas_thread

RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3)

#: BLAS_THREADS_NOTE: the ridge fits run BLAS on one thread. Their matrices are at most a few hundred
#: by a thousand, where threads gain little, and a multi-threaded OpenBLAS whose threads share the cores
#: with other work spins (a one-off measurement: 448 x 960 fits twenty times slower with the second core busy).


@dataclass(frozen=True)
class LogLinear:
    """beta(f) = exp(f @ weight + bias) for feature rows f: the per-sample part of the adapter."""

    weight: np.ndarray  # (C_in,)
    bias: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Beta for each row of ``features`` (S, C_in)."""
        return np.exp(np.asarray(features, dtype=np.float64) @ self.weight + self.bias)


#: An adapter's log factor stays within this distance of its bias (a factor e^16 = 9e6 either way), so
#: that no input, however far from the calibration data, gives a zero or infinite step.
LOG_STEP_MARGIN = 16.0


@dataclass(frozen=True)
class Adapter:
    """step(f)[c] = channel_steps[c] * exp(clip(f @ w + b, b +- LOG_STEP_MARGIN)), (w, b) = ``per_sample``.

    One entry in ``channel_steps`` gives one step per sample, shared by all channels (what IntConv/PostConv read).
    """

    per_sample: LogLinear
    channel_steps: np.ndarray  # (C_out,)

    @property
    def adaptive(self) -> bool:
        """Whether the step depends on the input at all (w != 0); without, it is a fixed step per channel."""
        return bool(np.any(self.per_sample.weight != 0))

    @property
    def outputs(self) -> int:
        """Steps per sample: one per channel, or one for the whole sample."""
        return len(self.channel_steps)

    def log_factor_bounds(self) -> tuple[float, float]:
        """The clip applied to f @ w + b: b +- LOG_STEP_MARGIN."""
        return self.per_sample.bias - LOG_STEP_MARGIN, self.per_sample.bias + LOG_STEP_MARGIN

    def factors(self, features: np.ndarray) -> np.ndarray:
        """(S,) per-sample factors for the rows of ``features`` (S, C_in), clipped as in the graph."""
        lo, hi = (np.float32(b) for b in self.log_factor_bounds())
        return np.exp(np.clip(np.asarray(features, dtype=np.float64) @ self.per_sample.weight + self.per_sample.bias, lo, hi))

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(S, C_out) steps for the rows of ``features`` (S, C_in)."""
        return self.factors(features)[:, None] * np.asarray(self.channel_steps, dtype=np.float64)[None, :]


def sample_betas(counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, base: Range, bits: int) -> np.ndarray:
    """Per sample, the beta whose range ``base.scaled(beta)`` quantizes that sample with the least MSE.

    ``counts`` (S, bins) are per-sample histograms over each sample's own [lo, hi]. beta may
    exceed 1 (a sample wider than the calibrated range) up to what covers the sample.
    """
    counts = np.asarray(counts, dtype=np.float64)
    bins = counts.shape[1]
    width = (hi - lo) / bins
    centers = lo[:, None] + (np.arange(bins) + 0.5) * width[:, None]
    cover = np.maximum(_ratio(hi, base.hi), _ratio(lo, base.lo))
    upper = np.maximum(cover, 1e-6)

    def error(beta: np.ndarray) -> np.ndarray:
        return range_errors(centers, counts, beta * base.lo, beta * base.hi, bits)

    beta, _ = minimise_on_grid(error, upper, scan_points(1 << bits))
    return beta


def _ratio(value: np.ndarray, reference: float) -> np.ndarray:
    return value / reference if reference != 0.0 else np.zeros_like(value)


def fit_adapter(features: np.ndarray, beta: np.ndarray, seed: int = 0) -> LogLinear:
    """Ridge regression of log(beta) on standardised features; the ridge is picked on a held-out fifth."""
    x = np.asarray(features, dtype=np.float64)
    y = np.log(np.asarray(beta, dtype=np.float64))
    samples, channels = x.shape
    if samples < 5:
        return LogLinear(np.zeros(channels), float(np.mean(y)) if samples else 0.0)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    z = (x - mean) / std
    order = np.random.default_rng(seed).permutation(samples)
    held, train = order[: samples // 5], order[samples // 5 :]
    with one_blas_thread():  # see BLAS_THREADS_NOTE
        losses = [np.mean((fit.predict_log(z[held]) - y[held]) ** 2) for fit in _ridges(z[train], y[train], RIDGES)]
        (fit,) = _ridges(z, y, (RIDGES[int(np.argmin(losses))],))
    weight = fit.weight / std
    return LogLinear(weight, float(fit.bias - mean @ weight))


@dataclass(frozen=True)
class _Linear:
    weight: np.ndarray
    bias: float

    def predict_log(self, z: np.ndarray) -> np.ndarray:
        return z @ self.weight + self.bias


def _ridges(z: np.ndarray, y: np.ndarray, ridges: tuple[float, ...]) -> list[_Linear]:
    """Least squares with an L2 penalty ``ridge * samples`` on the weights (not the bias), for each ridge.

    The weights w = (Z^T Z + r n I)^-1 Z^T t, t = y - mean(y), come from one eigendecomposition of the
    smaller Gram matrix: with Z^T Z = V diag(l) V^T, w = V diag(1 / (l + r n)) V^T Z^T t; with fewer
    samples than channels (MobileNetV2's 960), Z Z^T = Q diag(l) Q^T gives the same w as
    Z^T Q diag(1 / (l + r n)) Q^T t. Every ridge for the price of one min(n, C)-sized factorisation.
    """
    samples, channels = z.shape
    t = y - y.mean()
    if not channels:
        return [_Linear(np.zeros(0), float(y.mean())) for _ in ridges]
    by_channel = channels <= samples
    values, vectors = np.linalg.eigh(z.T @ z if by_channel else z @ z.T)
    values = np.maximum(values, 0.0)  # a Gram matrix; rounding may leave tiny negatives
    projected = vectors.T @ (z.T @ t if by_channel else t)
    fits = []
    for ridge in ridges:
        solved = vectors @ (projected / (values + ridge * samples))
        weight = solved if by_channel else z.T @ solved
        fits.append(_Linear(weight, float(y.mean() - z.mean(axis=0) @ weight)))
    return fits
