"""Rewrite a graph so quantized weights are stored as integers and decoded in the graph.

For each quantized weight W the float initializer is replaced by integer codes (int8 or packed int4) and the nodes
that decode them, in one of two forms:

- decoded at load (weight-only models): ``Cast(codes) * scale``, the scale shaped to broadcast along the channel
  axis (4-bit codes: unpacked from plain uint8 bytes by a shift and a Concat instead of a Cast, so that no int4 type
  and no opset 21 is needed), in float32 (then a Cast for float16 weights: onnxruntime has no float16 Mul on CPU to fold). Every input is
  a constant, so onnxruntime folds the nodes into a float weight when it loads the model: the file keeps the codes'
  size and the model runs at the float model's speed with the quantized weights' values.
  onnxruntime does not fold DequantizeLinear (it keeps it for its QDQ fusions) and so, where it fuses nothing, runs it
  on every inference: 0.2-0.5x float on the shipped models (BENCHMARKS). With a scale per block of inputs
  (--block-size) the codes are the weight's rows and the scales are spread over their blocks at load too.
- DequantizeLinear (per-axis where per channel): with quantized activations, where onnxruntime fuses the pairs into
  its integer kernels (QLinearConv, QLinearMatMul, QGemm). Those take int8 weights only: int4 codes go through a
  Cast to int8 in front of the DequantizeLinear, which onnxruntime folds at load before it fuses (the file keeps the
  int4 size); a DequantizeLinear of int4 codes was never fused and ran on every inference (ResNet-20 W4A8 0.30x
  float, 2.07-2.10x with the Cast; tools/bench_integer.py).

In sqrt mode the decoded value y stands for sign(w)*sqrt(|w|), so the graph computes y*|y| after it (folded at load
too). Everything is standard ONNX; stock onnxruntime runs it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.model.graph import NameSource, remove_unused_initializers, rename_input
from onnxq.numerics.packing import HALVES_OFFSET, pack_halves, pack_int4
from onnxq.numerics.uniform import fits_half, storage_bits
from onnxq.numerics.weights import QuantizedTensor, to_rows


def integer_tensor(name: str, codes: np.ndarray, bits: int) -> onnx.TensorProto:
    """An INT4 (packed) or INT8 initializer holding ``codes``."""
    if storage_bits(bits) == 4:
        tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.INT4, dims=codes.shape)
        tensor.raw_data = pack_int4(codes)
        return tensor
    return numpy_helper.from_array(codes.astype(np.int8), name)


def dequantize_nodes(
    weight: str, q: QuantizedTensor, names: NameSource, shared: HalvesConstants, dtype: int = onnx.TensorProto.FLOAT, at_load: bool = False,
    widen: bool = False,
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto], str]:
    """Initializers and nodes that recompute ``weight`` from its codes; returns them and the output name.

    The decoded values take the weight's float type ``dtype``. ``at_load``: Cast and Mul, which onnxruntime folds when
    it loads the model (float32 scale; 4-bit codes unpacked with the scalars of ``shared``, which the caller writes
    once); else DequantizeLinear (a scale of type ``dtype``), after a Cast of int4 codes to int8 when ``widen`` (uint8
    activations: onnxruntime's integer kernels take int8 weights and uint8 inputs only).
    """
    codes_name = names.fresh(f"{weight}_quantized")
    scale_name = names.fresh(f"{weight}_scale")
    decoded = names.fresh(f"{weight}_dequantized")
    if q.block_size is not None and not at_load:
        raise ValueError(f"{weight}: codes with a scale per block of inputs are decoded at load only (weight-only models)")
    if at_load:
        return _decoded_at_load(weight, q, names, dtype, codes_name, scale_name, decoded, shared)
    scale = np.asarray(q.scale, dtype=helper.tensor_dtype_to_np_dtype(dtype))
    inits = [integer_tensor(codes_name, q.codes, q.bits), numpy_helper.from_array(scale, scale_name)]
    inputs = [codes_name, scale_name]
    nodes = []
    if widen and storage_bits(q.bits) == 4:  # int8 when the model loads (folded): onnxruntime's integer kernels take int8 weights only
        inputs[0] = names.fresh(f"{weight}_int8")
        nodes.append(helper.make_node("Cast", [codes_name], [inputs[0]], name=names.fresh(f"{weight}_Widen"), to=onnx.TensorProto.INT8))
    if storage_bits(q.bits) == 8 or len(nodes):  # onnxruntime fuses Gemm into QGemm only with an explicit zero point
        zero_name = names.fresh(f"{weight}_zero_point")
        inits.append(numpy_helper.from_array(np.zeros(np.shape(q.scale), dtype=np.int8), zero_name))
        inputs.append(zero_name)
    axis = {} if q.axis is None else {"axis": q.axis}
    nodes.append(helper.make_node("DequantizeLinear", inputs, [decoded], name=names.fresh(f"{weight}_DequantizeLinear"), **axis))
    return inits, nodes, _square(weight, decoded, names, nodes) if q.sqrt else decoded


def _square(weight: str, decoded: str, names: NameSource, nodes: list[onnx.NodeProto]) -> str:
    """Append sqrt mode's y * |y| after the decoded values ``decoded``; returns the square's name."""
    abs_out = names.fresh(f"{weight}_abs")
    squared = names.fresh(f"{weight}_squared")
    nodes.append(helper.make_node("Abs", [decoded], [abs_out], name=names.fresh(f"{weight}_Abs")))
    nodes.append(helper.make_node("Mul", [decoded, abs_out], [squared], name=names.fresh(f"{weight}_Square")))
    return squared


def _decoded_at_load(weight: str, q: QuantizedTensor, names: NameSource, dtype: int, codes_name: str, scale_name: str,
                     decoded: str, shared: HalvesConstants) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto], str]:
    """``Cast(codes) * scale`` [``y * |y|``], in float32, then a Cast to ``dtype`` for other float types.

    float32 because onnxruntime's CPU provider has no float16 Mul kernel: a float16 decoding would not fold at load
    (and would run on every inference, with a warning per weight when the session starts).
    """
    if q.block_size is not None:
        return _blocks_decoded_at_load(weight, q, names, dtype, codes_name, scale_name, decoded, shared)
    scale = np.asarray(q.scale, dtype=np.float32)
    if q.axis is not None:  # broadcast along the channel axis
        scale = scale.reshape([-1 if i == q.axis else 1 for i in range(q.codes.ndim)])
    inits, nodes, cast = _float_codes(weight, q.codes, q.bits, names, codes_name, shared)
    inits.append(numpy_helper.from_array(scale, scale_name))
    values = decoded if dtype == onnx.TensorProto.FLOAT else names.fresh(f"{weight}_float32")
    nodes.append(helper.make_node("Mul", [cast, scale_name], [values], name=names.fresh(f"{weight}_Scale")))
    if q.sqrt:
        values = _square(weight, values, names, nodes)
    return inits, nodes, _cast_back(weight, values, decoded, dtype, names, nodes)


def _float_codes(weight: str, codes: np.ndarray, bits: int, names: NameSource, codes_name: str,
                 shared: HalvesConstants) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto], str]:
    """``codes`` stored under ``codes_name`` and the ops that make float32 codes of them (4-bit: unpacked halves)."""
    if storage_bits(bits) == 4:
        return _unpacked_halves(codes, names, codes_name, shared)
    cast = names.fresh(f"{weight}_cast")
    node = helper.make_node("Cast", [codes_name], [cast], name=names.fresh(f"{weight}_Cast"), to=onnx.TensorProto.FLOAT)
    return [integer_tensor(codes_name, codes, bits)], [node], cast


def _cast_back(weight: str, values: str, decoded: str, dtype: int, names: NameSource, nodes: list[onnx.NodeProto]) -> str:
    """``values`` (float32) as the weight's float type ``dtype``, under ``decoded`` (a Cast appended where it is not float32)."""
    if dtype == onnx.TensorProto.FLOAT:
        return values
    nodes.append(helper.make_node("Cast", [values], [decoded], name=names.fresh(f"{weight}_CastBack"), to=dtype))
    return decoded


def _blocks_decoded_at_load(weight: str, q: QuantizedTensor, names: NameSource, dtype: int, codes_name: str, scale_name: str,
                            decoded: str, shared: HalvesConstants) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto], str]:
    """Codes with a scale per channel and block of inputs: ``Cast(codes) * scales``, moved back to the weight's shape.

    Where the rows (weights.to_rows: channel, inputs) are whole blocks, the codes are stored as (channel, block, input
    in block) and the scales (channel, block, 1) broadcast over them. Where the last block is shorter, the codes are
    the rows as they are (no padding codes in the file) and the scales become one per code at load: Expand over the
    block, Reshape to rows, Slice off what passes the last input (three more weight-sized tensors while onnxruntime
    folds them, so only where needed: MiniLM's session took 356 MB instead of 230 with every scale spread so). The
    scales are float16 where float16 holds them all (a Cast to float32 first). Then Reshape to the weight's shape with
    the channel axis first and Transpose it back where it is not first. Every op reads constants: folded at load.
    """
    assert q.block_size is not None and q.axis is not None
    rows = to_rows(q.codes, q.axis)
    count, k = rows.shape
    blocks = int(np.shape(q.scale)[1])
    whole = k == blocks * q.block_size and count > 1  # (one channel: the Expand form, which inspect cannot mistake for per channel)
    codes = rows.reshape(count, blocks, q.block_size) if whole else rows
    inits, nodes, cast = _float_codes(weight, codes, q.bits, names, codes_name, shared)
    scale = np.asarray(q.scale, dtype=np.float32).reshape(count, blocks, 1)
    steps: list[tuple[str, dict, list[np.ndarray]]] = []
    if fits_half(scale):  # half the scales' bytes in the file
        scale, steps = scale.astype(np.float16), [("Cast", {"to": onnx.TensorProto.FLOAT}, [])]
    stored = names.fresh("onnxq_blocks")
    inits.append(numpy_helper.from_array(scale, stored))
    if not whole:
        steps += [("Expand", {}, [np.array([count, blocks, q.block_size], dtype=np.int64)]),
                  ("Reshape", {}, [np.array([count, blocks * q.block_size], dtype=np.int64)]),
                  ("Slice", {}, [np.array([0], dtype=np.int64), np.array([k], dtype=np.int64), np.array([1], dtype=np.int64)])]
    if steps:
        _chain(stored, steps, scale_name, names, inits, nodes)
    else:
        scale_name = stored
    values = names.fresh(f"{weight}_float32")
    nodes.append(helper.make_node("Mul", [cast, scale_name], [values], name=names.fresh(f"{weight}_Scale")))
    if q.sqrt:
        values = _square(weight, values, names, nodes)
    shape = q.codes.shape
    axis = q.axis % len(shape)
    moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
    steps = [("Reshape", {}, [np.array(moved, dtype=np.int64)])]
    if axis != 0:
        order = list(range(1, len(shape)))
        steps.append(("Transpose", {"perm": order[:axis] + [0] + order[axis:]}, []))
    shaped = decoded if dtype == onnx.TensorProto.FLOAT else names.fresh("onnxq_blocks")
    _chain(values, steps, shaped, names, inits, nodes)
    return inits, nodes, _cast_back(weight, shaped, decoded, dtype, names, nodes)


