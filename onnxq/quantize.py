"""The quantization run, end to end: load -> prepare -> plan -> search weights -> rewrite."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxq.activations import REDUCED_BITS, adjust_weight_plans, calibrate_activations, quantize_biases
from onnxq.bias_correction import correct_biases
from onnxq.calibrate import Calibration, CalibrationData
from onnxq.config import BiasCorrection, CalibrationMethod, Granularity, QuantizeConfig, SqrtMode
from onnxq.empirical_bias import empirical_correction
from onnxq.errors import OnnxqError
from onnxq.external import materialize
from onnxq.formats.uniform import storage_bits
from onnxq.graph import constant_initializers, to_array
from onnxq.load import FLOAT16_SCALE_OPSET, INT4_OPSET, LoadedModel, ensure_opset, load
from onnxq.plan import ALREADY_QUANTIZED, Skipped, WeightPlan, plan_weights
from onnxq.prepare import prepare
from onnxq.rewrite import replace_weights
from onnxq.rewrite_activations import ActivationQuant, insert_activation_qdq
from onnxq.rewrite_ops import INT_CONV, POST_CONV, OpChoice, OpTargets, declare_domain, op_choice, replace_convs, take_input_quantization
from onnxq.rewrite_tables import LOOKUP_OP, replace_tables, runs_as_lookup
from onnxq.tensor_data import compact
from onnxq.weights import QuantizedTensor, quantize_post_weight, quantize_weight

logger = logging.getLogger(__name__)


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


@dataclass
class QuantizationResult:
    """The quantized model and an account of every weighted layer."""

    model: onnx.ModelProto
    layers: list[LayerResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    source: LoadedModel | None = None
    activations: list[ActivationQuant] = field(default_factory=list)
    calibration: CalibrationMethod | None = None


def quantize(
    model: str | os.PathLike[str] | onnx.ModelProto, config: QuantizeConfig | None = None, calibration: CalibrationData | None = None
) -> onnx.ModelProto:
    """Quantize ``model`` (a path or a ModelProto, which is not modified) and return the new model.

    Weights always; activations too when ``config.activations`` is set, which needs
    ``calibration``: an iterable of {input name: batch} dicts, an onnxruntime
    CalibrationDataReader, or the path of an .npy/.npz file or a folder of images.
    """
    return quantize_with_report(model, config, calibration).model


def quantize_with_report(
    model: str | os.PathLike[str] | onnx.ModelProto, config: QuantizeConfig | None = None, calibration: CalibrationData | None = None
) -> QuantizationResult:
    """Like :func:`quantize`, but also say per layer what was done."""
    config = config or QuantizeConfig()
    loaded = load(model)
    ensure_opset(loaded, 13)
    loaded.model = prepare(loaded.model)
    plans, skipped = plan_weights(loaded.model.graph, config)
    if not plans:
        raise OnnxqError(loaded.label, _nothing_to_quantize(skipped, loaded.model.graph))
    if config.activations is not None and calibration is None:
        raise OnnxqError(loaded.label, "quantizing activations needs calibration data")
    if config.activations is not None and not any(p.is_float32 for p in plans):
        raise OnnxqError(loaded.label, "activation quantization covers float32 layers and this model's are float16; "
                         "leave out --calibration to quantize its weights only")
    if config.activations is not None:
        plans = adjust_weight_plans(plans, config.activations)
    if any(not p.is_float32 for p in plans):
        ensure_opset(loaded, FLOAT16_SCALE_OPSET)
    if any(storage_bits(p.bits) == 4 for p in plans) or (config.activations is not None and config.activations.bits == 4):
        ensure_opset(loaded, INT4_OPSET)
    calibrated = calibrate_activations(loaded.model, plans, config, calibration) if config.activations is not None else None
    activations: dict[str, ActivationQuant] = calibrated.quants if calibrated is not None else {}
    correcting = calibrated is not None and config.activations.bias_correction is not BiasCorrection.OFF
    measured = correcting and _measured_correction(config, plans)
    weight_changes: dict[str, np.ndarray] = {}
    dequantized: dict[str, np.ndarray] = {}  # for the measured correction's simulation
    consts = constant_initializers(loaded.model.graph)
    targets = OpTargets.of(loaded.model.graph)
    qdq: dict[str, QuantizedTensor] = {}
    custom: dict[str, tuple[QuantizedTensor, str]] = {}
    tables: dict[str, QuantizedTensor] = {}  # embedding tables only looked up (Gather)
    layers: list[LayerResult] = []
    for plan in plans:
        weight = to_array(consts[plan.tensor])
        if not np.isfinite(weight).all():
            names = " ".join(plan.nodes)
            raise OnnxqError(loaded.label, f"weight {plan.tensor} has NaN or infinite values (--exclude {names} leaves it float)")
        lookup = runs_as_lookup(plan, weight.ndim)
        choice = OpChoice(None) if lookup else op_choice(plan, targets, weight.ndim, config)
        op_type = choice.op_type
        q = _quantize_tensor(weight, plan, op_type, config, bool(activations))
        if lookup:
            tables[plan.tensor] = q
        elif op_type is None:
            qdq[plan.tensor] = q
        else:
            custom[plan.tensor] = (q, op_type)
        layers.append(_layer_result(plan, q, weight, LOOKUP_OP if lookup else op_type, choice.reason))
        logger.debug("%s: %d bits, sqrt=%s, op %s, SQNR %.1f dB", plan.tensor, plan.bits, q.sqrt, op_type, q.sqnr_db)
        if correcting and plan.is_float32:  # float16 layers keep float activations: nothing to correct for
            values = q.dequantize()
            weight_changes[plan.tensor] = values - weight
            if measured:
                dequantized[plan.tensor] = values
    if weight_changes:
        _correct_biases(loaded.model, calibrated, weight_changes, activations, dequantized if measured else None)
    quantize_biases(loaded.model.graph, activations, qdq)
    replace_weights(loaded.model.graph, qdq)
    replace_tables(loaded.model, tables)
    if activations:
        insert_activation_qdq(loaded.model, activations, _opset(loaded.model))
    if custom:
        replace_convs(loaded.model.graph, custom, targets.ranks)
        declare_domain(loaded.model)
        if activations:
            take_input_quantization(loaded.model.graph)
    qdq.clear()  # the codes are in the model now
    custom.clear()
    tables.clear()
    materialize(loaded.model)  # what stayed float (biases, unquantized layers) is read in from external files
    loaded.model = compact(loaded.model)  # lets the replaced float weights' memory go
    method = config.activations.method if config.activations is not None else None
    return QuantizationResult(loaded.model, layers, skipped, loaded, list(activations.values()), method)


def _measured_correction(config: QuantizeConfig, plans: list[WeightPlan]) -> bool:
    """Whether bias correction goes on to measure shifts (BiasCorrection.AUTO: below 7 bits somewhere)."""
    assert config.activations is not None
    setting = config.activations.bias_correction
    if setting is BiasCorrection.AUTO:
        return config.activations.bits < REDUCED_BITS or any(p.bits < REDUCED_BITS for p in plans)
    return setting is BiasCorrection.MEASURED


def _correct_biases(
    model: onnx.ModelProto,
    calibrated: Calibration,
    changes: dict[str, np.ndarray],
    activations: dict[str, ActivationQuant],
    dequantized: dict[str, np.ndarray] | None,
) -> None:
    """Bias correction in place: the analytic shift from float input means, then, given the ``dequantized`` weights, the measured one."""
    float_model = onnx.ModelProto()
    if dequantized is not None:
        float_model.CopyFrom(model)  # the reference, before any bias moves
    means = {name: m for name, c in calibrated.means.items() if (m := c.mean()) is not None}
    corrected = correct_biases(model.graph, changes, means)
    logger.debug("bias correction on %d layers", len(corrected))
    if dequantized is not None:
        empirical_correction(model, float_model, dequantized, activations, _opset(model), corrected, calibrated.samples)


#: Ops that only a quantized model holds: a model made of them has nothing left to quantize.
QUANTIZED_OPS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulNBits", "QGemm", "GatherBlockQuantized",
                           INT_CONV, POST_CONV})


def _nothing_to_quantize(skipped: list[Skipped], graph: onnx.GraphProto) -> str:
    """The error for a model without a weight to quantize, with the first weighted node's reason."""
    quantized_ops = sum(n.op_type in QUANTIZED_OPS for n in graph.node)
    if quantized_ops or any(s.reason == ALREADY_QUANTIZED for s in skipped):  # sqrt mode's weights come out of a Mul
        return "the model is already quantized (no float weight is left to quantize); give onnxq the float model"
    message = ("no quantizable weights (Conv, ConvTranspose, Gemm, MatMul, Einsum, LSTM/GRU/RNN with constant float32/float16 "
               "weights, or Gather from a float table)")
    if skipped:
        more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
        message += f"; left float: {skipped[0].node} ({skipped[0].reason}){more}"
    return message


