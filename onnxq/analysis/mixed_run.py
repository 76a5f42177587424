"""Mixed precision with one pass over the data: the quantizer's calibration pass sums the H the proxy prices layers by.

The proxy sensitivity (onnxq/analysis/proxy.py) needs every weighted layer's H = E[x x^T], and so does the quantizer
with data: the same sums over the same model. Where the sensitivity data are the calibration data and only weights are
quantized, the quantizer's run is started first (:func:`onnxq.pipeline.start_run`: its pass over all the calibration
samples), the proxy prices the layers with that pass's H, and the run is finished at the widths chosen
(:func:`onnxq.pipeline.finish_run`). The proxy's own pass over its 64 samples was 7-8 s of the layout detector's
`--target-size` run, a sixth of it (tools/profile_mixed_precision.py). Its H are then sums over the 256 calibration
samples instead of 64: the same layers, better estimated. The pass also keeps the model's float outputs on its first
64 samples (`FirstOutputs`, onnxq/calibrate/collect.py): the proxy measures on those runs against them, without a float
run of its own (3.6 s of the layout detector's 33).

With other sensitivity data, or with activations (whose pass observes the sites the final plan chooses), the proxy
sums its own H as before and the quantizer runs after it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import onnx

from onnxq.analysis.mixed_precision import MixedPrecision, TargetSize, choose_bits
from onnxq.analysis.proxy import ProxySensitivity
from onnxq.analysis.sensitivity import SENSITIVITY_SAMPLES
from onnxq.calibrate.data import CalibrationData
from onnxq.config import QuantizeConfig
from onnxq.pipeline import CalibratedRun, QuantizationResult, finish_run, quantize_with_report, start_run

if TYPE_CHECKING:
    from distributed import Client


def shares_pass(config: QuantizeConfig, calibration: CalibrationData | None, sensitivity_data: CalibrationData | None) -> bool:
    """Whether the proxy can take its H from the quantizer's pass: the calibration data measured, weights only, with H."""
    return calibration is not None and sensitivity_data is None and config.activations is None and config.output_aware


def proxy_analysis(
    model: str | os.PathLike[str] | onnx.ModelProto, config: QuantizeConfig, calibration: CalibrationData | None,
    sensitivity_data: CalibrationData | None = None, samples: int = SENSITIVITY_SAMPLES, client: Client | None = None,
) -> tuple[ProxySensitivity, CalibratedRun | None]:
    """The proxy sensitivity on ``sensitivity_data`` (None: the calibration data), and the quantizer's run if it shares its pass.

    One of the two data must be given. Finish the run (None: quantize anew) with the widths chosen: :func:`finish`.
    """
    data = sensitivity_data if sensitivity_data is not None else calibration
    if data is None:
        raise ValueError("the proxy sensitivity needs data: calibration or sensitivity data")
    if not shares_pass(config, calibration, sensitivity_data):
        return ProxySensitivity(model, config, data, samples, client), None
    covered = config.calibration_samples >= samples  # else the pass stops short of the samples the proxy measures on
    run = start_run(model, config, calibration, client, keep_outputs=samples if covered else 0)
    hessians = run.calibrated.hessians if run.calibrated is not None else None
    return ProxySensitivity(model, config, data, samples, client, hessians=hessians, prepared=run.loaded, first=run.first), run


def finish(
    model: str | os.PathLike[str] | onnx.ModelProto, config: QuantizeConfig, calibration: CalibrationData | None,
    run: CalibratedRun | None, tensor_bits: Mapping[str, int], client: Client | None = None,
) -> QuantizationResult:
    """The quantized model at ``tensor_bits`` (with ``config``'s own): ``run`` finished, or a new run where there is none."""
    bits = {**config.tensor_bits, **tensor_bits}
    if run is not None:
        return finish_run(run, bits)
    return quantize_with_report(model, replace(config, tensor_bits=bits), calibration, client)


def quantize_mixed(
    model: str | os.PathLike[str] | onnx.ModelProto, config: QuantizeConfig, calibration: CalibrationData,
    target: TargetSize | None = None, max_drop: float | None = None, samples: int = SENSITIVITY_SAMPLES, client: Client | None = None,
) -> tuple[QuantizationResult, MixedPrecision]:
    """Quantize ``model`` with data at the widths the proxy sensitivity chooses within ``target`` / ``max_drop``."""
    analysis, run = proxy_analysis(model, config, calibration, None, samples, client)
    chosen = choose_bits(analysis, target, max_drop)
    del analysis  # its sessions, weights and priced codes, before the quantizer's weights (MiniLM's row: 811 -> 707 MB, one-off)
    return finish(model, config, calibration, run, chosen.tensor_bits, client), chosen