def _chain(first: str, steps: list[tuple[str, dict, list[np.ndarray]]], output: str, names: NameSource,
           inits: list[onnx.TensorProto], nodes: list[onnx.NodeProto]) -> None:
    """Append ``steps`` (op type, attributes, constant inputs after the data) from ``first``; the last one writes ``output``.

    Short names (a model's size counts them), as the 4-bit unpacking's.
    """
    values = first
    for i, (op, attributes, constants) in enumerate(steps):
        inputs = [values]
        for constant in constants:
            inputs.append(names.fresh("onnxq_blocks"))
            inits.append(numpy_helper.from_array(constant, inputs[-1]))
        values = output if i == len(steps) - 1 else names.fresh("onnxq_blocks")
        nodes.append(helper.make_node(op, inputs, [values], name=names.fresh("onnxq_blocks"), **attributes))


class HalvesConstants:
    """The scalars every 4-bit unpacking reads (16, 4, the offset 8), written once per graph when first needed."""

    def __init__(self, names: NameSource) -> None:
        self._names = names
        self.initializers: list[onnx.TensorProto] = []
        self._made: dict[str, str] = {}

    def name(self, key: str) -> str:
        """The initializer's name for ``key`` ("sixteen", "four": uint8; "offset": float32), made on first use."""
        if key not in self._made:
            value = {"sixteen": np.array(16, dtype=np.uint8), "four": np.array(4, dtype=np.uint8),
                     "offset": np.array(HALVES_OFFSET, dtype=np.float32)}[key]
            self._made[key] = self._names.fresh(f"onnxq_halves_{key}")
            self.initializers.append(numpy_helper.from_array(value, self._made[key]))
        return self._made[key]


