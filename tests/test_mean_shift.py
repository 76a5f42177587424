"""The mean output shift of weights quantized with data, folded into biases (onnxq/calibrate/mean_shift.py).

Folding is checked by what onnxruntime computes: the folded model's output minus the original's is the shift, on the
reader's channel axis, whatever form the bias takes. End to end, the quantized model's mean output per channel over
the calibration data equals the float model's (the shift was computed from the exact mean of the rows each layer
multiplies), and the fold makes the output closer than quantizing for the full second moments without it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import conv_bn_relu_gemm
from onnxq.calibrate.mean_shift import centered, fold_shifts, mean_shift, shift_sites
from onnxq.config import QuantizeConfig
from onnxq.pipeline import quantize
from onnxq.plan.weights import plan_weights


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0].astype(np.float64)


def _layer(case: str) -> tuple[onnx.ModelProto, np.ndarray, int]:
    """A one-layer model of ``case``, an input, and the output's channel axis."""
    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    inits = {}
    if case.startswith("conv"):
        x, inits["w"] = f32(2, 3, 5, 5), f32(4, 3, 3, 3)
        inputs = ["x", "w", "b"] if case == "conv with bias" else ["x", "w"]
        nodes = [helper.make_node("Conv", inputs, ["y"], name="layer", pads=[1, 1, 1, 1])]
        if case == "conv with bias":
            inits["b"] = f32(4)
        axis = 1
    elif case.startswith("gemm"):
        x, inits["w"] = f32(6, 5), f32(4, 5)
        with_c = case == "gemm with C"
        if with_c:
            inits["c"] = f32(1, 4)
        nodes = [helper.make_node("Gemm", ["x", "w", "c"] if with_c else ["x", "w"], ["y"], name="layer", transB=1, alpha=2.0, beta=0.5)]
        axis = 1
    elif case == "matmul then bias add":
        x, inits["w"], inits["b"] = f32(2, 3, 5), f32(5, 4), f32(4)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="layer"), helper.make_node("Add", ["m", "b"], ["y"], name="bias")]
        axis = -1
    elif case == "matmul alone":
        x, inits["w"] = f32(2, 3, 5), f32(5, 4)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")]
        axis = -1
    else:  # W @ x
        x, inits["w"] = f32(2, 5, 3), f32(4, 5)
        nodes = [helper.make_node("MatMul", ["w", "x"], ["y"], name="layer")]
        axis = -2
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), x, axis


CASES = ["conv with bias", "conv without bias", "gemm with C", "gemm without C", "matmul then bias add", "matmul alone", "W @ x"]


@pytest.mark.parametrize("case", CASES)
def test_the_fold_moves_the_output_by_the_shift(case):
    model, x, axis = _layer(case)
    plans, _ = plan_weights(model.graph, QuantizeConfig(bits=8, first_last_bits=None))
    sites = shift_sites(model.graph, plans)
    assert set(sites) == {"w"}
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    shift = np.array([0.5, -1.25, 2.0, 0.75])
    fold_shifts(folded.graph, {"w": (shift_sites(folded.graph, plans)["w"], shift)})
    difference = _run(folded, {"x": x}) - _run(model, {"x": x})
    scale = 2.0 if case.startswith("gemm") else 1.0  # Gemm's alpha multiplies what the weight contributes
    shape = [1] * difference.ndim
    shape[axis] = 4
    np.testing.assert_allclose(difference, np.broadcast_to(-scale * shift.reshape(shape), difference.shape), atol=1e-5)
    nodes = len(model.graph.node) + (case in ("matmul alone", "W @ x"))  # only a MatMul without a bias Add gets a new node
    assert len(folded.graph.node) == nodes


def test_shared_weights_and_other_readers_get_no_site():
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((3, 2)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["a", "w"], ["p"], name="m1"), helper.make_node("MatMul", ["b", "w"], ["q"], name="m2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 3]) for n in "ab"],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "pq"], [w])
    plans, _ = plan_weights(graph, QuantizeConfig(bits=8, first_last_bits=None))
    assert shift_sites(graph, plans) == {}


def test_centered_moments_and_shift_against_numpy():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 2, 3)) + np.array([3.0, -1.0, 0.5])  # (rows, groups, K)
    h = np.einsum("ngk,ngl->gkl", x, x) / len(x)
    mean = x.mean(axis=0)
    covariance = np.stack([np.cov(x[:, g].T, bias=True) for g in range(2)])
    np.testing.assert_allclose(centered(h, mean, kept=0.0), covariance, atol=1e-12)
    np.testing.assert_allclose(centered(h, mean, kept=0.25), covariance + 0.25 * np.einsum("gk,gl->gkl", mean, mean), atol=1e-12)
    fortran = np.asfortranarray(h)  # the moment sums of wide layers come in BLAS's column-major layout
    np.testing.assert_allclose(centered(fortran, mean, kept=0.0), covariance, atol=1e-12)
    np.testing.assert_array_equal(fortran, h)  # the input is left as it was
    for layout in (np.ascontiguousarray, np.asfortranarray):  # in place (an H no other weight reads): the same matrix, in h itself
        mine = layout(h.copy())
        got = centered(mine, mean, kept=0.0, in_place=True)
        assert got is mine
        np.testing.assert_allclose(mine, covariance, atol=1e-12)
    delta = rng.standard_normal((4, 3))  # rows 0-1 read group 0, rows 2-3 group 1
    want = [delta[r] @ mean[r // 2] for r in range(4)]
    np.testing.assert_allclose(mean_shift(delta, mean), want)


def _offset_inputs(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Images with a large mean (every pixel near 1.5), as after a Relu: H is then mostly E[x] E[x]^T."""
    rng = np.random.default_rng(seed)
    return [{"x": (1.5 + 0.3 * rng.standard_normal((8, 3, 8, 8))).astype(np.float32)} for _ in range(count // 8)]


def test_weight_only_with_data_keeps_each_channels_mean_and_is_closer():
    model = conv_bn_relu_gemm(with_bn=False, c=16)
    data = _offset_inputs(64, seed=1)
    config = QuantizeConfig(bits=3, first_last_bits=None, samples=64)  # the samples there are: every row is summed, none thinned
    folded = quantize(model, config, data)
    plain = quantize(model, dataclasses.replace(config, fold_mean_shift=False), data)
    assert len({t.name for t in folded.graph.initializer if "mean_shift" in t.name}) == 3  # conv1, conv2, fc
    # the first layer reads the data directly: its output's channel means over the calibration data are the float ones
    probe = [(m, helper.make_tensor_value_info("c1", TensorProto.FLOAT, None)) for m in (model, folded)]
    for m, info in probe:
        m.graph.output.insert(0, info)
    float_c1 = np.concatenate([_run(model, d) for d in data])
    folded_c1 = np.concatenate([_run(folded, d) for d in data])
    for m, _ in probe:
        del m.graph.output[0]
    np.testing.assert_allclose(folded_c1.mean(axis=(0, 2, 3)), float_c1.mean(axis=(0, 2, 3)), atol=1e-4 * float_c1.std())
    held_out = _offset_inputs(64, seed=2)
    ref = np.concatenate([_run(model, d) for d in held_out])
    errors = [np.sum((np.concatenate([_run(q, d) for d in held_out]) - ref) ** 2) for q in (folded, plain)]
    assert errors[0] < 0.8 * errors[1], errors
