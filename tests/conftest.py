"""Shared test helpers: running models in onnxruntime, counting ops, reading quantized weights independently."""

from __future__ import annotations

import os
import sys
from collections import Counter
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
    """The quantized model with each DequantizeLinear (+ Abs/Mul square) evaluated in numpy into a float initializer.

    An independent reading of what the rewritten graph should compute.
    """
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    values: dict[str, np.ndarray] = {}
    keep = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            codes = decode_int_tensor(inits[node.input[0]]).astype(np.float32)
            scale = onnx.numpy_helper.to_array(inits[node.input[1]])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.ndim == 1:
                shape = [1] * codes.ndim
                shape[axis] = -1
                scale = scale.reshape(shape)
            values[node.output[0]] = codes * scale
        elif node.op_type == "Abs" and node.input[0] in values:
            values[node.output[0]] = np.abs(values[node.input[0]])
        elif node.op_type == "Mul" and all(i in values for i in node.input):
            values[node.output[0]] = values[node.input[0]] * values[node.input[1]]
        else:
            keep.append(node)
    used = _read_names(keep)
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in values.items() if k in used)
    return model


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