def _unpacked_halves(codes: np.ndarray, names: NameSource, packed_name: str,
                     shared: HalvesConstants) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto], str]:
    """4-bit ``codes`` stored as uint8 halves (onnxq/numerics/packing.py) and the ops that unpack them to float codes.

    Cast(Reshape(Concat(packed mod 16, packed >> 4)[:n], shape)) - 8. Every op is in opset 13 and reads constants
    only, so onnxruntime folds them at load like the Cast of int8 codes: no int4 tensor type, so a weight-only model
    keeps its opset (onnx's version converter is a failure point on other exporters' models). Names are short: a
    model's size counts them (the shared scalars once). Returns the initializers, the nodes and the float codes' name.
    """
    count = int(codes.size)
    shape = names.fresh("onnxq_halves_shape")
    inits = [numpy_helper.from_array(pack_halves(codes), packed_name), numpy_helper.from_array(np.array(codes.shape, dtype=np.int64), shape)]
    low, high, halves, unsigned, floats, signed = (names.fresh("onnxq_halves") for _ in range(6))
    nodes = [
        helper.make_node("Mod", [packed_name, shared.name("sixteen")], [low], name=low),
        helper.make_node("BitShift", [packed_name, shared.name("four")], [high], name=high, direction="RIGHT"),
        helper.make_node("Concat", [low, high], [halves], name=halves, axis=0),
    ]
    if count % 2:  # the padding code at the end goes
        starts, ends, trimmed = names.fresh("onnxq_halves_start"), names.fresh("onnxq_halves_end"), names.fresh("onnxq_halves")
        inits += [numpy_helper.from_array(np.array([0], dtype=np.int64), starts), numpy_helper.from_array(np.array([count], dtype=np.int64), ends)]
        nodes.append(helper.make_node("Slice", [halves, starts, ends], [trimmed], name=trimmed))
        halves = trimmed
    nodes += [
        helper.make_node("Reshape", [halves, shape], [unsigned], name=unsigned),
        helper.make_node("Cast", [unsigned], [floats], name=floats, to=onnx.TensorProto.FLOAT),
        helper.make_node("Sub", [floats, shared.name("offset")], [signed], name=signed),
    ]
    return inits, nodes, signed


def replace_weights(graph: onnx.GraphProto, quantized: dict[str, QuantizedTensor], at_load: bool = False, widen: bool = False) -> None:
    """Replace each named float initializer by its integer codes and the nodes that decode them (at load: Cast and Mul).

    ``widen``: int4 codes read by DequantizeLinear are cast to int8 first (see dequantize_nodes).
    """
    names = NameSource(graph)
    dtypes = {t.name: t.data_type for t in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    shared = HalvesConstants(names)
    for weight, q in quantized.items():
        inits, nodes, output = dequantize_nodes(weight, q, names, shared, dtypes[weight], at_load, widen)
        graph.initializer.extend(inits)
        new_nodes.extend(nodes)
        rename_input(graph, weight, output)
    graph.initializer.extend(shared.initializers)
    # Dequantization reads only initializers, so it goes first and the order stays topological.
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + existing)
    remove_unused_initializers(graph)