def _quantize_tensor(weight: np.ndarray, plan: WeightPlan, op_type: str | None, config: QuantizeConfig, integer_inputs: bool) -> QuantizedTensor:
    """Codes for one weight in the format its op needs: POST, plain uniform (IntConv), or uniform/sqrt (QDQ).

    With quantized activations, 8-bit weights stay linear (no sqrt) so onnxruntime can fuse them into integer kernels.
    """
    if op_type == POST_CONV:  # per output channel whatever the granularity (the ops take one scale per row)
        return quantize_post_weight(weight, plan.bits, plan.channel_axis or 0)
    linear = op_type == INT_CONV or (integer_inputs and storage_bits(plan.bits) == 8)
    sqrt = SqrtMode.OFF if linear else config.sqrt
    return quantize_weight(weight, plan.bits, _axis(plan, config), sqrt, config.range)


def _opset(model: onnx.ModelProto) -> int:
    return next((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), 13)


def _axis(plan: WeightPlan, config: QuantizeConfig) -> int | None:
    return plan.channel_axis if config.granularity is Granularity.CHANNEL else None


def _layer_result(plan: WeightPlan, q: QuantizedTensor, weight: np.ndarray, op_type: str | None, qdq_reason: str = "") -> LayerResult:
    scale_bytes = 4 * max(q.scale.size, 1)
    return LayerResult(
        tensor=plan.tensor,
        nodes=plan.nodes,
        op_types=tuple(u.op_type for u in plan.uses),
        bits=plan.bits,
        storage_bits=storage_bits(plan.bits),
        sqrt=q.sqrt,
        op=op_type or "DequantizeLinear",
        per_channel=q.axis is not None,
        alpha_median=float(np.median(q.alpha)),
        alpha=tuple(float(a) for a in np.ravel(q.alpha)),
        sqnr_db=q.sqnr_db,
        float_bytes=weight.nbytes,
        quantized_bytes=(weight.size * storage_bits(plan.bits) + 7) // 8 + scale_bytes,
        qdq_reason=qdq_reason,
    )
