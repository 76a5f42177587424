"""The quantization run as named stages: load and prepare, plan, calibrate, quantize weights, correct biases, rewrite, finish.

:func:`quantize_with_report` is the whole run; each stage below is a function whose inputs and outputs say what it
needs and what it hands on (:class:`Plan`, :class:`~onnxq.calibrate.result.Calibration`, :class:`QuantizedWeights`).
The model itself (:class:`~onnxq.model.load.LoadedModel`) goes through every stage and is changed in place by three:
preparation, the plan's opset conversion, and the rewrite. Sensitivity and mixed precision (onnxq/analysis/) reuse the
first stages and :func:`quantize_planned`.

Where the order matters, the stage that needs it says so; in short: the plan reads the graph's declared shapes before
the rewrite's activation pairs hide them; calibration and bias correction run the float model, so they come before the
rewrite; onnxq's ops take their input's quantization from the activation pairs, so those are written first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxq.calibrate.activations import calibrate as calibrate_sites
from onnxq.calibrate.bias_analytic import correct_biases as correct_biases_analytic
from onnxq.calibrate.bias_measured import empirical_correction
from onnxq.calibrate.branches import BRANCH_SAMPLES, BranchView, body_readers, branch_view, moments_pass, needs_moments
from onnxq.calibrate.collect import FirstOutputs, collect
from onnxq.calibrate.data import CalibrationData, calibration_batches
from onnxq.calibrate.equalize import equalize
from onnxq.calibrate.mean_shift import ShiftSite, centered, fold_shifts, mean_shift, shift_sites
from onnxq.calibrate.placement import activation_sites, sites_integer_kernels_read
from onnxq.calibrate.result import ActivationQuant, Calibration
from onnxq.calibrate.samples import SampleAxes, input_specs, peek, sample_axes
from onnxq.config import BiasCorrection, CalibrationMethod, Granularity, QuantizeConfig, RangeMethod, SqrtMode
from onnxq.errors import OnnxqError
from onnxq.model.external import materialize
from onnxq.model.graph import all_graphs, constant_initializers, drop_inferred_shapes, float_outputs, to_array
from onnxq.model.load import LoadedModel, load
from onnxq.model.opset import FLOAT16_SCALE_OPSET, INT4_OPSET, MIN_OPSET, default_opset, ensure_int4_ir, ensure_opset
from onnxq.model.prepare import prepare
from onnxq.model.skeleton import compact
from onnxq.native.domain import INT_CONV, LOOKUP_OP, MATMUL_INTEGER_TO_FLOAT, MATMUL_NBITS, POST_CONV
from onnxq.numerics.memory import release_free_memory
from onnxq.numerics.threads import blas_threads
from onnxq.numerics.uniform import quantized_bytes, storage_bits
from onnxq.numerics.weights import QuantizedTensor, blocked, quantize_for_output, quantize_post_weight, quantize_weight, to_rows
from onnxq.plan.handlers import CONTRIB_TABLES, RECURRENT_WEIGHTS
from onnxq.plan.ops import OpChoice, OpTargets, op_choice
from onnxq.plan.weights import REDUCED_BITS, Skipped, WeightPlan, nothing_to_quantize, plan_weights, reduce_weight_range
from onnxq.rewrite.activations import insert_activation_qdq
from onnxq.rewrite.between import fold_pads, pool_codes
from onnxq.rewrite.biases import quantize_biases
from onnxq.rewrite.chains import ChainReport, link_chains
from onnxq.rewrite.fusions import take_input_quantization
from onnxq.rewrite.integer_matmuls import write_integer_matmuls
from onnxq.rewrite.matmul_nbits import replace_matmuls
from onnxq.rewrite.ops import declare_domain, replace_convs
from onnxq.rewrite.qdq import replace_weights
from onnxq.rewrite.tables import replace_tables

if TYPE_CHECKING:
    from distributed import Client

    from onnxq.calibrate.moments import PackedSums

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike[str] | onnx.ModelProto

#: Calibration samples the equalization's channel statistics come from.
EQUALIZE_SAMPLES = 64


@dataclass(frozen=True)
class LayerResult:
    """What happened to one weight tensor."""

    tensor: str
    nodes: tuple[str, ...]
    op_types: tuple[str, ...]
    bits: int
    storage_bits: int
    sqrt: bool
    op: str
    per_channel: bool
    alpha_median: float
    sqnr_db: float
    float_bytes: int
    quantized_bytes: int
    alpha: tuple[float, ...] = ()  # the range factor of each row (output channel, or the one of the tensor)
    qdq_reason: str = ""  # why a layer stays QDQ although the format asked for onnxq's ops
    weights: int = 0  # how many weight values the tensor holds
    bits_rule: str = ""  # the rule that gave other bits than -b (WeightPlan.bits_rule)
    block_size: int | None = None  # a scale per channel and block of this many inputs (--block-size)


@dataclass
class QuantizationResult:
    """The quantized model and an account of every weighted layer."""

    model: onnx.ModelProto
    layers: list[LayerResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    source: LoadedModel | None = None
    activations: list[ActivationQuant] = field(default_factory=list)
    calibration: CalibrationMethod | None = None
    requested_bits: int | None = None  # -b, the width the rules start from
    first_last_bits: int | None = None
    chains: ChainReport | None = None  # with calibrated onnxq ops: which outputs went uint8 (onnxq/rewrite/chains.py)
    float_activations: list[str] = field(default_factory=list)  # in an op format: activations no onnxq op reads, left float


@dataclass(frozen=True)
class Plan:
    """What the plan stage hands on: a plan per weight tensor, the weighted nodes left float, and the op each weight runs as.

    ``ranks`` holds the rank of each node's first input, read from the graph's declared shapes at plan time: the
    rewrite needs them for MatMuls run as onnxq's ops, after activation pairs have hidden those shapes.
    """

    weights: list[WeightPlan]
    skipped: list[Skipped]
    ops: dict[str, OpChoice]
    ranks: dict[str, int]

    @property
    def integer_op_nodes(self) -> set[str]:
        """Nodes that become IntConv/PostConv (they quantize their input themselves)."""
        return {use.node for plan in self.weights if self.ops[plan.tensor].integer for use in plan.uses}


@dataclass
class QuantizedWeights:
    """Every planned weight's codes, grouped by how the rewrite writes them, and the account of each layer."""

    qdq: dict[str, QuantizedTensor] = field(default_factory=dict)  # codes + DequantizeLinear
    ops: dict[str, tuple[QuantizedTensor, str]] = field(default_factory=dict)  # IntConv/PostConv, with the op
    tables: dict[str, QuantizedTensor] = field(default_factory=dict)  # embedding tables only looked up (Gather)
    layers: list[LayerResult] = field(default_factory=list)
    mean_shifts: dict[str, tuple[ShiftSite, np.ndarray]] = field(default_factory=dict)  # weights quantized for their inputs' covariance

    def codes(self, tensor: str) -> QuantizedTensor:
        """The codes of one weight, whichever way it is written."""
        return self.qdq.get(tensor) or self.tables.get(tensor) or self.ops[tensor][0]


