"""Per-layer sensitivity: the model output's SQNR when only one weight tensor is quantized.

One onnxruntime session runs the float model with every planned weight made an overridable
input and every weighted node's output exposed. The float run is made once; each
measurement then feeds one (or several) fake-quantized weights -- the float values the
quantized model computes with -- and compares the outputs with the float ones. Dozens of
layers cost dozens of runs on a small batch, not dozens of quantized models.

Only weights are quantized here (activations stay float), so the numbers say how much each
layer's weight quantization alone hurts, whatever else the run does.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxq.calibrate.collect import FirstOutputs
from onnxq.calibrate.data import CalibrationData, calibration_batches
from onnxq.calibrate.samples import batch_size, input_specs, sample_axes
from onnxq.config import QuantizeConfig
from onnxq.errors import OnnxqError
from onnxq.model.external import materialize
from onnxq.model.graph import constant_initializers, float_outputs, to_array
from onnxq.model.load import LoadedModel
from onnxq.model.swap import SwappableWeights
from onnxq.native.session import session_options
from onnxq.pipeline import load_and_prepare, quantize_planned
from onnxq.plan.ops import OpTargets, op_choice
from onnxq.plan.weights import WeightPlan, plan_weights

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

#: Samples sensitivity is measured on unless told otherwise: enough to rank layers, fast on a CPU.
SENSITIVITY_SAMPLES = 64


@dataclass
class ErrorEnergy:
    """Running sums of signal and noise energy over batches, for an SQNR over all of them."""

    signal: float = 0.0
    noise: float = 0.0

    def add(self, reference: np.ndarray, approx: np.ndarray) -> None:
        """Add one batch of reference values and their approximation."""
        ref = np.asarray(reference, dtype=np.float64)
        self.signal += energy(ref)
        self.noise += energy(ref - np.asarray(approx, dtype=np.float64))

    @property
    def sqnr_db(self) -> float:
        """10 log10(signal / noise); inf when exact, -inf when the reference is all zero."""
        return energy_sqnr_db(self.signal, self.noise)


def energy(values: np.ndarray) -> float:
    """The sum of squares of ``values``, in float64."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.sum(values * values))


def energy_sqnr_db(signal: float, noise: float) -> float:
    """SQNR in dB from energies (inf when ``noise`` is 0, -inf when ``signal`` is)."""
    if noise <= 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


@dataclass(frozen=True)
class Measurement:
    """One probe run: the model outputs' error energy, and the SQNR of the asked nodes' outputs."""

    model: ErrorEnergy
    nodes: float

    @property
    def model_sqnr_db(self) -> float:
        """SQNR of the model outputs against the float model's."""
        return self.model.sqnr_db


@dataclass(frozen=True)
class LayerSensitivity:
    """How much quantizing one weight tensor alone (at ``bits``) changes its node's output and the model's.

    ``node_sqnr_db`` compares the outputs of the nodes reading the tensor with their float
    values; ``model_sqnr_db`` (the sensitivity: lower is more sensitive) does the same for the
    model outputs; ``noise`` is the model outputs' squared-error energy, which mixed precision adds up.
    """

    tensor: str
    nodes: tuple[str, ...]
    bits: int
    node_sqnr_db: float
    model_sqnr_db: float
    noise: float

    def report_values(self) -> dict[str, float]:
        """This layer's optional fields of the report (see ``QuantizationReport.with_layer_values``)."""
        return {"output_sqnr_db": self.node_sqnr_db, "sensitivity_db": self.model_sqnr_db}


