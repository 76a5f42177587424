"""Which activation tensors get a QuantizeLinear/DequantizeLinear pair, and at how many bits.

Placed where onnxruntime can fuse the pairs into integer kernels (QLinearConv, QGemm,
QLinearMatMul, QLinearAdd, QLinearGlobalAveragePool): on the float inputs of every layer
whose weight is quantized and of residual Adds and pools, and on their outputs. An Add or a pool
is quantized only where its inputs come out of the quantized layers (downstream of one): a transformer's
attention mask, computed from an input (or from the scores' shape) and added to the attention scores, holds -inf or float32's
lowest value, which no 8-bit range can hold next to the scores, and embedding sums go to LayerNorm
in float. A layer's
output that only feeds a Relu or Clip is quantized after the activation instead, which
onnxruntime folds into the quantization (its zero point already clips at 0). Graph outputs
stay float. Ops that gain nothing from integer inputs stay float and read float tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import onnx

from onnxq.config import CalibrationMethod, QuantizeConfig, WeightFormat
from onnxq.model.graph import constant_initializers, consumers
from onnxq.numerics.uniform import storage_bits
from onnxq.plan.weights import WeightPlan

#: Ops whose inputs and outputs are quantized when both sides are activations (they fuse into QLinear* kernels).
ELEMENTWISE = frozenset({"Add"})
POOLS = frozenset({"GlobalAveragePool", "AveragePool", "MaxPool"})
#: Activations onnxruntime folds into the following QuantizeLinear.
FOLDABLE = frozenset({"Relu", "Clip"})
#: Bits of activations that do not feed a weighted layer (residual adds, pools, layer outputs).
OTHER_BITS = 8
#: Bits of an input of a layer whose weight codes are int8 (5-8 bits): onnxruntime fuses that pair with the weight's
#: into an integer kernel (QLinearConv, ...) that takes 8-bit activations only, so a uint4 pair there makes a model
#: that does not load.
INT8_WEIGHT_INPUT_BITS = 8


@dataclass(frozen=True)
class ActivationSite:
    """One activation tensor to quantize.

    Attributes:
        tensor: its name.
        bits: code width (unsigned).
        required: True when a weighted layer reads it (its integer kernel needs it quantized); the outputs of layers,
            residual Adds and pools are optional: calibration leaves them float where their range cannot hold them.
        feeds_integer_op: True when a reader becomes an IntConv/PostConv, which quantizes its input itself to
            uint8 with one step per sample at most (ASQ then chooses a per-sample scalar step, not per-channel steps).
        beside_float_matmul: True when it sits at a weighted Gemm/MatMul that stays QDQ (an input or output, or joined to
            one through CODE_PATH nodes) and its codes reach no onnxq op and no QDQ Conv (see sites_integer_kernels_read).
    """

    tensor: str
    bits: int
    required: bool = True
    feeds_integer_op: bool = False
    beside_float_matmul: bool = False


#: Nodes the uint8 chains carry codes through, or fuse into the op in front (onnxq/rewrite/chains.py, max_pool_q.py).
CODE_PATH = frozenset({"Relu", "Clip", "Add", "BatchNormalization", "MaxPool"})


def plan_activations(
    graph: onnx.GraphProto, weighted: dict[str, int], boundary: Iterable[str], bits: int, boundary_bits: int | None,
    int8_weights: Iterable[str] = (),
) -> list[ActivationSite]:
    """The activation tensors of ``graph`` to quantize, in graph order.

    ``weighted`` maps the names of nodes whose weights are quantized to their op's activation
    input index; ``boundary`` names the first/last weighted nodes, whose inputs get
    ``boundary_bits`` (when not None) like their weights do. An input that a node of ``int8_weights`` (weight codes
    of 5-8 bits: depthwise layers, first/last ones, layers raised by mixed precision) reads gets at least
    INT8_WEIGHT_INPUT_BITS, whatever its other readers ask for.
    """
    boundary, int8_weights = set(boundary), set(int8_weights)
    consts = set(constant_initializers(graph))
    float_tensors = _float_tensors(graph)
    outputs = {o.name for o in graph.output}
    readers = consumers(graph)

    downstream = _downstream(graph, set(weighted))

    def is_activation(name: str) -> bool:
        return bool(name) and name not in consts and name in float_tensors

    def is_layer_output(name: str) -> bool:
        return is_activation(name) and name in downstream

    order: dict[str, None] = {}  # insertion-ordered set
    weighted_bits: dict[str, int] = {}
    int8_inputs: set[str] = set()
    for node in graph.node:
        inputs = _quantized_inputs(node, weighted, is_activation, is_layer_output)
        if inputs is None:
            continue
        for name in inputs:
            order[name] = None
            if node.name in weighted:
                width = boundary_bits if node.name in boundary and boundary_bits is not None else bits
                weighted_bits[name] = min(width, weighted_bits.get(name, width))
                if node.name in int8_weights:
                    int8_inputs.add(name)
        out = _after_foldable(node.output[0], readers, outputs)
        if out not in outputs and is_activation(out):
            order[out] = None
    for name in int8_inputs:
        weighted_bits[name] = max(weighted_bits[name], INT8_WEIGHT_INPUT_BITS)
    return [ActivationSite(name, weighted_bits.get(name, OTHER_BITS), name in weighted_bits) for name in order]


def _quantized_inputs(
    node: onnx.NodeProto, weighted: dict[str, int], is_activation: Callable[[str], bool], is_layer_output: Callable[[str], bool]
) -> list[str] | None:
    """The activation inputs of ``node`` to quantize, or None when the node stays float."""
    if node.name in weighted:
        name = node.input[weighted[node.name]]
        return [name] if is_activation(name) else None
    if node.op_type in ELEMENTWISE:
        data = list(node.input)
        return data if len(data) == 2 and all(is_layer_output(n) for n in data) else None
    if node.op_type in POOLS:
        return [node.input[0]] if is_layer_output(node.input[0]) else None
    return None


#: Ops whose output is a tensor's shape, not its values: what is computed from it is not a layer's output. An attention
#: mask built from the scores' shape (torch's exporters write one where the sequence length is dynamic: Shape, Trilu,
#: Where of -inf) would otherwise count as downstream, and its Add with the scores would get -inf as a quantized input.
SHAPE_OPS = frozenset({"Shape", "Size"})


def _downstream(graph: onnx.GraphProto, weighted: set[str]) -> set[str]:
    """Tensors computed from the values of a weighted node's output (in graph order, which is topological).

    Computed from its values: a shape read by SHAPE_OPS carries none of them.
    """
    found: set[str] = set()
    for node in graph.node:
        if node.op_type in SHAPE_OPS:
            continue
        if node.name in weighted or any(name in found for name in node.input):
            found.update(name for name in node.output if name)
    return found


def _after_foldable(name: str, readers: dict[str, list[onnx.NodeProto]], outputs: set[str]) -> str:
    """``name``, or the output of the single Relu/Clip that is its only reader."""
    users = readers.get(name, [])
    if name not in outputs and len(users) == 1 and users[0].op_type in FOLDABLE:
        return users[0].output[0]
    return name


def _float_tensors(graph: onnx.GraphProto) -> set[str]:
    """Names of float32 tensors (inputs, value_info, outputs): only those are quantized."""
    infos = list(graph.input) + list(graph.value_info) + list(graph.output)
    return {v.name for v in infos if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}


def activation_sites(graph: onnx.GraphProto, plans: list[WeightPlan], integer_ops: set[str], config: QuantizeConfig) -> list[ActivationSite]:
    """The activation tensors to quantize around the layers whose weights are quantized.

    ``integer_ops`` names the nodes that become IntConv/PostConv: a tensor they read gets one step per sample at most.
    """
    assert config.activations is not None
    # Activations inside control-flow bodies stay float (calibration observes main-graph tensors), and so do the inputs of
    # layers that multiply none with their weight (lookups, recurrent layers) and of float16 layers.
    weighted = {
        use.node: use.data_input for plan in plans if plan.is_float32 for use in plan.uses if not use.body_of and use.data_input is not None
    }
    boundary = {use.node for plan in plans if plan.first_or_last for use in plan.uses if use.node in weighted}
    int8_weights = {use.node for plan in plans if storage_bits(plan.bits) == 8 for use in plan.uses if use.node in weighted}
    sites = plan_activations(graph, weighted, boundary, config.activations.bits, config.first_last_bits, int8_weights)
    readers = consumers(graph)
    beside = _beside_float_matmuls(graph, {s.tensor for s in sites}, weighted, integer_ops, readers)
    return [dataclasses.replace(s, feeds_integer_op=any(n.name in integer_ops for n in readers.get(s.tensor, [])),
                                beside_float_matmul=s.tensor in beside) for s in sites]


def _beside_float_matmuls(graph: onnx.GraphProto, sites: set[str], weighted: dict[str, int], integer_ops: set[str],
                          readers: dict[str, list[onnx.NodeProto]]) -> set[str]:
    """The sites around the weighted Gemm/MatMul layers that stay QDQ, whose codes no integer kernel reads.

    Starts from those layers' outputs, then takes in the sites joined to a taken one through a CODE_PATH node (the
    residual Adds of a transformer's stream), until none is added. Never taken: a site whose codes reach an onnxq op or
    a QDQ Conv (directly or through CODE_PATH nodes), and the layers' own data inputs (``weighted``: each weighted
    node's data input index), which onnxruntime fuses with the weight's pair into MatMulIntegerToFloat (float out):
    the ViT with them quantized ran 1.05x float at batch 8 (1.17x as on an AVX2-only CPU), with them float too 0.99x.
    """
    kernels = integer_ops | {n.name for n in graph.node if n.name in weighted and n.op_type == "Conv"}
    matmuls = [n for n in graph.node if n.name in weighted and n.op_type in ("Gemm", "MatMul") and n.name not in integer_ops]
    inputs = {n.input[weighted[n.name]] for n in matmuls}
    free = {t for t in sites - inputs if not _reaches(t, kernels, readers)}
    taken = {t for n in matmuls for t in n.output if t in free}
    joins = [n for n in graph.node if n.op_type in CODE_PATH]
    while True:
        more = {t for n in joins if taken & {*n.input, *n.output} for t in (*n.input, *n.output) if t in free} - taken
        if not more:
            return taken
        taken |= more


def _reaches(tensor: str, kernels: set[str], readers: dict[str, list[onnx.NodeProto]]) -> bool:
    """Whether a node named in ``kernels`` reads ``tensor``, directly or through CODE_PATH nodes."""
    seen, todo = {tensor}, [tensor]
    while todo:
        for node in readers.get(todo.pop(), []):
            if node.name in kernels:
                return True
            if node.op_type in CODE_PATH:
                todo += [out for out in node.output if out and out not in seen]
                seen.update(node.output)
    return False


def sites_integer_kernels_read(sites: list[ActivationSite], config: QuantizeConfig) -> tuple[list[ActivationSite], list[str]]:
    """The sites to quantize, and the tensors left float in the op formats, where quantizing them measured slower.

    - ASQ gives a tensor that no op reads one step per channel (no integer kernel takes those: its sums need one step
      over the input channels), so onnxruntime ran its readers in float behind a Div/QuantizeLinear/DequantizeLinear/Mul
      chain that only simulated the quantization: the pooling and classifier after MobileNetV2's last conv 204 -> 192
      us at batch 1, the ViT's token tensors (read by float MatMuls, their 64x64 weights under onnxq's op size) 708 ->
      270 us against float's 266 (one-off, thread time, least of 30 runs, median of 15 interleaved rounds), top-1
      agreement with float unchanged within 3 of 2000 images. With ASQ a site stays quantized only where an op reads it.
    - With fixed steps, the outputs of Gemm/MatMul layers that stay QDQ (weights under onnxq's op size) and the residual
      Adds joining them (``beside_float_matmul``); their data inputs stay quantized, so onnxruntime runs each such layer
      as MatMulIntegerToFloat (float out) instead of QLinearMatMul between pairs. The ViT: 0.84x / 0.92x float (batch
      1 / 8) before, 0.96x / 1.05x after, agreement with float 98.5 -> 99.1 % of 1000 images (every tensor around them
      float: 0.99x / 0.99x); the CNNs and three real models alike within noise (one-off, median of 15 interleaved
      rounds; BENCHMARKS "Tensors around small MatMuls stay float"). A site whose codes reach an onnxq op or a QDQ Conv
      (onnxruntime's QLinearConv, 1.8-2.2x float per layer, tools/bench_ops.py), directly or through the nodes the
      chains carry codes through (CODE_PATH), stays quantized: leaving every site no op reads float broke CREPE's and
      the orientation model's chains (through Pad and an SE block's Mul) and cost them 4-8 % in one run.
    The qdq format, onnxruntime's integer kernels throughout, quantizes every site.
    """
    activations = config.activations
    if activations is None or config.format is WeightFormat.QDQ:
        return sites, []
    if activations.method is CalibrationMethod.ASQ:
        return [s for s in sites if s.feeds_integer_op], [s.tensor for s in sites if not s.feeds_integer_op]
    return [s for s in sites if not s.beside_float_matmul], [s.tensor for s in sites if s.beside_float_matmul]
