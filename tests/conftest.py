"""Shared test helpers: running models in onnxruntime, counting ops, reading quantized weights independently."""

from __future__ import annotations

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

#: Values of the ops' ``kernel`` attribute, and the /proc/cpuinfo flags each SIMD kernel needs (as csrc/cpu.h checks).
KERNELS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
ISA_FLAGS = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512_vnni"}}


def kernel_supported(kernel: str) -> bool:
    """Whether this CPU can run the named kernel."""
    return ISA_FLAGS.get(kernel, set()) <= cpu_flags()
MODELS = REPO / "models"


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
