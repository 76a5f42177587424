"""The activation stage: gather statistics over calibration data and choose each activation tensor's quantization.

``calibrate`` is the whole stage: check and batch the data (``data``), run the float model
once (``collect``), choose a range per tensor (``ranges``) and, for ASQ, fit the per-input
step adapter (``asq``). The numerics live in modules that know nothing of ONNX.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxq.calibrate.asq import Adapter, LogLinear, fit_adapter, sample_betas
from onnxq.calibrate.collect import TensorStats, channel_axis, channel_means, collect, exposing, feature_axes, sample_bytes, sized_runs
from onnxq.calibrate.data import CalibrationData, calibration_batches
from onnxq.calibrate.histogram import ChannelHistograms
from onnxq.calibrate.moments import Hessians, MomentCollector
from onnxq.calibrate.placement import ActivationSite
from onnxq.calibrate.ranges import Range, entropy_range, minmax_range, mse_fractions, mse_range, percentile_range, quant_params, range_sqnr_db
from onnxq.calibrate.result import ActivationQuant, Calibration
from onnxq.calibrate.samples import RunSizer, SampleAxes, batch_size, batch_slice, cuttable, first_samples, input_specs, sample_axes
from onnxq.config import ActivationConfig, BiasCorrection, CalibrationMethod

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

#: Calibration samples held out to check, per tensor, that ASQ's per-sample factor beats fixed per-channel steps.
VALIDATION_SAMPLES = 64

#: Calibration samples kept in memory for empirical bias correction (a second look at the data).
BIAS_SAMPLES = 64

#: The code width IntConv/PostConv quantize their input to (uint8): sites they read at this width get per-sample scalar steps.
INTEGER_OP_BITS = 8


def calibrate(
    model: onnx.ModelProto, sites: list[ActivationSite], data: CalibrationData, config: ActivationConfig, moments: MomentCollector | None = None,
    client: Client | None = None,
) -> Calibration:
    """How to quantize each site's tensor, from one run of the float ``model`` over ``data`` (which also sums ``moments``).

    With a Dask ``client`` that run is spread over its workers; the held-out checks of ASQ run here (a few samples).
    """
    specs = input_specs(model)
    axes = sample_axes(specs)
    batches = calibration_batches(data, specs, config.samples)
    per_sample = config.method is CalibrationMethod.ASQ
    kept: list[dict[str, np.ndarray]] = []
    keep = max(VALIDATION_SAMPLES if per_sample else 0, BIAS_SAMPLES if config.bias_correction is not BiasCorrection.OFF else 0)
    if keep:
        batches = _keep_first(batches, axes, kept, keep)
    histograms = config.method is not CalibrationMethod.MINMAX
    stats = collect(model, [s.tensor for s in sites], batches, per_sample=per_sample, total=config.samples, histograms=histograms,
                    moments=moments, client=client)
    held = first_samples(kept, axes, VALIDATION_SAMPLES)
    quants = {}
    candidates: dict[str, tuple[ActivationQuant, ActivationQuant]] = {}
    for site in sites:
        entry = stats[site.tensor]
        r = choose_range(entry, site.bits, config)
        if not site.required and (own := range_sqnr_db(entry.histogram, r, site.bits)) < optional_sqnr_floor(site.bits):
            logger.debug("%s: left float (one %d-bit step holds it at %.1f dB only)", site.tensor, site.bits, own)
            continue
        quant = ActivationQuant(site.tensor, quant_params(r, site.bits))
        if per_sample:
            skip = sum(batch_size(b, axes) for b in held)
            scalar = site.feeds_integer_op and site.bits == INTEGER_OP_BITS
            candidates[site.tensor] = (_scalar_adapters if scalar else _adapters)(quant, entry, r, skip=skip)
            quant = candidates[site.tensor][0]
        logger.debug("%s: %d bits, range [%.4g, %.4g]", site.tensor, site.bits, r.lo, r.hi)
        quants[site.tensor] = quant
    if candidates:
        quants.update(choose_adapters(model, candidates, held))
    hessians, means = (moments.hessians(), moments.means()) if moments is not None else (Hessians(), {})
    return Calibration(quants, {name: entry.channels for name, entry in stats.items()}, kept, hessians, means)


def _keep_first(
    batches: Iterator[dict[str, np.ndarray]], axes: SampleAxes, kept: list[dict[str, np.ndarray]], samples: int
) -> Iterator[dict[str, np.ndarray]]:
    """Pass ``batches`` through, copying the first ``samples`` samples into ``kept`` (whole runs where runs cannot be cut)."""
    count = 0
    for batch in batches:
        if count < samples:
            first = batch_slice(batch, axes, None, samples - count) if cuttable(axes) else batch
            kept.append({k: np.array(v) for k, v in first.items()})
            count += batch_size(kept[-1], axes)
        yield batch


def optional_sqnr_floor(bits: int) -> float:
    """The least SQNR (dB) an optional site's own quantization must keep: 30 dB at 8 bits, 6 dB less a bit fewer.

    A uniform code of ``bits`` bits over a well-spread tensor keeps about 6 dB a bit; a residual stream with outlier
    channels (a BERT-style encoder's, at 18-22 dB with uint8) falls far below and cost the model most of its output.
    """
    return 6.02 * bits - 18.0


def choose_range(stats: TensorStats, bits: int, config: ActivationConfig) -> Range:
    """The fixed range the configured method picks (ASQ starts from the MSE range)."""
    h = stats.histogram
    method = config.method
    if method is CalibrationMethod.MINMAX:
        return minmax_range(h)
    if method is CalibrationMethod.PERCENTILE:
        return percentile_range(h, config.percentile)
    if method is CalibrationMethod.ENTROPY:
        return entropy_range(h, bits)
    return mse_range(h, bits)


def _adapters(quant: ActivationQuant, stats: TensorStats, base: Range, skip: int) -> tuple[ActivationQuant, ActivationQuant]:
    """ASQ's two candidates for a tensor: per-channel MSE steps times a per-sample factor, and the fixed per-channel steps.

    The per-sample factor is fit on the samples after the first ``skip`` (held out to choose).
    """
    assert stats.samples is not None and stats.samples.channels is not None
    per_sample = _per_sample_factor(stats, base, quant.params.bits, skip)
    steps, zero_points = channel_steps(stats.samples.channels, quant.params.bits)
    shape = (feature_axes(stats.rank), zero_points, channel_axis(stats.rank), stats.rank)
    adaptive = ActivationQuant(quant.tensor, quant.params, Adapter(per_sample, steps), *shape)
    fixed = ActivationQuant(quant.tensor, quant.params, Adapter(LogLinear(np.zeros_like(per_sample.weight), 0.0), steps), *shape)
    return adaptive, fixed


def _per_sample_factor(stats: TensorStats, base: Range, bits: int, skip: int) -> LogLinear:
    """The adapter's per-sample part: ridge fit of each sample's MSE-optimal factor on ``base``, on the samples after ``skip``."""
    assert stats.samples is not None
    counts, lo, hi, features = stats.samples.stacked()
    fit_rows = slice(skip, None) if len(features) - skip >= 5 else slice(None)
    return fit_adapter(features[fit_rows], sample_betas(counts[fit_rows], lo[fit_rows], hi[fit_rows], base, bits))


def _scalar_adapters(quant: ActivationQuant, stats: TensorStats, base: Range, skip: int) -> tuple[ActivationQuant, ActivationQuant]:
    """ASQ's two candidates for a tensor an integer op reads: the MSE step times a per-sample factor, and the fixed MSE step.

    IntConv/PostConv sum over input channels, which must share one step, so the adapter has one output (a step per
    sample, zero point the fixed range's) and the fixed candidate is plain per-tensor quantization (no adapter). The
    per-sample factor is fit on the samples after the first ``skip`` (held out to choose).
    """
    per_sample = _per_sample_factor(stats, base, quant.params.bits, skip)
    zero_point = np.array([quant.params.zero_point], dtype=np.int64)
    shape = (feature_axes(stats.rank), zero_point, channel_axis(stats.rank), stats.rank)
    adaptive = ActivationQuant(quant.tensor, quant.params, Adapter(per_sample, np.array([quant.params.scale])), *shape)
    return adaptive, quant


def choose_adapters(
    model: onnx.ModelProto, candidates: dict[str, tuple[ActivationQuant, ActivationQuant]], held: list[dict[str, np.ndarray]]
) -> dict[str, ActivationQuant]:
    """Per tensor, the candidate with the lower quantization error on the held-out samples (fixed steps on a tie).

    Each pair is (adaptive, fixed); the fixed one has per-channel steps (an adapter without a per-sample part) or, for a
    tensor an integer op reads, no adapter at all.
    """
    errors = {name: np.zeros(len(pair)) for name, pair in candidates.items()}
    names = list(candidates)
    with exposing(model, names) as sess:
        for _, outputs in sized_runs(sess, names, held, RunSizer(input_specs(model), sample_bytes(model, names))):
            for name, value in zip(names, outputs, strict=True):
                errors[name] += [asq_error(value, quant) for quant in candidates[name]]
    chosen = {}
    for name, (adaptive, fixed) in candidates.items():
        keep = errors[name][0] < errors[name][1]
        logger.debug("%s: ASQ per-sample factor %s (held-out error %.4g vs %.4g)", name, "kept" if keep else "dropped", *errors[name])
        chosen[name] = adaptive if keep else fixed
    return chosen


def asq_error(x: np.ndarray, quant: ActivationQuant) -> float:
    """Squared error of quantizing the batch ``x`` with ``quant``, computed directly in numpy.

    With an adapter: its steps, per sample and channel (N, C), or per sample (N, 1) for a one-output adapter, which
    broadcast over the channels. Without: the fixed per-tensor step and zero point.
    """
    if quant.adapter is None:
        steps = np.full((len(x), 1), quant.params.scale)
        zero_points = np.array([quant.params.zero_point])
    else:
        assert quant.zero_points is not None
        steps = quant.adapter.predict(channel_means(x))  # (N, C) or (N, 1)
        zero_points = quant.zero_points
    moved = np.moveaxis(x.astype(np.float64), quant.channel_axis, 1)
    extra = (None,) * (moved.ndim - 2)
    r = steps[(slice(None), slice(None), *extra)]
    z = zero_points.astype(np.float64)[(None, slice(None), *extra)]
    qmax = (1 << quant.params.bits) - 1
    approx = (np.clip(np.rint(moved / r) + z, 0, qmax) - z) * r
    return float(np.sum((moved - approx) ** 2))


def channel_steps(h: ChannelHistograms, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the MSE-optimal step and zero point over all calibration data (dead channels: step 1, zero point 0)."""
    lo, hi = np.minimum(h.min, 0.0), np.maximum(h.max, 0.0)
    live = hi - lo > 0
    alpha = np.ones(len(lo))
    if live.any():
        alpha[live] = mse_fractions(h.centers[live], h.counts[live].astype(np.float64), lo[live], hi[live], bits)
    params = [quant_params(Range(a * low, a * high), bits) for a, low, high in zip(alpha, lo, hi, strict=True)]
    return np.array([p.scale for p in params]), np.array([p.zero_point for p in params], dtype=np.int64)
