"""Shared test helpers: running models in onnxruntime, counting ops, reading quantized weights independently."""

from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxq.native.cpu import cpu_flags

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]

MODELS = REPO / "models"

#: Values of the ops' ``kernel`` attribute, and the /proc/cpuinfo flags each SIMD kernel needs (as csrc/cpu.h checks).
KERNELS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
ISA_FLAGS = {"avx2": ("avx2", "fma"), "avx512": ("avx512f", "avx512bw", "avx512_vnni")}
ISA_NAMES = {"avx2": "AVX2/FMA", "avx512": "AVX-512 VNNI"}
#: The kernels a test forces one by one: every one of them, whatever this CPU runs (see kernel_params).
ISA_KERNELS = ("scalar", "avx2", "avx512")

#: ``ONNXQ_TEST_CPU_FLAGS=avx2,fma``: the tests believe the CPU has only these of its flags, so a machine with
#: AVX-512 shows what an AVX2-only one skips. It can only take flags away (it is intersected with the real ones), and
#: only the tests read it: the op library still picks its kernels by the real CPU.
CPU_FLAGS_VARIABLE = "ONNXQ_TEST_CPU_FLAGS"


def assumed_cpu_flags() -> frozenset[str]:
    """The CPU flags the tests go by: the real ones, narrowed by ONNXQ_TEST_CPU_FLAGS when it is set."""
    restricted = os.environ.get(CPU_FLAGS_VARIABLE)
    if restricted is None:
        return cpu_flags()
    return cpu_flags() & frozenset(flag.strip() for flag in restricted.split(",") if flag.strip())


def kernel_supported(kernel: str) -> bool:
    """Whether the tests' CPU (assumed_cpu_flags) can run the named kernel."""
    return set(ISA_FLAGS.get(kernel, ())) <= assumed_cpu_flags()


def kernel_really_supported(kernel: str) -> bool:
    """Whether the real CPU can run the named kernel, as the op library sees it (for tests of its refusal)."""
    return set(ISA_FLAGS.get(kernel, ())) <= cpu_flags()


def missing_isa(kernel: str) -> str | None:
    """What the tests' CPU lacks to run ``kernel``, e.g. 'AVX-512 VNNI (avx512f avx512bw avx512_vnni)'; None if nothing."""
    if kernel not in ISA_FLAGS or kernel_supported(kernel):
        return None
    needed = ISA_FLAGS[kernel]
    missing = [flag for flag in needed if flag not in assumed_cpu_flags()]
    text = f"{ISA_NAMES[kernel]} ({' '.join(needed)})"
    if len(missing) < len(needed):
        text += f": missing {' '.join(missing)}"
    if CPU_FLAGS_VARIABLE in os.environ:
        text += f" [simulated: {CPU_FLAGS_VARIABLE}={os.environ[CPU_FLAGS_VARIABLE]}]"
    return text