class Probe:
    """The float model in one session with its weights overridable and (with ``nodes``) weighted nodes' outputs exposed.

    Only the model outputs of the float run are kept as the reference: a layer's node SQNR fetches the float values of
    its own outputs again when it is measured, since keeping every layer's outputs for every sample took gigabytes on
    a ResNet-50 (a one-off measurement).

    Whole-model runs (:meth:`run_constants`: many weights replaced at once, the proxy's few measured runs) and the
    float reference run in a session of their own whose weights are constants, so onnxruntime pre-packs them: fed as
    inputs, the layout detector's convolutions ran 1.6-2.1x slower a run (one-off, tools' layout case, 12 pages). The
    session with overridable weights is opened when a single layer is first measured (:meth:`run`).
    """

    def __init__(
        self, model: onnx.ModelProto, plans: Iterable[WeightPlan], batches: list[dict[str, np.ndarray]], label: str, nodes: bool = True,
        reference: list[dict[str, np.ndarray]] | None = None,
    ) -> None:
        """``reference``: the float model's outputs on ``batches``, computed already (the calibration pass's), else run here."""
        plans = list(plans)
        outputs = {n.name: next((o for o in n.output if o), "") for n in model.graph.node}  # a recurrent layer may leave Y unnamed
        # Readers inside control-flow bodies have no output a session can fetch: their node SQNR is not measured.
        self.node_outputs = {
            p.tensor: tuple(dict.fromkeys(outputs[u.node] for u in p.uses if not u.body_of and outputs[u.node])) if nodes else ()
            for p in plans
        }
        self.model_outputs = float_outputs(model.graph)
        if not self.model_outputs:
            raise OnnxqError(label, "sensitivity needs a float model output to compare, and this model has none")
        node_types = {name: p.dtype for p in plans for name in self.node_outputs[p.tensor]}  # a layer's output has its weight's type
        materialize(model)  # onnxruntime needs the weights in the session's model (whole-model runs serialize it)
        self._source = (model, plans, node_types)
        self._swappable = SwappableWeights(model, [p.tensor for p in plans])
        self.batches = batches  # the runs every measurement feeds
        self._session: ort.InferenceSession | None = None  # weights as inputs: opened by the first single-layer run
        self._keep_reference(reference if reference is not None else self._outputs(self._constant_session({})))

    def _model_bytes(self) -> bytes:
        """The probe model, serialized: the float model with its planned weights as inputs and the node outputs exposed."""
        probe = _probe_model(*self._source)
        materialize(probe)  # onnxruntime needs the weights in the session's model
        return probe.SerializeToString()

    def _open(self, model_bytes: bytes, threads: int | None = None) -> None:
        """The session with overridable weights, and (a probe reopened elsewhere) the float model outputs it compares with."""
        self._session = _cpu_session(model_bytes, threads)
        self._keep_reference(self._outputs(self._session))

    def _keep_reference(self, outputs: list[dict[str, np.ndarray]]) -> None:
        """Keep the float model outputs of every batch as the reference, and their energy as the signal."""
        self.reference = outputs
        self.signal = 0.0
        for reference in outputs:  # summed in the order a measurement sums it: the same float
            for name in self.model_outputs:
                self.signal += energy(reference[name])

    def _outputs(self, session: ort.InferenceSession) -> list[dict[str, np.ndarray]]:
        """The model outputs ``session`` gives for every batch."""
        return [dict(zip(self.model_outputs, session.run(self.model_outputs, batch), strict=True)) for batch in self.batches]

    def _constant_session(self, weights: Mapping[str, np.ndarray]) -> ort.InferenceSession:
        """A session of the float model with ``weights`` ({tensor: float values}) as its constants in place of its own."""
        return _cpu_session(self._swappable.serialized(weights))

    @property
    def session(self) -> ort.InferenceSession:
        """The session whose weights are inputs a run overrides (opened now if not yet)."""
        if self._session is None:
            self._session = _cpu_session(self._model_bytes())
        return self._session

    def portable(self) -> tuple[bytes, list[dict[str, np.ndarray]], list[str], dict[str, tuple[str, ...]]]:
        """What :meth:`reopen` needs to open the same probe elsewhere (on a Dask worker); serialized when asked, not kept."""
        return self._model_bytes(), self.batches, self.model_outputs, self.node_outputs

    @classmethod
    def reopen(cls, model_bytes: bytes, batches: list[dict[str, np.ndarray]], model_outputs: list[str],
               node_outputs: dict[str, tuple[str, ...]], threads: int | None = None) -> Probe:
        """The probe :meth:`portable` described, with its own session (and float reference run) in this process."""
        probe = cls.__new__(cls)
        probe.batches, probe.model_outputs, probe.node_outputs = batches, model_outputs, node_outputs
        probe._open(model_bytes, threads)
        return probe

    def run(self, weights: Mapping[str, np.ndarray], tensor: str | None = None) -> Measurement:
        """Run with ``weights`` ({tensor: float values}) in place of the float ones; node SQNR for ``tensor``'s readers."""
        node_names = list(self.node_outputs.get(tensor, ())) if tensor is not None else []
        extra = [n for n in node_names if n not in self.model_outputs]
        fetched = self.model_outputs + extra
        session = self.session
        model, nodes = ErrorEnergy(), ErrorEnergy()
        for batch, reference in zip(self.batches, self.reference, strict=True):
            values = dict(zip(fetched, session.run(fetched, {**batch, **weights}), strict=True))
            for name in self.model_outputs:
                model.add(reference[name], values[name])
            # The float values of this layer's outputs: fetched again rather than kept for every layer.
            floats = {**reference, **dict(zip(extra, session.run(extra, batch), strict=True))} if extra else reference
            for name in node_names:
                nodes.add(floats[name], values[name])
        return Measurement(model, nodes.sqnr_db if node_names else math.nan)

    def run_constants(self, weights: Mapping[str, np.ndarray]) -> Measurement:
        """The model outputs with ``weights`` in place of the float ones, in a session of its own holding them as constants.

        For a run that replaces many weights at once: building the session costs about as much as one run of the layout
        detector, and every run is then as fast as the float model's (see the class).
        """
        session = self._constant_session(weights)
        model = ErrorEnergy()
        for batch, reference in zip(self.batches, self.reference, strict=True):
            for name, value in zip(self.model_outputs, session.run(self.model_outputs, batch), strict=True):
                model.add(reference[name], value)
        return Measurement(model, math.nan)