def quantize(
    model: ModelSource, config: QuantizeConfig | None = None, calibration: CalibrationData | None = None, client: Client | None = None
) -> onnx.ModelProto:
    """Quantize ``model`` (a path or a ModelProto, which is not modified) and return the new model.

    Weights always, chosen for their layers' outputs when ``calibration`` is given (``config.output_aware``);
    activations too when ``config.activations`` is set, which needs ``calibration``: an iterable of {input name: array} dicts or an onnxruntime
    CalibrationDataReader (each item one run, fed as it is), or the path of an .npy/.npz
    file or a folder of images (onnxq/calibrate/data.py says how files are laid out).
    With a ``dask.distributed`` ``client`` the calibration pass runs on its workers (onnxq/distribute/): the same model.
    """
    return quantize_with_report(model, config, calibration, client).model


def quantize_with_report(
    model: ModelSource, config: QuantizeConfig | None = None, calibration: CalibrationData | None = None, client: Client | None = None
) -> QuantizationResult:
    """Like :func:`quantize`, but also say per layer what was done: the run, stage by stage."""
    return finish_run(start_run(model, config, calibration, client))


@dataclass
class CalibratedRun:
    """A run's first stages done: the prepared model, its plan and what the calibration pass found (None: no data).

    Mixed precision prices the layers with the pass's H (onnxq/analysis/mixed_run.py) before :func:`finish_run` quantizes
    them at the widths it chose: one pass over the data for both.
    """

    loaded: LoadedModel
    plan: Plan
    config: QuantizeConfig
    calibration: CalibrationData | None
    calibrated: Calibration | None
    first: FirstOutputs | None = None  # the model's float outputs on the first samples, where kept


