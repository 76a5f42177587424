"""The quantization run, end to end: load -> prepare -> plan -> search weights -> rewrite."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxq.config import Granularity, QuantizeConfig
from onnxq.errors import OnnxqError
from onnxq.formats.uniform import storage_bits
from onnxq.graph import constant_initializers, to_array
from onnxq.load import INT4_OPSET, LoadedModel, ensure_opset, load
from onnxq.plan import Skipped, WeightPlan, plan_weights
from onnxq.prepare import prepare
from onnxq.rewrite import replace_weights
from onnxq.weights import QuantizedTensor, quantize_weight

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
    per_channel: bool
    alpha_median: float
    sqnr_db: float
    float_bytes: int
    quantized_bytes: int


@dataclass
class QuantizationResult:
    """The quantized model and an account of every weighted layer."""

    model: onnx.ModelProto
    layers: list[LayerResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    source: LoadedModel | None = None


def quantize(model: str | os.PathLike[str] | onnx.ModelProto, config: QuantizeConfig | None = None) -> onnx.ModelProto:
    """Quantize the weights of ``model`` (a path or a ModelProto, which is not modified) and return the new model."""
    return quantize_with_report(model, config).model


def quantize_with_report(model: str | os.PathLike[str] | onnx.ModelProto, config: QuantizeConfig | None = None) -> QuantizationResult:
    """Like :func:`quantize`, but also say per layer what was done."""
    config = config or QuantizeConfig()
    loaded = load(model)
    ensure_opset(loaded, 13)
    loaded.model = prepare(loaded.model)
    plans, skipped = plan_weights(loaded.model.graph, config)
    if not plans:
        raise OnnxqError(loaded.label, "no quantizable weights (Conv, ConvTranspose, Gemm or MatMul with constant float32 weights)")
    if any(storage_bits(p.bits) == 4 for p in plans):
        ensure_opset(loaded, INT4_OPSET)
    consts = constant_initializers(loaded.model.graph)
    quantized: dict[str, QuantizedTensor] = {}
    layers: list[LayerResult] = []
    for plan in plans:
        weight = to_array(consts[plan.tensor])
        q = quantize_weight(weight, plan.bits, _axis(plan, config), config.sqrt, config.range)
        quantized[plan.tensor] = q
        layers.append(_layer_result(plan, q, weight))
        logger.debug("%s: %d bits, sqrt=%s, SQNR %.1f dB", plan.tensor, plan.bits, q.sqrt, q.sqnr_db)
    replace_weights(loaded.model.graph, quantized)
    return QuantizationResult(loaded.model, layers, skipped, loaded)


def _axis(plan: WeightPlan, config: QuantizeConfig) -> int | None:
    return plan.channel_axis if config.granularity is Granularity.CHANNEL else None


def _layer_result(plan: WeightPlan, q: QuantizedTensor, weight: np.ndarray) -> LayerResult:
    scale_bytes = 4 * max(q.scale.size, 1)
    return LayerResult(
        tensor=plan.tensor,
        nodes=plan.nodes,
        op_types=tuple(u.op_type for u in plan.uses),
        bits=plan.bits,
        storage_bits=storage_bits(plan.bits),
        sqrt=q.sqrt,
        per_channel=q.axis is not None,
        alpha_median=float(np.median(q.alpha)),
        sqnr_db=q.sqnr_db,
        float_bytes=weight.nbytes,
        quantized_bytes=(weight.size * storage_bits(plan.bits) + 7) // 8 + scale_bytes,
    )
