"""The activation stage of a quantization run: place, calibrate, and rewrite activation quantization.

It ties the graph (which tensors: ``calibrate.placement``), the data (``calibrate``) and the
rewrite (``rewrite_activations``) together, and adjusts the weight plans the way integer
kernels need: 7-bit weights where onnxruntime's uint8 x int8 kernels could saturate
(``ReduceRange``), and int32 biases so onnxruntime fuses Conv/Gemm into QLinearConv/QGemm.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.calibrate import Calibration, CalibrationData, calibrate
from onnxq.calibrate.placement import ActivationSite, plan_activations
from onnxq.config import ActivationConfig, QuantizeConfig, ReduceRange
from onnxq.cpu import has_vnni
from onnxq.formats.uniform import storage_bits
from onnxq.graph import NameSource, constant_initializers, consumers, to_array
from onnxq.plan import TABLE_OPS, WeightPlan
from onnxq.rewrite_activations import ActivationQuant
from onnxq.rewrite_ops import OpTargets, custom_op_for
from onnxq.weights import QuantizedTensor

#: Largest weight width that never saturates onnxruntime's 16-bit pair sums beside uint8 activations.
REDUCED_BITS = 7
#: Layers whose bias becomes int32 when input and weight are integer (what onnxruntime's QDQ fusion wants).
BIAS_INPUT = {"Conv": 2, "Gemm": 2}


def reduce_range(setting: ReduceRange) -> bool:
    """Whether 8-bit weights are cut to 7 bits: ON, OFF, or (AUTO) on CPUs without VNNI."""
    return setting is ReduceRange.ON or (setting is ReduceRange.AUTO and not has_vnni())


def adjust_weight_plans(plans: list[WeightPlan], activations: ActivationConfig) -> list[WeightPlan]:
    """Weight plans for a model whose activations are quantized: 8-bit weights become 7-bit when reducing range.

    Tables only looked up (Gather) keep their bits: no integer product reads them.
    """
    if activations.bits != 8 or not reduce_range(activations.reduce_range):
        return plans
    return [dataclasses.replace(p, bits=min(p.bits, REDUCED_BITS)) if p.bits == 8 and not _only_looked_up(p) else p for p in plans]


def _only_looked_up(plan: WeightPlan) -> bool:
    return all(use.op_type in TABLE_OPS for use in plan.uses)


def activation_sites(graph: onnx.GraphProto, plans: list[WeightPlan], config: QuantizeConfig) -> list[ActivationSite]:
    """The activation tensors to quantize around the layers whose weights are quantized."""
    assert config.activations is not None
    # Activations inside control-flow bodies stay float (calibration observes main-graph tensors), and so do the inputs of
    # layers that multiply none with their weight (lookups, recurrent layers) and of float16 layers.
    weighted = {
        use.node: use.data_input for plan in plans if plan.is_float32 for use in plan.uses if not use.body_of and use.data_input is not None
    }
    boundary = {use.node for plan in plans if plan.first_or_last for use in plan.uses if use.node in weighted}
    sites = plan_activations(graph, weighted, boundary, config.activations.bits, config.first_last_bits)
    ops = integer_op_nodes(graph, plans, config)
    if not ops:
        return sites
    readers = consumers(graph)
    return [dataclasses.replace(s, feeds_integer_op=any(n.name in ops for n in readers.get(s.tensor, []))) for s in sites]


def integer_op_nodes(graph: onnx.GraphProto, plans: list[WeightPlan], config: QuantizeConfig) -> set[str]:
    """The names of the nodes the rewrite will turn into IntConv/PostConv (the same choice quantize makes per weight)."""
    targets = OpTargets.of(graph)
    consts = targets.consts
    return {
        use.node
        for plan in plans
        if plan.tensor in consts and custom_op_for(plan, targets, len(consts[plan.tensor].dims), config) is not None
        for use in plan.uses
    }


def calibrate_activations(
    model: onnx.ModelProto, plans: list[WeightPlan], config: QuantizeConfig, data: CalibrationData
) -> Calibration:
    """Sites and their calibrated quantization, from one run of the (prepared, still float) model."""
    assert config.activations is not None
    sites = activation_sites(model.graph, plans, config)
    return calibrate(model, sites, data, config.activations)


def quantize_biases(graph: onnx.GraphProto, quants: dict[str, ActivationQuant], weights: dict[str, QuantizedTensor]) -> int:
    """Store the float bias of Conv/Gemm as int32 codes with scale s_x * s_w (+ DequantizeLinear).

    Only where the input has a fixed scale and the weight is plain 8-bit storage: that is
    the pattern onnxruntime fuses into an integer kernel; elsewhere the bias stays float.
    """
    consts = constant_initializers(graph)
    names = NameSource(graph)
    readers = consumers(graph)
    new_nodes: list[onnx.NodeProto] = []
    done = 0
    for node in graph.node:
        slot = BIAS_INPUT.get(node.op_type)
        if slot is None or len(node.input) <= slot or node.input[slot] not in consts or len(readers[node.input[slot]]) != 1:
            continue
        quant, weight = quants.get(node.input[0]), weights.get(node.input[1])
        if quant is None or quant.adapter is not None or weight is None or weight.sqrt or storage_bits(weight.bits) != 8:
            continue
        if node.op_type == "Gemm" and (weight.axis not in (None, 0 if _attr(node, "transB") else 1) or _attr(node, "transA")):
            continue
        bias = to_array(consts[node.input[slot]]).astype(np.float64)
        weight_scale = np.asarray(weight.scale, dtype=np.float64)
        if bias.ndim != 1 or weight_scale.size not in (1, bias.size):
            continue
        scale = (quant.params.scale * weight_scale).astype(np.float32)
        codes = np.clip(np.rint(bias / np.where(scale > 0, scale, 1.0)), -(2**31), 2**31 - 1).astype(np.int32)
        base = node.input[slot]
        codes_name, scale_name, out = names.fresh(f"{base}_quantized"), names.fresh(f"{base}_scale"), names.fresh(f"{base}_dequantized")
        graph.initializer.extend([numpy_helper.from_array(codes, codes_name), numpy_helper.from_array(scale, scale_name)])
        axis = {"axis": 0} if scale.ndim == 1 else {}
        dq_name = names.fresh(f"{base}_DequantizeLinear")
        new_nodes.append(onnx.helper.make_node("DequantizeLinear", [codes_name, scale_name], [out], name=dq_name, **axis))
        node.input[slot] = out
        done += 1
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + existing)
    return done


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)