def start_run(
    model: ModelSource, config: QuantizeConfig | None = None, calibration: CalibrationData | None = None, client: Client | None = None,
    keep_outputs: int = 0,
) -> CalibratedRun:
    """Load and prepare, plan, calibrate; ``keep_outputs``: keep the model's float outputs on that many first samples.

    They are kept by a weight-only pass run here on the model itself (:class:`FirstOutputs`); else ``first`` is None.
    """
    config = _with_rounding(config or QuantizeConfig(), calibration)
    loaded = load_and_prepare(model)
    plan = plan_quantization(loaded, config, calibration)
    first = FirstOutputs(float_outputs(loaded.model.graph), keep_outputs) if keep_outputs > 0 else None
    calibrated = calibrate(loaded, plan, config, calibration, client, first)
    return CalibratedRun(loaded, plan, config, calibration, calibrated, first if first is not None and first.kept else None)


def finish_run(run: CalibratedRun, tensor_bits: Mapping[str, int] | None = None) -> QuantizationResult:
    """Quantize the weights, correct the biases, rewrite, finish: once per run (the weights take their H as they go).

    ``tensor_bits`` (per weight tensor, as ``QuantizeConfig.tensor_bits``): plan again with these widths first, on the
    same calibration, weights only (a pass with activations observed sites the plan chose). A weight the new plan
    quantizes without H (:func:`needs_moments`) lets go of the one the pass summed, as a run planned so would have none.
    """
    config, plan = run.config, run.plan
    if tensor_bits is not None and dict(tensor_bits) != dict(config.tensor_bits):
        if config.activations is not None:
            raise ValueError("a run with activations cannot be planned again with other widths")
        config = replace(config, tensor_bits=dict(tensor_bits))
        plan = plan_quantization(run.loaded, config, run.calibration)
        if run.calibrated is not None:
            for weight_plan in plan.weights:
                if not needs_moments(weight_plan):
                    run.calibrated.hessians.pop_sums(weight_plan.tensor)
    weights = quantize_weights(run.loaded, plan, config, run.calibrated)
    correct_biases(run.loaded, plan, weights, run.calibrated, config)
    chains = rewrite(run.loaded, plan, weights, run.calibrated)
    return finish(run.loaded, plan, weights, run.calibrated, config, chains)


def _with_rounding(config: QuantizeConfig, calibration: CalibrationData | None) -> QuantizeConfig:
    """``config`` with balanced rounding off where calibration data are given.

    A run with data rounds the layers it has no statistics for to nearest, as before balancing existed. Balancing is for
    codes chosen blind; with data, the layers left without second moments are the very wide ones, whose inputs need not
    share a mean (CREPE's second convolution reads a BatchNorm's output: balancing its codes took the
    model's output SQNR from 28.9 to 28.4 dB, a one-off run).
    """
    return replace(config, balanced_rounding=False) if calibration is not None else config


def load_and_prepare(model: ModelSource) -> LoadedModel:
    """Load and check the model, bring it to opset 13 at least, and run the preparation passes (onnxq/model/prepare.py)."""
    loaded = load(model)
    loaded.declared = frozenset(info.name for graph in all_graphs(loaded.model.graph) for info in graph.value_info)
    ensure_opset(loaded, MIN_OPSET)
    loaded.model = prepare(loaded.model, fresh=True)
    return loaded


