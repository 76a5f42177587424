"""Bias correction: the shift it computes equals the mean output change measured directly (numpy)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibrate.bias_analytic import conv_shift, correct_biases, gemm_shift


def _conv_valid(x: np.ndarray, w: np.ndarray, group: int) -> np.ndarray:
    """Direct 2-D convolution without padding, (N, C, H, W) * (M, C/group, kh, kw)."""
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    out = np.zeros((n, m, h - kh + 1, wd - kw + 1))
    for o in range(m):
        g = o // (m // group)
        for ky in range(kh):
            for kx in range(kw):
                patch = x[:, g * cg : (g + 1) * cg, ky : ky + out.shape[2], kx : kx + out.shape[3]]
                out[:, o] += np.einsum("nchw,c->nhw", patch, w[o, :, ky, kx])
    return out


@pytest.mark.parametrize("channels,out_channels,group", [(4, 6, 1), (4, 6, 2), (6, 6, 6)])
def test_conv_shift_is_the_mean_output_change(channels, out_channels, group):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, channels, 7, 7)) + rng.uniform(-1, 2, (1, channels, 1, 1))
    w = rng.standard_normal((out_channels, channels // group, 3, 3))
    delta = rng.standard_normal(w.shape) * 0.05
    measured = (_conv_valid(x, w + delta, group) - _conv_valid(x, w, group)).mean(axis=(0, 2, 3))
    # Means over the positions each window sees equal the channel means only when every pixel is seen
    # equally often; use constant-per-channel inputs for an exact check, random ones for a close one.
    flat = np.broadcast_to(x.mean(axis=(0, 2, 3))[None, :, None, None], x.shape)
    exact = (_conv_valid(flat, w + delta, group) - _conv_valid(flat, w, group)).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(conv_shift(delta, x.mean(axis=(0, 2, 3)), group), exact, rtol=1e-10)
    np.testing.assert_allclose(conv_shift(delta, x.mean(axis=(0, 2, 3)), group), measured, atol=0.1 * np.abs(measured).max() + 1e-3)


@pytest.mark.parametrize("trans_b", [True, False])
def test_gemm_shift_is_the_mean_output_change(trans_b):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((50, 8)) + 1.0
    b = rng.standard_normal((3, 8) if trans_b else (8, 3))
    delta = rng.standard_normal(b.shape) * 0.1
    product = (lambda m: a @ m.T) if trans_b else (lambda m: a @ m)
    measured = (product(b + delta) - product(b)).mean(axis=0)
    np.testing.assert_allclose(gemm_shift(delta, a.mean(axis=0), trans_b), measured, rtol=1e-10)


def test_correct_biases_adds_a_missing_bias_and_leaves_shared_ones():
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    shared = numpy_helper.from_array(np.zeros(2, np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y1"], name="no_bias"),
        helper.make_node("Conv", ["x", "w", "b"], ["y2"], name="shared1"),
        helper.make_node("Conv", ["y2", "w", "b"], ["y3"], name="shared2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y3", TensorProto.FLOAT, None)], [w, shared])
    delta = np.full((2, 2, 1, 1), 0.5)
    assert correct_biases(graph, {"w": delta}, {"x": np.array([1.0, 3.0])}) == {"y1": graph.node[0].input[2]}
    added = {t.name: numpy_helper.to_array(t) for t in graph.initializer}[graph.node[0].input[2]]
    np.testing.assert_allclose(added, [-2.0, -2.0])  # 0.5 * 1 + 0.5 * 3 per output, subtracted
    assert list(graph.node[1].input) == ["x", "w", "b"]
    assert len(graph.node) == 3 and all(n.op_type == "Conv" for n in graph.node)
