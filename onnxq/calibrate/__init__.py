"""Activation calibration: gather statistics over calibration data and choose each tensor's quantization.

``calibrate`` is the whole stage: check and batch the data (``data``), run the float model
once (``collect``), choose a range per tensor (``ranges``) and, for ASQ, fit the per-input
step adapter (``asq``). The numerics live in modules that know nothing of ONNX.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx

from onnxq.calibrate.asq import fit_adapter, sample_betas
from onnxq.calibrate.collect import ChannelMeans, TensorStats, collect, feature_axes
from onnxq.calibrate.data import CalibrationData, calibration_batches, input_specs
from onnxq.calibrate.placement import ActivationSite
from onnxq.calibrate.ranges import Range, entropy_range, minmax_range, mse_range, percentile_range, quant_params
from onnxq.config import ActivationConfig, CalibrationMethod
from onnxq.rewrite_activations import ActivationQuant

logger = logging.getLogger(__name__)

__all__ = ["Calibration", "CalibrationData", "calibrate", "choose_range"]


@dataclass(frozen=True)
class Calibration:
    """What calibration found: each site's quantization, and the sites' channel means (for bias correction)."""

    quants: dict[str, ActivationQuant]
    means: dict[str, ChannelMeans]


def calibrate(model: onnx.ModelProto, sites: list[ActivationSite], data: CalibrationData, config: ActivationConfig) -> Calibration:
    """How to quantize each site's tensor, from one run of the float ``model`` over ``data``."""
    batches = calibration_batches(data, input_specs(model), config.samples)
    per_sample = config.method is CalibrationMethod.ASQ
    stats = collect(model, [s.tensor for s in sites], batches, per_sample=per_sample, total=config.samples)
    quants = {}
    for site in sites:
        entry = stats[site.tensor]
        r = choose_range(entry, site.bits, config)
        quant = ActivationQuant(site.tensor, quant_params(r, site.bits))
        if per_sample:
            quant = _with_adapter(quant, entry, r)
        logger.debug("%s: %d bits, range [%.4g, %.4g]", site.tensor, site.bits, r.lo, r.hi)
        quants[site.tensor] = quant
    return Calibration(quants, {name: entry.channels for name, entry in stats.items()})


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


def _with_adapter(quant: ActivationQuant, stats: TensorStats, base: Range) -> ActivationQuant:
    """``quant`` plus the ASQ adapter fit on the per-sample best steps."""
    assert stats.samples is not None
    counts, lo, hi, features = stats.samples.stacked()
    betas = sample_betas(counts, lo, hi, base, quant.params.bits)
    adapter = fit_adapter(features, betas)
    return ActivationQuant(quant.tensor, quant.params, adapter, feature_axes(stats.rank))