def plan_quantization(loaded: LoadedModel, config: QuantizeConfig, calibration: CalibrationData | None) -> Plan:
    """Plan every weight (bits, axis, op) and convert the model to the opset the planned formats need.

    Converting here, before calibration, lets calibration run the model that will be rewritten. Weight-only models keep
    their opset even at 4 bits (their codes are decoded at load by opset-13 ops: onnxq/rewrite/qdq.py); int4 tensor
    types, and so opset 21, come with quantized activations. The op choice reads
    the graph's declared shapes, which the rewrite's activation pairs later hide, so it is made now, once, for all
    later stages.
    """
    plans, skipped = plan_weights(loaded.model.graph, config)
    if not plans:
        raise OnnxqError(loaded.label, nothing_to_quantize(skipped, loaded.model.graph))
    if config.activations is not None and calibration is None:
        raise OnnxqError(loaded.label, "quantizing activations needs calibration data")
    if config.activations is not None and not any(p.is_float32 for p in plans):
        raise OnnxqError(loaded.label, "activation quantization covers float32 layers and this model's are float16; "
                         "leave out --calibration to quantize its weights only")
    if any(not p.is_float32 for p in plans):
        ensure_opset(loaded, FLOAT16_SCALE_OPSET)
    if config.activations is not None and (any(storage_bits(p.bits) == 4 for p in plans) or config.activations.bits == 4):
        ensure_opset(loaded, INT4_OPSET)  # int4 DequantizeLinear (or its Cast to int8) and uint4 activations
    targets = OpTargets.of(loaded.model.graph)
    ops = {p.tensor: op_choice(p, targets, config) for p in plans}
    plans = reduce_weight_range(plans, {tensor for tensor, op in ops.items() if op.integer}, config)
    return Plan(plans, skipped, ops, targets.ranks)


def calibrate(
    loaded: LoadedModel, plan: Plan, config: QuantizeConfig, calibration: CalibrationData | None, client: Client | None = None,
    first: FirstOutputs | None = None,
) -> Calibration | None:
    """What one run of the (prepared, still float) model over the data shows; None without data.

    With activations: each site's quantization. First, on the first samples, layer inputs with outlier channels are
    equalized against their weights (in place: the float model computes the same), so the weights are quantized as
    equalized in the next stage. Output-aware weights: the second moments of the layers' inputs (after equalization,
    as the layers then see them; inside an If, through the branch the data take), gathered in the same run. With a
    Dask ``client`` that run is spread over its workers. ``first`` keeps the model's outputs on the first samples
    (weights only, the model itself run: not through a view of its If branches, whose outputs may differ).
    """
    if calibration is None or (config.activations is None and not config.output_aware):
        return None
    specs = input_specs(loaded.model)
    batches = calibration_batches(calibration, specs, config.calibration_samples)
    if config.activations is not None and config.activations.equalizing:  # before the sites: the layers then read the equalized tensor
        head, batches = peek(batches, sample_axes(specs), EQUALIZE_SAMPLES)
        equalize(loaded.model, plan.weights, plan.ops, head, config.activations.bits)
    model, moments = loaded.model, None
    if config.output_aware:
        aware = [p for p in plan.weights if needs_moments(p)]
        view, batches = _calibration_model(loaded.model, aware, batches, sample_axes(specs))
        model, moments = moments_pass(loaded.model, aware, config.calibration_samples, view)
    if config.activations is None:
        first = first if model is loaded.model else None
        collect(model, [], batches, total=config.calibration_samples, moments=moments, client=client, first=first)
        calibrated = Calibration({}, {}, [], moments.hessians(), moments.means()) if moments is not None else Calibration({}, {}, [])
    else:
        sites, left_float = sites_integer_kernels_read(activation_sites(loaded.model.graph, plan.weights, plan.integer_op_nodes, config), config)
        calibrated = replace(calibrate_sites(model, sites, batches, config.activations, moments, client), left_float=left_float)
    if moments is not None and moments.unguarded:
        logger.info("calibration: some runs took another branch of an If than the first ones; %d weights inside it are rounded "
                    "for their own error", len(moments.unguarded))
    return calibrated


def _calibration_model(
    model: onnx.ModelProto, aware: list[WeightPlan], batches: Iterator[dict[str, np.ndarray]], axes: SampleAxes
) -> tuple[BranchView | None, Iterator[dict[str, np.ndarray]]]:
    """The view the calibration pass runs instead of the model, if any, and the batches (their head looked at once).

    Where output-aware layers sit inside If bodies: a copy with the branches the first samples take inlined, so that
    their inputs can be fetched (onnxq/calibrate/branches.py); else None (the model itself).
    """
    inside = body_readers(aware)
    if not inside:
        return None, batches
    head, batches = peek(batches, axes, BRANCH_SAMPLES)
    return branch_view(model, inside, head), batches


