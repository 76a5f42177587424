"""Sensitivity predicted from each layer's own output error, instead of a whole-model run per layer and width.

A weight quantized to W' changes its layer's output by (W - W') x, whose energy relative to the output's own is
r = tr(dW H dW^T) / tr(W H W^T), with H = E[x x^T] over the layer's inputs (onnxq/calibrate/moments.py). One pass of
the float model over the sensitivity data gives every H; r then costs no model run at all, for every layer and
width. The model-output noise a layer causes is taken as c r, with one factor c for the model: a single measured run
with every layer at its planned width fixes c (its noise is the sum of the layers' noises, the same additivity the
greedy choice of mixed precision assumes). Layers without an H (a GRU's R, a grouped ConvTranspose, other
Einsums) and readers inside If bodies are measured as before, one run each, the latter with the codes their H
(summed through the branch the data take, as the quantizer does) gives. Layers the quantizer rounds without H (8-bit
depthwise convolutions) get none here either: they are priced by their weight's relative error, H taken as I. The
weights are quantized with their H, as the quantizer then writes them with data (the wider rungs a layer may be raised
to: see priced).

The analysis is then one pass of the model, its float run and one measured run (--max-drop adds one per step it
scores), whatever the number of layers and widths (the quantization of every layer at every width with its H remains:
BENCHMARKS.md, tools/eval_real_models.py; where the time goes: tools/profile_mixed_precision.py). What it
gives up is each layer's own path to the output: a layer whose error the rest of the model amplifies more than
average is predicted too gentle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxq.analysis.sensitivity import SENSITIVITY_SAMPLES, LayerSensitivity, Measurement, SensitivityAnalysis, energy_sqnr_db
from onnxq.calibrate.branches import body_readers, branch_view, moments_pass, needs_moments
from onnxq.calibrate.collect import FirstOutputs, collect
from onnxq.calibrate.data import CalibrationData
from onnxq.calibrate.moments import Hessians
from onnxq.config import QuantizeConfig
from onnxq.model.load import LoadedModel
from onnxq.numerics.output_error import grouped_output_error
from onnxq.numerics.threads import blas_threads
from onnxq.numerics.weights import to_rows

if TYPE_CHECKING:
    from distributed import Client


class ProxySensitivity(SensitivityAnalysis):
    """:class:`SensitivityAnalysis` whose per-layer numbers come from the layers' H-weighted errors (see the module)."""

    def __init__(
        self, model: str | os.PathLike[str] | onnx.ModelProto, config: QuantizeConfig, data: CalibrationData, samples: int = SENSITIVITY_SAMPLES,
        client: Client | None = None, hessians: Hessians | None = None, prepared: LoadedModel | None = None,
        first: FirstOutputs | None = None,
    ) -> None:
        """With a Dask ``client`` the pass that sums the layers' H runs on its workers (and the layers measured, too).

        ``hessians``: the layers' H summed already, by the quantizer's calibration pass over the same data
        (onnxq/analysis/mixed_run.py): then this makes no pass of its own. ``prepared``, ``first``: as
        :class:`SensitivityAnalysis`.
        """
        super().__init__(model, config, data, samples, nodes=False, client=client, prepared=prepared, first=first)
        self.without_moments = frozenset(p.tensor for p in self.plans if not needs_moments(p))
        self.hessians = hessians if hessians is not None else self._moments(client)
        self.in_bodies = frozenset(p.tensor for p in self.plans if any(u.body_of for u in p.uses))
        self.factor = self._fit_factor()

    def _moments(self, client: Client | None) -> Hessians:
        """Every layer's H from one pass over the sensitivity data; inside If bodies through the branch the data take.

        The layers inside bodies are measured by runs all the same (:meth:`predicted`), but with the codes their H gives,
        as the quantizer writes them: priced by their data-free codes instead, Silero VAD's encoder layers looked the
        most sensitive (model SQNR 20-23 dB each, alone) where their written codes leave 29-31 dB, and its first encoder
        layer, the one that matters (17.6 dB alone), was raised last (one-off, streamed clips, 2026-12-05).
        """
        plans = [p for p in self.plans if p.tensor not in self.without_moments]
        inside = body_readers(plans)
        view = branch_view(self.model, inside, self.probe.batches) if inside else None
        model, collector = moments_pass(self.model, plans, self.samples, view)
        collect(model, [], self.probe.batches, moments=collector, client=client)
        return collector.hessians()

    def predicted(self, tensor: str) -> bool:
        """Whether ``tensor``'s sensitivity is predicted (else measured by a run): an H, or none needed; not inside a body.

        The layers the quantizer rounds without H (:func:`needs_moments`: 8-bit depthwise) are predicted from their
        weight error alone (:meth:`relative_error`): they cannot be raised, and their H was most of the pass's time on
        depthwise models.

        The proxy follows no path through control flow to the output, so a body's layers are measured (Silero VAD's
        then-branch layers predicted from their H chose worse: 98.78 against 99.46 % of decisions at 0.2x).
        """
        return (tensor in self.hessians or tensor in self.without_moments) and tensor not in self.in_bodies

    def hessian(self, tensor: str) -> np.ndarray | None:
        """The second moments the weights are quantized with (as the quantizer does with data), unless output-aware is off."""
        return self.hessians.get(tensor) if self.config.output_aware else None

    def relative_error(self, tensor: str, bits: int) -> float:
        """The r of ``tensor`` at ``bits``: its layer's output error energy over the output's own.

        Without an H (a layer the quantizer rounds for its own error) the weight's relative error, H taken as I.
        """
        h = self.hessians.get(tensor)
        axis = self.plan(tensor).channel_axis or 0
        rows = to_rows(self.weights[tensor], axis).astype(np.float64)
        delta = rows - to_rows(self.priced(tensor, bits), axis).astype(np.float64)
        if h is None:
            signal = float(np.sum(rows**2))
            return float(np.sum(delta**2)) / signal if signal > 0 else 0.0
        with blas_threads(h.shape[-1]):  # (the quantizer's rule: one thread unless the layer is wide)
            signal = grouped_output_error(rows, h)  # the output's own energy: the "error" of the weight against zero
            return grouped_output_error(delta, h) / signal if signal > 0 else 0.0

    def priced(self, tensor: str, bits: int) -> np.ndarray:
        """The weights at ``bits`` as the proxy prices them: with H up to the planned width, wider ones by weight error.

        The wider rungs (those a layer may be raised to) are quantized for their own error, without the search and
        rounding by H. A raised layer's error is a small part of its planned one (8 against 4 bits: about 1/256 of the
        energy), so its exact value barely moves a choice, and the H-aware codes at every wider rung were a third of
        MiniLM's mixed-precision time (one-off profile, 2026-12-05). The planned width is priced by GPTQ's codes without
        the coordinate-descent refinement, which lowers every layer's error by a few per cent (7 % at the median) and
        cost MiniLM's --target-size 0.2x 5.5 s (42.9 against 37.4 s, the same choice). The layers are then quantized
        with their H and refined as always.
        """
        return self.dequantized(tensor, bits, with_hessian=bits <= self.plan(tensor).bits, refined=False)

    def _fit_factor(self) -> float:
        """c, from one run with every planned layer at its planned width."""
        planned = {p.tensor: p.bits for p in self.plans}
        measured = self.combined(planned).model
        self.measure(planned.items())
        unexplained = measured.noise - sum(self.layer(t).noise for t in planned if not self.predicted(t))
        predicted = sum(self.relative_error(t, b) for t, b in planned.items() if self.predicted(t))
        return max(unexplained, 0.0) / predicted if predicted > 0 else 0.0

    def _run_combined(self, bits: Mapping[str, int]) -> Measurement:
        """One run of the model with the tensors in ``bits`` at those widths, each priced as :meth:`priced` prices it.

        So the factor's run, the --max-drop scores and the chosen mix's measured SQNR all see the codes the errors are
        predicted for: GPTQ's at the planned width, weight-error codes wider. The written model's refined and H-aware
        codes leave a little less error than they, so the SQNR printed for the mix is a floor. (Refined codes computed
        here besides the priced ones took MiniLM's --target-size 0.2x from 42.9 to 55.9 s.)
        """
        return self.probe.run_constants({t: self.priced(t, b) for t, b in bits.items()})

    def measure(self, keys: Iterable[tuple[str, int]]) -> None:
        """Measure the layers without an H among ``keys`` (the others are predicted when asked)."""
        super().measure([(tensor, bits) for tensor, bits in keys if not self.predicted(tensor)])

    def layer(self, tensor: str, bits: int | None = None) -> LayerSensitivity:
        """Predicted sensitivity of ``tensor`` alone at ``bits``; measured for layers without an H."""
        plan = self.plan(tensor)
        bits = plan.bits if bits is None else bits
        if not self.predicted(tensor):
            return super().layer(tensor, bits)
        key = (tensor, bits)
        if key not in self._layers:
            r = self.relative_error(tensor, bits)
            noise = self.factor * r
            node_db = -10 * math.log10(r) if r > 0 else math.inf
            self._layers[key] = LayerSensitivity(tensor, plan.nodes, bits, node_db, energy_sqnr_db(self.signal, noise), noise)
        return self._layers[key]