def _cpu_session(model_bytes: bytes, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session of a float model's bytes (no onnxq ops: not parsed again to look for them)."""
    return ort.InferenceSession(model_bytes, session_options(threads), providers=["CPUExecutionProvider"])


def _probe_model(model: onnx.ModelProto, plans: list[WeightPlan], node_outputs: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` whose planned weights are also graph inputs (so a run can override them) and node outputs graph outputs."""
    probe = copy.deepcopy(model)
    graph = probe.graph
    inits = {t.name: t for t in graph.initializer}
    for plan in plans:
        tensor = inits[plan.tensor]
        graph.input.append(helper.make_tensor_value_info(plan.tensor, tensor.data_type, list(tensor.dims)))
    present = {o.name for o in graph.output}
    for name, dtype in node_outputs.items():
        if name not in present:
            graph.output.append(helper.make_tensor_value_info(name, dtype, None))
    probe.ir_version = max(probe.ir_version, 4)
    return probe


class SensitivityAnalysis:
    """A float model prepared and planned as the quantizer does it, its probe, and fake-quantized copies of its weights."""

    def __init__(
        self,
        model: str | os.PathLike[str] | onnx.ModelProto,
        config: QuantizeConfig,
        data: CalibrationData,
        samples: int = SENSITIVITY_SAMPLES,
        nodes: bool = True,
        client: Client | None = None,
        prepared: LoadedModel | None = None,
        first: FirstOutputs | None = None,
    ) -> None:
        """``nodes``: also measure each layer's own output SQNR (the report's column; it costs a float run per layer).

        With a Dask ``client``, batches of measurements (:meth:`measure`) run on its workers. ``prepared``: ``model``
        loaded and prepared already (by the quantizer's run, onnxq/analysis/mixed_run.py), used as it is, not loaded
        again: a second copy of MiniLM's 90 MB model beside the run's (which must not change while the analysis lives).
        ``first``: that run's first samples and the float outputs its pass gave on them: the runs measured on, and their
        reference (no float run here), in place of ``samples`` samples of ``data``.
        """
        loaded = prepared if prepared is not None else load_and_prepare(model)  # the run's first stages: the layers quantize plans
        self.client = client
        self.label = loaded.label
        self.model = loaded.model
        self.config = config
        self.plans, _ = plan_weights(self.model.graph, config)
        if not self.plans:
            raise OnnxqError(self.label, "no quantizable weights to measure the sensitivity of")
        consts = constant_initializers(self.model.graph)
        self.weights = {p.tensor: to_array(consts[p.tensor]) for p in self.plans}
        self._targets = OpTargets.of(self.model.graph)
        specs = input_specs(self.model)
        batches = first.runs if first is not None else list(calibration_batches(data, specs, samples))
        self.samples = sum(batch_size(b, sample_axes(specs)) for b in batches)
        self.probe = Probe(self.model, self.plans, batches, self.label, nodes, first.outputs if first is not None else None)
        self._dequantized: dict[tuple[str, int, bool], np.ndarray] = {}
        self._layers: dict[tuple[str, int], LayerSensitivity] = {}
        self._combined: dict[frozenset[tuple[str, int]], Measurement] = {}

    def plan(self, tensor: str) -> WeightPlan:
        """The plan of one weight tensor."""
        return next(p for p in self.plans if p.tensor == tensor)

    def dequantized(self, tensor: str, bits: int, with_hessian: bool = True, refined: bool = True) -> np.ndarray:
        """The float values the quantized model computes with for ``tensor`` at ``bits`` (cached).

        ``with_hessian`` False: the codes chosen for the weight's own error, even where the analysis has an H.
        ``refined`` False: with H, GPTQ's codes without the coordinate-descent refinement (onnxq/numerics/output_error.py).
        """
        key = (tensor, bits, with_hessian, refined)
        if key not in self._dequantized:
            plan = dataclasses.replace(self.plan(tensor), bits=bits)
            weight = self.weights[tensor]
            if not np.isfinite(weight).all():
                raise OnnxqError(self.label, f"weight {tensor} has NaN or infinite values (--exclude {' '.join(plan.nodes)} leaves it float)")
            hessian = self.hessian(tensor) if with_hessian else None
            q = quantize_planned(weight, plan, op_choice(plan, self._targets, self.config).op_type, self.config, False, hessian,
                                 None if refined else 0)
            self._dequantized[key] = q.dequantize().astype(weight.dtype)  # a session input of the weight's own type
        return self._dequantized[key]

    def hessian(self, tensor: str) -> np.ndarray | None:
        """The second moments the weights are quantized with: none here, the weight-error codes (a subclass may have them)."""
        return None

    def layer(self, tensor: str, bits: int | None = None) -> LayerSensitivity:
        """Sensitivity of ``tensor`` quantized alone at ``bits`` (default: its planned bits)."""
        plan = self.plan(tensor)
        bits = plan.bits if bits is None else bits
        key = (tensor, bits)
        if key not in self._layers:
            m = self.probe.run({tensor: self.dequantized(tensor, bits)}, tensor)
            self._layers[key] = LayerSensitivity(tensor, plan.nodes, bits, m.nodes, m.model_sqnr_db, m.model.noise)
            logger.debug("%s at %d bits: node SQNR %.1f dB, model SQNR %.1f dB", tensor, bits, m.nodes, m.model_sqnr_db)
        return self._layers[key]

    def measure(self, keys: Iterable[tuple[str, int]]) -> None:
        """Measure many (tensor, bits) at once, ahead of :meth:`layer`: on the client's workers, one probe run each.

        The weights are quantized here; each worker opens the probe once and runs the probes it is given. Without a
        client (or with one measurement to make) they run here, one after another.
        """
        missing = [key for key in dict.fromkeys(keys) if key not in self._layers]
        if self.client is None or len(missing) < 2:
            for tensor, bits in missing:
                self.layer(tensor, bits)
            return
        from onnxq.distribute.probes import measure_on

        weights = [{tensor: self.dequantized(tensor, bits)} for tensor, bits in missing]
        for (tensor, bits), m in zip(missing, measure_on(self.client, self.probe, weights, [t for t, _ in missing]), strict=True):
            self._layers[(tensor, bits)] = LayerSensitivity(tensor, self.plan(tensor).nodes, bits, m.nodes, m.model_sqnr_db, m.model.noise)

    def layers(self, bits: Mapping[str, int] | None = None) -> list[LayerSensitivity]:
        """Every planned tensor's sensitivity, at ``bits[tensor]`` where given, else its planned bits."""
        bits = bits or {}
        keys = [(p.tensor, bits.get(p.tensor, p.bits)) for p in self.plans]
        self.measure(keys)
        return [self.layer(tensor, b) for tensor, b in keys]

    @property
    def signal(self) -> float:
        """The energy of the float model outputs on the sensitivity data: what each noise energy is measured against."""
        return self.probe.signal

    def combined(self, bits: Mapping[str, int]) -> Measurement:
        """The model outputs with every tensor in ``bits`` quantized at once (measured once per set of widths).

        --max-drop's last step is the chosen mix: its measurement is kept, not made again.
        """
        key = frozenset(bits.items())
        if key not in self._combined:
            self._combined[key] = self._run_combined(bits)
        return self._combined[key]

    def _run_combined(self, bits: Mapping[str, int]) -> Measurement:
        """One run with every tensor in ``bits`` quantized, in a session holding them as constants."""
        return self.probe.run_constants({t: self.dequantized(t, b) for t, b in bits.items()})

    def fake_quantized(self, bits: Mapping[str, int]) -> onnx.ModelProto:
        """The prepared float model with the tensors in ``bits`` replaced by their dequantized values."""
        model = copy.deepcopy(self.model)
        for i, tensor in enumerate(model.graph.initializer):
            if tensor.name in bits:
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(self.dequantized(tensor.name, bits[tensor.name]), tensor.name))
        return model


def measure_sensitivity(
    model: str | os.PathLike[str] | onnx.ModelProto,
    config: QuantizeConfig,
    data: CalibrationData,
    bits: Mapping[str, int] | None = None,
    samples: int = SENSITIVITY_SAMPLES,
) -> list[LayerSensitivity]:
    """Sensitivity of every weight tensor ``config`` quantizes, each quantized alone, on ``samples`` samples of ``data``."""
    return SensitivityAnalysis(model, config, data, samples).layers(bits)


def most_sensitive(layers: Iterable[LayerSensitivity]) -> LayerSensitivity | None:
    """The layer whose quantization alone leaves the lowest model-output SQNR."""
    return min(layers, key=lambda s: s.model_sqnr_db, default=None)