def quantize_weights(loaded: LoadedModel, plan: Plan, config: QuantizeConfig, calibrated: Calibration | None) -> QuantizedWeights:
    """Codes for every planned weight in the format its op needs (onnxq/numerics/), and an account of each layer.

    Each weight's second moments leave ``calibrated`` as it is quantized, made a float64 matrix from their packed float32
    sums only then (onnxq/calibrate/moments.py: the wide layers' H are most of the peak memory, CREPE's 1024-2048-wide
    ones 60 MB as float64 matrices, 15 MB packed), so the peak holds one full H and the packed ones not yet used. A weight's
    packed sums stay until it is done: GPTQ's factor is made in its H's memory, and H written back from them after.
    """
    consts = constant_initializers(loaded.model.graph)
    integer_inputs = calibrated is not None and bool(calibrated.quants)
    folding = calibrated is not None and config.activations is None and config.fold_mean_shift
    sites = shift_sites(loaded.model.graph, plan.weights) if folding else {}
    out = QuantizedWeights()
    for weight_plan in plan.weights:
        weight = to_array(consts[weight_plan.tensor])
        if not np.isfinite(weight).all():
            names = " ".join(weight_plan.nodes)
            raise OnnxqError(loaded.label, f"weight {weight_plan.tensor} has NaN or infinite values (--exclude {names} leaves it float)")
        choice = plan.ops[weight_plan.tensor]
        sums = calibrated.hessians.pop_sums(weight_plan.tensor) if calibrated is not None else None  # freed once used
        mean = calibrated.input_means.get(weight_plan.tensor) if calibrated is not None and weight_plan.tensor in sites else None
        if sums is None or weight_plan.channel_axis is None:
            mean = None
        make = None if sums is None else _hessian_maker(sums, mean)
        if make is not None:
            release_free_memory()  # the heap the pass and the last weight left, before H comes on top (onnxq/numerics/memory.py)
        q = quantize_planned(weight, weight_plan, choice.op_type, config, integer_inputs, None if make is None else make(None), refill=make)
        if mean is not None and q.axis == weight_plan.channel_axis:
            delta = to_rows(q.dequantize(), q.axis).astype(np.float64) - to_rows(weight, q.axis)
            out.mean_shifts[weight_plan.tensor] = (sites[weight_plan.tensor], mean_shift(delta, mean))
        if choice.op_type == LOOKUP_OP:
            out.tables[weight_plan.tensor] = q
        elif choice.op_type is None:
            out.qdq[weight_plan.tensor] = q
        else:
            out.ops[weight_plan.tensor] = (q, choice.op_type)
        out.layers.append(_layer_result(weight_plan, q, weight, choice))
        logger.debug("%s: %d bits, sqrt=%s, op %s, SQNR %.1f dB", weight_plan.tensor, weight_plan.bits, q.sqrt, choice.op_type, q.sqnr_db)
    return out


def _hessian_maker(sums: PackedSums, mean: np.ndarray | None) -> Callable[[np.ndarray | None], np.ndarray]:
    """What writes a weight's H from its packed ``sums`` into an array (None: a new one), the same numbers each time.

    With ``mean`` (its input's E[x], the mean output shift going into the bias) H is centred (onnxq/calibrate/mean_shift.py).
    """
    def make(out: np.ndarray | None) -> np.ndarray:
        hessian = sums.fill(out)
        return hessian if mean is None else centered(hessian, mean, in_place=True)

    return make


