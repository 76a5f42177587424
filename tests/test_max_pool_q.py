"""MaxPoolQ (csrc/kernels/max_pool_q.h): DequantizeLinear -> MaxPool -> QuantizeLinear on uint8 codes in one op.

The int format's rewrite (onnxq/rewrite/between.py, pool_codes) puts it between two IntConvQ with the same outputs,
bit for bit, and leaves MaxPools with padding alone. Every shape (a column pooled by pairs, CREPE's, whose fast path
takes 16 outputs at a time and leaves a tail; 2-D windows with other strides; a window past which rows are dropped)
equals a numpy model of the definition bit for bit, and the three ONNX ops in onnxruntime too, with the same step in
and out (the table left out) and with other steps (where many quotients are exact ties and saturate at 0 and 255);
malformed uses are clear errors.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq.pipeline
from onnxq.config import ActivationConfig, QuantizeConfig, WeightFormat
from onnxq.native.domain import DOMAIN
from onnxq.native.session import session
from onnxq.pipeline import quantize_with_report

U8 = TensorProto.UINT8
SHAPES = [  # (N, C, H, W), kernel, strides
    ((2, 3, 257, 1), (2, 1), (2, 1)),
    ((1, 128, 256, 1), (2, 1), (2, 1)),
    ((2, 2, 9, 7), (2, 2), (2, 2)),
    ((1, 3, 11, 8), (3, 2), (2, 1)),
    ((3, 1, 5, 1), (5, 1), (1, 1)),
]
STEPS = {  # x_scale, x_zero_point, y_scale, y_zero_point
    "same": (0.1, 11, 0.1, 11),
    "rescaled": (0.5, 100, 0.25, 130),  # D(q) / y_scale = 2 (q - 100): saturates both ways
    "ties": (0.75, 3, 0.5, 40),  # D(q) / y_scale = 1.5 (q - 3): an exact tie for every odd q - 3
}


def _pool_model(kernel, strides, steps, with_strides: bool = True) -> bytes:
    s_x, z_x, s_y, z_y = steps
    inits = [numpy_helper.from_array(np.array(s_x, np.float32), "sx"), numpy_helper.from_array(np.array(z_x, np.uint8), "zx"),
             numpy_helper.from_array(np.array(s_y, np.float32), "sy"), numpy_helper.from_array(np.array(z_y, np.uint8), "zy")]
    attributes = dict(kernel_shape=list(kernel), **({"strides": list(strides)} if with_strides else {}))
    node = helper.make_node("MaxPoolQ", ["x", "sx", "zx", "sy", "zy"], ["y"], domain=DOMAIN, **attributes)
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", U8, None)], [helper.make_tensor_value_info("y", U8, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]).SerializeToString()


def _onnx_ops(kernel, strides, steps) -> bytes:
    """The same as onnxruntime's own DequantizeLinear -> MaxPool -> QuantizeLinear."""
    s_x, z_x, s_y, z_y = steps
    inits = [numpy_helper.from_array(np.array(s_x, np.float32), "sx"), numpy_helper.from_array(np.array(z_x, np.uint8), "zx"),
             numpy_helper.from_array(np.array(s_y, np.float32), "sy"), numpy_helper.from_array(np.array(z_y, np.uint8), "zy")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["d"]),
             helper.make_node("MaxPool", ["d"], ["m"], kernel_shape=list(kernel), strides=list(strides)),
             helper.make_node("QuantizeLinear", ["m", "sy", "zy"], ["y"])]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", U8, None)], [helper.make_tensor_value_info("y", U8, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _numpy(x: np.ndarray, kernel, strides, steps) -> np.ndarray:
    """The definition: the largest code of each window, dequantized (one float32 multiply), quantized (float32 division)."""
    s_x, z_x, s_y, z_y = steps
    (kh, kw), (sh, sw) = kernel, strides
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    largest = np.zeros((n, c, oh, ow), np.uint8)
    for ky in range(kh):
        for kx in range(kw):
            largest = np.maximum(largest, x[:, :, ky : ky + sh * (oh - 1) + 1 : sh, kx : kx + sw * (ow - 1) + 1 : sw])
    value = (largest.astype(np.int32) - z_x).astype(np.float32) * np.float32(s_x)
    q = np.rint(value / np.float32(s_y)) + np.float32(z_y)
    assert q.dtype == np.float32
    return np.clip(q, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("steps", list(STEPS), ids=str)
@pytest.mark.parametrize(("shape", "kernel", "strides"), SHAPES, ids=str)
def test_max_pool_q_equals_numpy_and_the_onnx_ops_bit_for_bit(shape, kernel, strides, steps):
    x = np.random.default_rng(zlib.crc32(repr((shape, steps)).encode())).integers(0, 256, shape).astype(np.uint8)
    want = _numpy(x, kernel, strides, STEPS[steps])
    if steps != "same":
        assert np.mean(want == 0) + np.mean(want == 255) > 0.01 or steps == "ties"
    (got,) = session(_pool_model(kernel, strides, STEPS[steps])).run(None, {"x": x})
    np.testing.assert_array_equal(got, want)
    (onnx_ops,) = session(_onnx_ops(kernel, strides, STEPS[steps])).run(None, {"x": x})
    np.testing.assert_array_equal(got, onnx_ops)


def test_strides_default_to_the_kernel():
    x = np.random.default_rng(1).integers(0, 256, (1, 2, 8, 6)).astype(np.uint8)
    (got,) = session(_pool_model((2, 3), None, STEPS["rescaled"], with_strides=False)).run(None, {"x": x})
    np.testing.assert_array_equal(got, _numpy(x, (2, 3), (2, 3), STEPS["rescaled"]))


@pytest.mark.parametrize(
    ("shape", "kernel", "steps", "match"),
    [
        ((1, 1, 1, 1), (2, 1), STEPS["same"], r"MaxPoolQ: X's H x W \(1 x 1\) is smaller than the kernel \(2 x 1\)"),
        ((1, 1, 4, 1), (2, 1), (0.0, 0, 0.1, 0), r"MaxPoolQ: x_scale and y_scale must be one positive, finite float32"),
        ((1, 4, 1), (2, 1), STEPS["same"], r"MaxPoolQ: input X must have rank 4"),
    ],
)
def test_malformed_uses_are_clear_errors(shape, kernel, steps, match):
    x = np.zeros(shape, np.uint8)
    with pytest.raises(Exception, match=match):
        session(_pool_model(kernel, kernel, steps)).run(None, {"x": x})


def _pooled_network(pads: list[int]) -> onnx.ModelProto:
    """x[N,3,12,12] -> Conv -> Relu -> BatchNorm -> MaxPool 2x2 (pads) -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm.

    (The BatchNormalization gives the pool's input and output steps of their own, as in CREPE.)
    """
    rng = np.random.default_rng(17)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) / 5).astype(np.float32), "w0"),
             numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) / 8).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((4, 8)) / 3).astype(np.float32), "fc"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "beta"),
             numpy_helper.from_array((rng.standard_normal(8) * 0.2).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), "var")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("BatchNormalization", ["r0", "g", "beta", "mean", "var"], ["n0"]),
             helper.make_node("MaxPool", ["n0"], ["m"], kernel_shape=[2, 2], strides=[2, 2], pads=pads),
             helper.make_node("Conv", ["m", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("pads", [[0, 0, 0, 0], [1, 1, 1, 1]], ids=["no-pads", "pads"])
def test_a_quantized_max_pool_runs_on_the_codes_and_changes_no_output(pads, monkeypatch):
    rng = np.random.default_rng(5)
    data = [{"x": rng.standard_normal((8, 3, 12, 12)).astype(np.float32)} for _ in range(4)]
    config = QuantizeConfig(bits=4, format=WeightFormat.INT, first_last_bits=None, activations=ActivationConfig())
    pooled = quantize_with_report(_pooled_network(pads), config, data).model
    with monkeypatch.context() as patch:
        patch.setattr(onnxq.pipeline, "pool_codes", lambda graph: 0)
        plain = quantize_with_report(_pooled_network(pads), config, data).model
    ops = [n.op_type for n in pooled.graph.node]
    if any(pads):  # (padding: the float MaxPool stays)
        assert "MaxPoolQ" not in ops and "MaxPool" in ops
    else:  # the codes go from conv to conv through the pool: IntConvQ -> MaxPoolQ -> IntConvQ
        assert "MaxPool" not in ops and ops.count("MaxPoolQ") == 1
        pool = next(n for n in pooled.graph.node if n.op_type == "MaxPoolQ")
        writers = {n.output[0]: n.op_type for n in pooled.graph.node}
        readers = [n.op_type for n in pooled.graph.node if pool.output[0] in n.input]
        assert writers[pool.input[0]] == "IntConvQ" and readers == ["IntConvQ"]
        inits = {t.name: numpy_helper.to_array(t) for t in pooled.graph.initializer}
        assert inits[pool.input[1]] != inits[pool.input[3]]  # its codes change step: the table is in use
    x = rng.standard_normal((6, 3, 12, 12)).astype(np.float32)
    (got,) = session(pooled.SerializeToString()).run(None, {"x": x})
    (want,) = session(plain.SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(got, want)