def kernel_params(*kernels: str) -> list:
    """One pytest parameter per kernel (all of ISA_KERNELS by default), those the CPU lacks marked to skip, saying why.

    A test parametrized with them runs, or lists as skipped, every kernel: ``pytest -rs`` on an AVX2-only CPU shows
    "CPU lacks AVX-512 VNNI (avx512f avx512bw avx512_vnni)" for each of its AVX-512 cases.
    """
    params = []
    for kernel in kernels or ISA_KERNELS:
        reason = skip_reason(kernel)
        params.append(pytest.param(kernel, id=kernel, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return params


def skip_reason(kernel: str) -> str | None:
    """Why a test of ``kernel`` cannot run here ("CPU lacks ..."), or None when it can."""
    lacks = missing_isa(kernel)
    return None if lacks is None else f"CPU lacks {lacks}"


def pytest_report_header(config) -> str | None:
    if CPU_FLAGS_VARIABLE in os.environ:
        return f"{CPU_FLAGS_VARIABLE}={os.environ[CPU_FLAGS_VARIABLE]}: kernel tests go by the CPU flags {' '.join(sorted(assumed_cpu_flags()))}"
    return None


def run(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """First output of ``model`` in a plain onnxruntime CPU session."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def random_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform [0, 1) float32 inputs for every graph input, symbolic dims set to ``batch``."""
    rng = np.random.default_rng(seed)
    init = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = rng.random(dims, dtype=np.float32)
    return feeds


def op_counts(model: onnx.ModelProto) -> Counter:
    """How many nodes of each op type the main graph has."""
    return Counter(n.op_type for n in model.graph.node)


def assert_op_counts(model: onnx.ModelProto, **expected: int) -> None:
    """Check the number of nodes of each named op type."""
    counts = op_counts(model)
    assert {k: counts.get(k, 0) for k in expected} == expected, dict(counts)


def step_tensor(model: onnx.ModelProto) -> str:
    """The (N, C) or (N, 1) steps an ASQ adapter computes in ``model`` (the Mul of its per-sample factor by the channel steps)."""
    return next(n.output[0] for n in model.graph.node if n.op_type == "Mul" and any(i.endswith("_asq_channel_steps") for i in n.input))


def decode_int_tensor(tensor: onnx.TensorProto) -> np.ndarray:
    """Integer codes of an INT8 or packed INT4 initializer, decoded here without onnxq's helpers."""
    shape = tuple(tensor.dims)
    if tensor.data_type == onnx.TensorProto.INT8:
        return np.frombuffer(tensor.raw_data, dtype=np.int8).reshape(shape)
    assert tensor.data_type == onnx.TensorProto.INT4
    count = int(np.prod(shape))
    values = []
    for byte in tensor.raw_data:
        for nibble in (byte & 0xF, byte >> 4):
            values.append(nibble - 16 if nibble >= 8 else nibble)
    return np.array(values[:count], dtype=np.int8).reshape(shape)


def decode_matmul_nbits(codes: np.ndarray, scales: np.ndarray, k: int, bits: int) -> np.ndarray:
    """(N, K) weights of onnxruntime's MatMulNBits, decoded here from its layout without onnxq's helpers.

    ``codes`` (N, blocks, block * bits / 8): each code + 2^(bits-1) (the op's default zero point), 4-bit ones two a
    byte with the first in the low nibble; ``scales`` (N * blocks): one per block; the padding past K dropped.
    """
    n, blocks, _ = codes.shape
    if bits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(n, blocks, -1)
    values = codes.astype(np.int16) - (1 << (bits - 1))
    return (values * scales.astype(np.float32).reshape(n, blocks, 1)).reshape(n, -1)[:, :k]


#: float32's unit roundoff and its smallest subnormal: the bounds of one rounding to float32.
UNIT_ROUNDOFF32 = 2.0**-24
TINY32 = float(np.finfo(np.float32).smallest_subnormal)


def onnx_dequantize(codes: np.ndarray, scale: np.ndarray, sqrt: bool, axis: int | None = 0) -> np.ndarray:
    """Int8 codes decoded by onnxruntime as onnxq's QDQ graphs decode them: DequantizeLinear (per ``axis``, or per tensor
    for a scalar scale), then, in sqrt mode, Mul(y, Abs(y)). What a quantized model computes, bit for bit, and no
    code of onnxq's."""
    scale = np.asarray(scale, np.float32)
    dq = dict(axis=axis) if scale.ndim else {}
    nodes = [onnx.helper.make_node("DequantizeLinear", ["codes", "scale"], ["y"], **dq)]
    if sqrt:
        nodes += [onnx.helper.make_node("Abs", ["y"], ["magnitude"]), onnx.helper.make_node("Mul", ["y", "magnitude"], ["out"])]
    graph = onnx.helper.make_graph(
        nodes,
        "decode",
        [onnx.helper.make_tensor_value_info("codes", onnx.TensorProto.INT8, None)],
        [onnx.helper.make_tensor_value_info("out" if sqrt else "y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(scale, "scale")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    return run(model, {"codes": np.asarray(codes, np.int8)})


def exact_decode(codes: np.ndarray, scale: np.ndarray, sqrt: bool, axis: int | None = 0) -> np.ndarray:
    """The decoded weights in float64 from the definition: w = q * s, or sign(q) * (q * s)**2 in sqrt mode (no float32)."""
    codes = np.asarray(codes).astype(np.float64)
    scale = np.asarray(scale, np.float64)
    if scale.ndim:
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    return np.sign(codes) * (codes * scale) ** 2 if sqrt else codes * scale


def assert_float32_decode(got: np.ndarray, codes: np.ndarray, scale: np.ndarray, sqrt: bool, axis: int | None = 0) -> None:
    """``got`` is float32 and within the float32 roundings of the exact decode: one (q * s) or two (then its square),
    each at most a relative UNIT_ROUNDOFF32 or, below the normal range, half a subnormal. Forgetting the square, the
    sign or squaring the code before the scale is off by far more."""
    assert got.dtype == np.float32
    exact = exact_decode(codes, scale, sqrt, axis)
    factors = 3 if sqrt else 1  # (q s (1 + d1))**2 (1 + d2) in sqrt mode
    bound = ((1 + UNIT_ROUNDOFF32) ** factors - 1) * np.abs(exact) + TINY32
    error = np.abs(got.astype(np.float64) - exact)
    assert np.all(error <= bound), f"worst: {float(np.max(error - bound))} past the bound"


def float_equivalent(quantized: onnx.ModelProto) -> onnx.ModelProto:
    """The quantized model with each decoded weight (DequantizeLinear, or Cast and Mul; then sqrt mode's y*|y|) computed
    in numpy (decoded_weights) into a float initializer, and the decoding nodes dropped.

    An independent reading of what the rewritten graph should compute.
    """
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    graph = model.graph
    decoded = decoded_weights(model)
    dropped = {id(node) for weight in decoded for node in weight.nodes}
    keep = [node for node in graph.node if id(node) not in dropped]
    used = _read_names(keep) | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(onnx.numpy_helper.from_array(w.values, w.output) for w in decoded if w.output in used)
    return model


#: The two forms in which onnxq's models decode a stored weight: DequantizeLinear (with quantized activations), and
#: Cast of the codes times a constant scale, which onnxruntime folds when it loads the model (weight-only models;
#: 4-bit codes there are unpacked from uint8 halves instead of Cast from int4: HALVES_FORM's nodes in the Cast's place).
DQ_FORM = "DequantizeLinear"
CAST_FORM = "Cast+Mul"


def unpack_halves_here(packed: np.ndarray, count: int) -> np.ndarray:
    """4-bit codes stored as halves (byte i: code i + 8 in its low nibble, code i + ceil(n/2) + 8 in its high one)."""
    raw = [int(b) for b in np.asarray(packed, dtype=np.uint8).ravel()]
    nibbles = [b & 0xF for b in raw] + [b >> 4 for b in raw]
    return np.array([v - 8 for v in nibbles[:count]], dtype=np.int8)


def _halves(signed: onnx.NodeProto, constants: dict[str, onnx.TensorProto],
            producers: dict[str, onnx.NodeProto]) -> tuple[onnx.TensorProto, tuple[onnx.NodeProto, ...]] | None:
    """For Sub(Cast(Reshape(Concat(Mod(packed, 16), BitShift(packed, 4)) [Slice], shape)), 8): an INT4 tensor of the
    codes (named as the packed bytes) and the unpacking nodes, the Cast to float first; else None."""
    cast = producers.get(signed.input[0]) if signed.op_type == "Sub" else None
    reshape = producers.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
    if reshape is None or reshape.op_type != "Reshape" or reshape.input[1] not in constants:
        return None
    assert float(onnx.numpy_helper.to_array(constants[signed.input[1]])) == 8.0, "the halves' offset is 8"
    chain = [reshape]
    halves = producers.get(reshape.input[0])
    if halves is not None and halves.op_type == "Slice":
        chain.append(halves)
        halves = producers.get(halves.input[0])
    if halves is None or halves.op_type != "Concat":
        return None
    low, high = producers.get(halves.input[0]), producers.get(halves.input[1])
    if low is None or low.op_type != "Mod" or high is None or high.op_type != "BitShift" or high.input[0] not in constants:
        return None
    assert _attribute(high, "direction", b"") == b"RIGHT" and int(onnx.numpy_helper.to_array(constants[high.input[1]])) == 4
    assert low.input[0] == high.input[0] and int(onnx.numpy_helper.to_array(constants[low.input[1]])) == 16
    packed = constants[high.input[0]]
    shape = [int(d) for d in onnx.numpy_helper.to_array(constants[reshape.input[1]])]
    codes = unpack_halves_here(onnx.numpy_helper.to_array(packed), int(np.prod(shape))).reshape(shape)
    nibbles = [int(v) & 0xF for v in codes.ravel()] + [0]  # as ONNX packs INT4 (decode_int_tensor reads it back)
    raw = bytes(nibbles[i] | (nibbles[i + 1] << 4) for i in range(0, codes.size, 2))
    tensor = onnx.TensorProto(name=packed.name, data_type=onnx.TensorProto.INT4, dims=shape, raw_data=raw)
    return tensor, (cast, low, high, halves, *reversed(chain), signed)


#: Integer element types of stored codes, as numpy types (INT4 is read by decode_int_tensor).
_CODE_TYPES = {onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT4: np.int8}
_FLOAT_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class DecodedWeight:
    """A weight a model computes from stored integer codes, read here without onnxq's helpers.

    ``scale`` is the stored scale flattened: one value per channel along ``axis``, or a scalar (``axis`` None); in the
    Cast form ``scale_shape`` is how the initializer is shaped to broadcast. ``values`` is the weight as the graph
    computes it ((codes - zero point) * scale in the scale's float type, then y*|y| in sqrt mode); ``output`` is the name
    of the tensor holding it, which the weighted nodes read; ``nodes`` are the nodes that compute it.
    """

    form: str
    codes_name: str
    codes_type: int
    codes: np.ndarray
    scale_name: str
    scale: np.ndarray
    scale_shape: tuple[int, ...]
    axis: int | None
    zero_point: np.ndarray | None
    sqrt: bool
    values: np.ndarray
    output: str
    nodes: tuple[onnx.NodeProto, ...]


def _all_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """A graph and every If/Loop/Scan body in it, nested ones included."""
    graphs = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                graphs += _all_graphs(body)
    return graphs


def _scope(model: onnx.ModelProto | onnx.GraphProto) -> tuple[dict[str, onnx.TensorProto], dict[str, onnx.NodeProto], dict[str, list]]:
    """Constants (initializers and Constant nodes' values), producers and readers of every name, bodies included."""
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    constants: dict[str, onnx.TensorProto] = {}
    producers: dict[str, onnx.NodeProto] = {}
    readers: dict[str, list] = {}
    for g in _all_graphs(graph):
        constants.update((t.name, t) for t in g.initializer)
        for node in g.node:
            producers.update((out, node) for out in node.output)
            for name in node.input:
                readers.setdefault(name, []).append(node)
            if node.op_type == "Constant" and node.attribute[0].name == "value":
                constants[node.output[0]] = node.attribute[0].t
    return constants, producers, readers


def _codes(tensor: onnx.TensorProto) -> np.ndarray:
    if tensor.data_type == onnx.TensorProto.INT4 or (tensor.data_type == onnx.TensorProto.INT8 and tensor.raw_data):
        return decode_int_tensor(tensor)
    return onnx.numpy_helper.to_array(tensor)


def _attribute(node: onnx.NodeProto, name: str, default):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else onnx.helper.get_attribute_value(found)


def _decoder(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]) -> tuple | None:
    """(form, codes tensor, scale tensor, axis, zero point tensor, decoding nodes) if ``node`` decodes stored codes; else None."""
    codes_name, decoding = (node.input[0] if node.input else ""), (node,)
    widen = producers.get(codes_name) if node.op_type == "DequantizeLinear" else None
    if widen is not None and widen.op_type == "Cast" and widen.input[0] in constants and _attribute(widen, "to", None) == onnx.TensorProto.INT8:
        codes_name, decoding = widen.input[0], (widen, node)  # int4 codes widened to int8 in front of the DequantizeLinear
    if node.op_type == "DequantizeLinear" and codes_name in constants and constants[codes_name].data_type in _CODE_TYPES:
        assert _attribute(node, "block_size", 0) == 0, "blocked DequantizeLinear is not read here"
        scale = constants[node.input[1]]
        zero_point = constants[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        axis = _attribute(node, "axis", 1) if len(scale.dims) else None
        return DQ_FORM, constants[codes_name], scale, axis, zero_point, decoding
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    for cast_out, scale_name in (tuple(node.input), tuple(reversed(node.input))):
        cast = producers.get(cast_out)
        unpacked = _halves(cast, constants, producers) if cast is not None and scale_name in constants else None
        if unpacked is not None and constants[scale_name].data_type in _FLOAT_NP:
            codes, scale, dims = unpacked[0], constants[scale_name], list(constants[scale_name].dims)
            channels = [i for i, d in enumerate(dims) if d != 1]
            return CAST_FORM, codes, scale, (channels[0] if channels else None), None, (*unpacked[1], node)
        if (cast is None or cast.op_type != "Cast" or cast.input[0] not in constants or scale_name not in constants
                or constants[cast.input[0]].data_type not in _CODE_TYPES or constants[scale_name].data_type not in _FLOAT_NP):
            continue
        scale, codes = constants[scale_name], constants[cast.input[0]]
        assert _attribute(cast, "to", None) == scale.data_type, "the Cast gives the scale's float type"
        dims = list(scale.dims)
        assert not dims or len(dims) == len(codes.dims), f"scale {dims} does not broadcast along one axis of {list(codes.dims)}"
        channels = [i for i, d in enumerate(dims) if d != 1]
        assert len(channels) <= 1 and all(dims[i] == codes.dims[i] for i in channels), f"scale {dims} for codes {list(codes.dims)}"
        return CAST_FORM, codes, scale, (channels[0] if channels else None), None, (cast, node)
    return None


def _squaring(name: str, readers: dict[str, list]) -> tuple[str, tuple[onnx.NodeProto, ...]] | None:
    """If ``name`` is only squared as sqrt mode squares (Abs, then Mul(y, |y|)): the square's name and the two nodes."""
    users = readers.get(name, [])
    absolute = next((n for n in users if n.op_type == "Abs"), None)
    if absolute is None or len(users) != 2:
        return None
    square = next((n for n in users if n.op_type == "Mul" and sorted(n.input) == sorted([name, absolute.output[0]])), None)
    return None if square is None else (square.output[0], (absolute, square))


def decoded_weights(model: onnx.ModelProto | onnx.GraphProto) -> list[DecodedWeight]:
    """Every weight the model decodes from stored codes, in either form, control-flow bodies included."""
    constants, producers, readers = _scope(model)
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    found = []
    for g in _all_graphs(graph):
        for node in g.node:
            if (decoder := _decoder(node, constants, producers)) is None:
                continue
            form, codes_tensor, scale_tensor, axis, zero_tensor, nodes = decoder
            codes, scale = _codes(codes_tensor), onnx.numpy_helper.to_array(scale_tensor)
            zero_point = None if zero_tensor is None else onnx.numpy_helper.to_array(zero_tensor)
            dtype = _FLOAT_NP[scale_tensor.data_type]
            flat = scale.reshape(-1) if axis is not None else scale.reshape(())
            shape = [1] * codes.ndim
            if axis is not None:
                shape[axis] = -1
            shifted = codes.astype(np.int32) - (0 if zero_point is None else zero_point.astype(np.int32).reshape(flat.shape).reshape(shape))
            values = (shifted.astype(dtype) * flat.reshape(shape)).astype(dtype)
            output, sqrt = nodes[-1].output[0], False
            if (squared := _squaring(output, readers)) is not None:
                output, sqrt, nodes = squared[0], True, nodes + squared[1]
                values = values * np.abs(values)
            users = readers.get(output, [])
            if len(users) == 1 and users[0].op_type == "Cast" and _attribute(users[0], "to", None) in _FLOAT_NP:  # to the weight's type
                output, nodes = users[0].output[0], nodes + (users[0],)
                values = values.astype(_FLOAT_NP[_attribute(users[0], "to", None)])
            found.append(DecodedWeight(form, codes_tensor.name, codes_tensor.data_type, codes, scale_tensor.name, flat,
                                       tuple(scale_tensor.dims), axis, zero_point, sqrt, values, output, nodes))
    return found


def decoded_weight(model: onnx.ModelProto | onnx.GraphProto, name: str) -> DecodedWeight | None:
    """The decoded weight held by tensor ``name`` (a weighted node's input), or None if it is not one."""
    return next((w for w in decoded_weights(model) if w.output == name), None)


def weight_of(model: onnx.ModelProto | onnx.GraphProto, node_name: str, index: int = 1) -> DecodedWeight:
    """The decoded weight the named node reads at input ``index`` (through Identity/Transpose/Reshape-free paths only)."""
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    node = next(n for g in _all_graphs(graph) for n in g.node if n.name == node_name)
    weight = decoded_weight(model, node.input[index])
    assert weight is not None, f"{node_name} input {index} ({node.input[index]}) is not a decoded weight"
    return weight


def decoded_weight_counts(model: onnx.ModelProto | onnx.GraphProto) -> Counter:
    """How many weights the model decodes in each form (DQ_FORM, CAST_FORM)."""
    return Counter(w.form for w in decoded_weights(model))


def _read_names(nodes: list[onnx.NodeProto]) -> set[str]:
    """Names the nodes read, the nodes of their If/Loop/Scan bodies included (a body may read outer values)."""
    names: set[str] = set()
    for node in nodes:
        names.update(node.input)
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                names |= _read_names(list(body.node)) | {o.name for o in body.output}
    return names


@pytest.fixture
def shipped_resnet() -> Path:
    path = MODELS / "fmnist_resnet20.onnx"
    assert path.exists(), "models/fmnist_resnet20.onnx is part of the repository"
    return path


def splitmix64(number: int) -> int:
    """splitmix64's finaliser in Python integers, written out from its definition: the moments' offset hash, for the tests' references."""
    mask = 2**64 - 1
    number ^= number >> 30
    number = number * 0xBF58476D1CE4E5B9 & mask
    number ^= number >> 27
    number = number * 0x94D049BB133111EB & mask
    return number ^ (number >> 31)


def grid_values(codes: np.ndarray, scale: np.ndarray, mode: str, bits: int) -> np.ndarray:
    """The float32 values codes (R, K) stand for at per-row ``scale`` (R,) or a scale per code (R, K), written out for
    each grid (float64 result): c s, (c s)|c s|, or POST's levels sqrt(2)^-(M - |c|) times s."""
    s = scale.astype(np.float32) if np.ndim(scale) == 2 else scale.astype(np.float32)[:, None]
    c = codes.astype(np.float32)
    if mode == "plain":
        return (c * s).astype(np.float64)
    if mode == "sqrt":
        y = c * s
        return (y * np.abs(y)).astype(np.float64)
    m = 2 ** (bits - 1) - 1
    levels = np.where(codes == 0, 0.0, np.sqrt(2.0) ** -(m - np.abs(codes).astype(np.float64))).astype(np.float32)
    return (np.sign(c) * levels * s).astype(np.float64)


def coordinate_descent_reference(rows: np.ndarray, h: np.ndarray, scale: np.ndarray, codes: np.ndarray, mode: str, bits: int,
                                 sweeps: int) -> np.ndarray:
    """Row by row, column by column: every code of the range tried with the whole error recomputed, the best kept if it
    lowers the error; a row stops after ``sweeps`` or after a sweep that changed nothing. ``scale``: as grid_values'."""
    q = 2 ** (bits - 1) - 1
    out = codes.astype(np.int64).copy()
    for r in range(len(rows)):
        def error(row_codes: np.ndarray, r: int = r) -> float:
            e = rows[r] - grid_values(row_codes[None], scale[r : r + 1], mode, bits)[0]
            return float(e @ h @ e)

        for _ in range(sweeps):
            changed = False
            for j in range(rows.shape[1]):
                best, best_error = out[r, j], error(out[r])
                for c in range(-q, q + 1):
                    trial = out[r].copy()
                    trial[j] = c
                    if error(trial) < best_error:
                        best, best_error = c, error(trial)
                changed |= best != out[r, j]
                out[r, j] = best
            if not changed:
                break
    return out


def obq_reference(rows: np.ndarray, h: np.ndarray, scale: np.ndarray, bits: int, order: list[int]) -> np.ndarray:
    """Plain-grid codes by OBQ's rule with the explicit H^-1 update, columns taken in ``order`` (independent of the Cholesky form).

    ``scale``: each row's step (R,), or each code's (R, K).
    """
    w = rows.astype(np.float64).copy()
    inverse = np.linalg.inv(h)
    q = 2 ** (bits - 1) - 1
    codes = np.zeros(w.shape, dtype=np.int64)
    left = list(order)
    for j in order:
        left.remove(j)
        step = scale[:, j] if np.ndim(scale) == 2 else scale
        codes[:, j] = np.clip(np.rint(w[:, j] / step), -q, q)
        err = (w[:, j] - codes[:, j] * step) / inverse[j, j]
        w[:, left] -= np.outer(err, inverse[j, left])
        inverse = inverse - np.outer(inverse[:, j], inverse[j, :]) / inverse[j, j]
    return codes