def quantize_planned(
    weight: np.ndarray, plan: WeightPlan, op_type: str | None, config: QuantizeConfig, integer_inputs: bool, hessian: np.ndarray | None = None,
    sweeps: int | None = None, refill: Callable[[np.ndarray], object] | None = None,
) -> QuantizedTensor:
    """Codes for one weight in the format its op needs: POST (PostConv), plain uniform (IntConv), or uniform/sqrt (QDQ, lookups).

    With quantized activations, weights stay linear (no sqrt, unless --sqrt on) so onnxruntime can fuse them into integer
    kernels (4-bit ones through a Cast to int8, onnxq/rewrite/qdq.py).
    With ``hessian`` (the second moments of the layer's inputs), per-channel weights are chosen for the layer's output
    (onnxq/numerics/output_error.py), the grid (plain or sqrt) by the output error too; never worse by that measure
    than rounding to nearest with the range that minimises it (which is at least as good as the weight-error range).
    ``sweeps``: the coordinate-descent refinement's after GPTQ (None: its default, 0: none; the proxy sensitivity prices
    without it). The matrix work runs on one BLAS thread unless the layer is wide (onnxq/numerics/threads.py).
    ``refill``: writes ``hessian`` again into the array it is given (GPTQ's factor is then made in its memory:
    :func:`onnxq.numerics.weights.quantize_for_output`).
    """
    with blas_threads(hessian.shape[-1] if hessian is not None else None):
        return _quantize_planned(weight, plan, op_type, config, integer_inputs, hessian, sweeps, refill)


def _quantize_planned(
    weight: np.ndarray, plan: WeightPlan, op_type: str | None, config: QuantizeConfig, integer_inputs: bool, hessian: np.ndarray | None,
    sweeps: int | None, refill: Callable[[np.ndarray], object] | None = None,
) -> QuantizedTensor:
    """:func:`quantize_planned` on the BLAS threads it chose."""
    if op_type == POST_CONV:  # per output channel whatever the granularity (the ops take one scale per row)
        axis = plan.channel_axis or 0
        search = config.range is not RangeMethod.ABSMAX
        codes = quantize_post_weight(weight, plan.bits, axis, search=search, balanced=_balanced(plan, op_type, config))
        if hessian is None or not search:  # (absmax: the full range, as for uniform codes)
            return codes
        return quantize_for_output(weight, plan.bits, axis, ("post",), hessian, codes, sweeps, refill)
    linear = op_type in (INT_CONV, MATMUL_NBITS) or (integer_inputs and (storage_bits(plan.bits) == 8 or config.sqrt is not SqrtMode.ON))
    sqrt = SqrtMode.OFF if linear else config.sqrt
    axis = plan.channel_axis if config.granularity is Granularity.CHANNEL else None
    # decoded at load, or MatMulNBits; below 8 bits
    blocks = config.block_size if op_type in (None, MATMUL_NBITS) and not integer_inputs and blocked(plan.bits, config.block_size) else None
    if hessian is None or axis is None or config.range is RangeMethod.ABSMAX:
        return quantize_weight(weight, plan.bits, axis, sqrt, config.range, balanced=_balanced(plan, op_type, config), block_size=blocks)
    modes = {SqrtMode.OFF: ("plain",), SqrtMode.ON: ("sqrt",), SqrtMode.AUTO: ("plain", "sqrt")}[sqrt]
    return quantize_for_output(weight, plan.bits, axis, modes, hessian, sweeps=sweeps, refill=refill, block_size=blocks)


#: Widest data-free codes that are balanced (onnxq/numerics/balance.py). 8-bit codes stay max|w| rounded to nearest:
#: the issue asks -b 8 never to lose to per-channel absmax, and balancing them lost 8.6 dB of output SQNR on a real
#: document classifier (61.6 -> 53.0; tools/eval_real_models.py --settings 3) while 4-bit ones gained 20.8 there.
BALANCED_MAX_BITS = 7


def _balanced(plan: WeightPlan, op_type: str | None, config: QuantizeConfig) -> bool:
    """Whether a weight's data-free codes are balanced: below 8 bits, unless --range absmax or --rounding nearest.

    Not lookups (no product with an input: a Gather run as the lookup op, onnxruntime's EmbedLayerNormalization tables)
    nor recurrent layers: their R multiplies hidden states a tanh centres on zero, where there is no common mean to
    protect and balancing only adds error (a random GRU/LSTM/RNN's output error rose from under 25 % to 28 % at 4 bits,
    tests/test_recurrent.py).
    """
    kinds = {use.op_type for use in plan.uses}
    return (config.balanced_rounding and config.range is not RangeMethod.ABSMAX and plan.bits <= BALANCED_MAX_BITS
            and op_type != LOOKUP_OP and not kinds & RECURRENT_WEIGHTS.keys() and not kinds <= CONTRIB_TABLES)


def correct_biases(loaded: LoadedModel, plan: Plan, weights: QuantizedWeights, calibrated: Calibration | None, config: QuantizeConfig) -> None:
    """With calibration data, let the layers' biases absorb the mean output shift the weight codes cause (in place).

    Weight-only: the shifts of the weights quantized for their inputs' covariance (onnxq/calibrate/mean_shift.py).
    With activations, for Conv/Gemm: the analytic correction (the float input means), then, when measuring
    (``BiasCorrection``), the shift left in a simulation of the quantized model. Runs before the rewrite: it reads the
    float weights and runs the float model. Float16 layers keep float activations: nothing to correct there.
    """
    if weights.mean_shifts:
        fold_shifts(loaded.model.graph, weights.mean_shifts)
    if calibrated is None or config.activations is None or config.activations.bias_correction is BiasCorrection.OFF:
        return
    measured = _measured_correction(config, plan.weights)
    consts = constant_initializers(loaded.model.graph)
    changes: dict[str, np.ndarray] = {}
    dequantized: dict[str, np.ndarray] = {}  # for the measured correction's simulation
    for weight_plan in plan.weights:
        if weight_plan.is_float32:
            values = weights.codes(weight_plan.tensor).dequantize()
            changes[weight_plan.tensor] = values - to_array(consts[weight_plan.tensor])
            if measured:
                dequantized[weight_plan.tensor] = values
    if not changes:
        return
    model = loaded.model
    float_model = onnx.ModelProto()
    if measured:
        float_model.CopyFrom(model)  # the reference, before any bias moves
    means = {name: m for name, c in calibrated.means.items() if (m := c.mean()) is not None}
    corrected = correct_biases_analytic(model.graph, changes, means)
    logger.debug("bias correction on %d layers", len(corrected))
    if measured:
        empirical_correction(model, float_model, dequantized, calibrated.quants, default_opset(model), corrected, calibrated.samples)


def _measured_correction(config: QuantizeConfig, plans: list[WeightPlan]) -> bool:
    """Whether bias correction goes on to measure shifts.

    BiasCorrection.AUTO: with activations below 7 bits, or weights below 7 bits that were not chosen for their layers'
    outputs. Weights chosen for the output with 8-bit activations get the analytic correction alone: the measured one
    then took real models apart (a document orientation classifier W4A8 from 29.3 dB of output SQNR with the analytic
    correction to 5.5 dB, top-1 agreement 96.5 %, 25 % in the int format; a layout detector to F1 19; the shipped
    models within 0.25 pp either way; tools/eval_real_models.py, BENCHMARKS).
    """
    assert config.activations is not None
    setting = config.activations.bias_correction
    if setting is BiasCorrection.AUTO:
        low_weights = any(p.bits < REDUCED_BITS for p in plans) and not config.output_aware
        return config.activations.bits < REDUCED_BITS or low_weights
    return setting is BiasCorrection.MEASURED


def rewrite(loaded: LoadedModel, plan: Plan, weights: QuantizedWeights, calibrated: Calibration | None) -> ChainReport | None:
    """Write the codes into the graph (onnxq/rewrite/), in place.

    Biases become int32 codes first (they read the float weights' quantization), then the weights, tables and
    activation pairs are written; onnxq's ops come last, since they take the quantization of the pairs in front of them,
    and with calibrated steps run MaxPools on codes and take zero Pads into their own padding (onnxq/rewrite/between.py)
    and link into uint8 chains (onnxq/rewrite/chains.py), whose report this returns. Last, the QDQ MatMuls with a float
    output become onnxruntime's MatMulIntegerToFloat with their bias inside (onnxq/rewrite/integer_matmuls.py).
    """
    model = loaded.model
    activations = calibrated.quants if calibrated is not None else {}
    quantize_biases(model.graph, activations, weights.qdq)
    uint8 = bool(activations) and all(quant.params.bits == 8 for quant in activations.values())
    fused = _fusable_weights(model.graph, plan.weights, activations)
    replace_weights(model.graph, {t: q for t, q in weights.qdq.items() if t in fused}, widen=uint8)
    replace_weights(model.graph, {t: q for t, q in weights.qdq.items() if t not in fused}, at_load=True)
    replace_tables(model, weights.tables)
    ensure_int4_ir(model)  # a table of odd-length rows keeps int4 codes
    if activations:
        insert_activation_qdq(model, activations, default_opset(model))
    nbits = {tensor: q for tensor, (q, op_type) in weights.ops.items() if op_type == MATMUL_NBITS}
    if nbits:
        replace_matmuls(model, nbits)
    chains = None
    if ours := {tensor: entry for tensor, entry in weights.ops.items() if entry[1] != MATMUL_NBITS}:
        replace_convs(model.graph, ours, plan.ranks)
        declare_domain(model)
        if activations:
            pool_codes(model.graph)
            take_input_quantization(model.graph)
            fold_pads(model.graph, default_opset(model) or 0)
            chains = link_chains(model.graph)
    if activations and (written := write_integer_matmuls(model)):
        weights.layers[:] = [replace(layer, op=MATMUL_INTEGER_TO_FLOAT) if set(layer.nodes) <= written else layer
                             for layer in weights.layers]
    return chains


def _fusable_weights(graph: onnx.GraphProto, plans: list[WeightPlan], activations: dict[str, ActivationQuant]) -> set[str]:
    """The weights onnxruntime can fuse with their layers' quantized input into an integer kernel: written as DequantizeLinear.

    That is where every reader multiplies the weight with a tensor quantized with a fixed step. The others are decoded
    when the model loads (Cast and Mul, which onnxruntime folds), since their DequantizeLinear would run on every
    inference, or turn a 4-bit MatMul into onnxruntime's MatMulNBits: weight-only layers, and layers behind ASQ's
    per-sample steps, which no onnxruntime kernel takes (the ViT W4A8 with ASQ, --format int: its 24 MatMuls ran as
    MatMulNBits in 2.26 ms against float's 0.61 ms; one-off profile).
    """
    if not activations:
        return set()
    nodes = {node.name: node for node in graph.node}
    fused = set()
    for weight_plan in plans:
        inputs = [nodes[use.node].input[use.data_input] if use.node in nodes and use.data_input is not None and not use.body_of else None
                  for use in weight_plan.uses]
        if all(name is not None and name in activations and activations[name].adapter is None for name in inputs):
            fused.add(weight_plan.tensor)
    return fused


def finish(loaded: LoadedModel, plan: Plan, weights: QuantizedWeights, calibrated: Calibration | None, config: QuantizeConfig,
           chains: ChainReport | None = None) -> QuantizationResult:
    """Let the codes' memory go, read in what stayed in external files, and say what was done."""
    weights.qdq.clear()  # the codes are in the model now
    weights.ops.clear()
    weights.tables.clear()
    materialize(loaded.model)  # what stayed float (biases, unquantized layers) is read in from external files
    for graph in all_graphs(loaded.model.graph):  # control-flow bodies got inferred shapes too
        drop_inferred_shapes(graph, loaded.declared)
    loaded.model = compact(loaded.model)  # lets the replaced float weights' memory go
    method = config.activations.method if config.activations is not None else None
    activations = list(calibrated.quants.values()) if calibrated is not None else []
    left_float = calibrated.left_float if calibrated is not None else []
    return QuantizationResult(loaded.model, weights.layers, plan.skipped, loaded, activations, method, config.bits, config.first_last_bits,
                              chains, left_float)


def _layer_result(plan: WeightPlan, q: QuantizedTensor, weight: np.ndarray, choice: OpChoice) -> LayerResult:
    return LayerResult(
        tensor=plan.tensor,
        nodes=plan.nodes,
        op_types=tuple(u.op_type for u in plan.uses),
        bits=plan.bits,
        storage_bits=storage_bits(plan.bits),
        sqrt=q.sqrt,
        op=choice.op_type or "DequantizeLinear",
        per_channel=q.axis is not None,
        block_size=q.block_size,
        alpha_median=float(np.median(q.alpha)),
        alpha=tuple(float(a) for a in np.ravel(q.alpha)),
        sqnr_db=q.sqnr_db,
        float_bytes=weight.nbytes,
        quantized_bytes=quantized_bytes(weight.size, plan.bits, q.scale.size, q.scale_bytes),
        qdq_reason=choice.reason,
        weights=weight.size,
        bits_rule=plan.bits_rule,
    )
