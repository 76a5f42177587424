"""Activation-weight equalization and optional activation sites: a BERT-style residual stream with outlier channels.

onnxq's W8A8 on a real BERT-style encoder (all-MiniLM-L6-v2, tools/eval_minilm.py) kept 2.6 dB of output SQNR: one
uint8 step per tensor cannot hold channels tens of times larger than the rest. Equalization moves part of those
channels' range into the weights, and the residual stream itself stays float where one step holds it badly.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibrate.equalize import ChannelStats, Equalization, Layer, apply, choose
from onnxq.calibrate.histogram import Histogram
from onnxq.calibrate.ranges import Range, range_sqnr_db
from onnxq.config import ActivationConfig, BiasCorrection, CalibrationMethod, QuantizeConfig
from onnxq.pipeline import quantize_with_report

OUTLIERS = (3, 11)  # channels tens of times larger than the rest


def encoder_block(seed: int = 0, d: int = 16, ff: int = 32) -> onnx.ModelProto:
    """A post-LayerNorm block with outlier channels, as BERT has them:

    x[N,T,d] -> LayerNorm(gamma large on two channels) = h -> MatMul(w1) -> Relu -> MatMul(w2) = f
    -> Add(h, f) (the residual) -> LayerNorm -> MatMul(w3) -> y[N,T,4]
    """
    rng = np.random.default_rng(seed)
    gamma = np.ones(d, np.float32)
    gamma[list(OUTLIERS)] = 40.0
    inits = {
        "gamma": gamma, "beta": np.zeros(d, np.float32), "gamma2": np.ones(d, np.float32), "beta2": np.zeros(d, np.float32),
        "w1": (rng.standard_normal((d, ff)) / np.sqrt(d)).astype(np.float32),
        "w2": (rng.standard_normal((ff, d)) / np.sqrt(ff)).astype(np.float32),
        "w3": (rng.standard_normal((d, 4)) / np.sqrt(d)).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln1", axis=-1),
        helper.make_node("MatMul", ["h", "w1"], ["a"], name="mm1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["f"], name="mm2"),
        helper.make_node("Add", ["h", "f"], ["s"], name="residual"),
        helper.make_node("LayerNormalization", ["s", "gamma2", "beta2"], ["n"], name="ln2", axis=-1),
        helper.make_node("MatMul", ["n", "w3"], ["y"], name="mm3"),
    ]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(count: int = 64, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 8, 16)).astype(np.float32)} for _ in range(count // 8)]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _sqnr(reference: np.ndarray, approx: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum((reference.astype(np.float64) - approx) ** 2)))


def test_apply_keeps_the_float_model_and_leaves_the_residual_reading_the_original():
    model = encoder_block()
    feeds = _data(8)[0]
    before = _run(model, feeds)
    scales = np.linspace(0.5, 4.0, 16)
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1")).copy()
    smoothed = apply(model.graph, Equalization("h", (Layer("mm1", "w1", 0),), scales, 0.5, 0.1))
    readers = {n.name: list(n.input) for n in model.graph.node}
    assert readers["mm1"][0] == smoothed and readers["residual"][0] == "h"  # the residual keeps the original
    new_w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"))
    np.testing.assert_allclose(new_w1, w1 * scales[:, None], rtol=1e-6)
    np.testing.assert_allclose(_run(model, feeds), before, rtol=1e-4, atol=1e-5)


def _simulated_error(x: np.ndarray, w: np.ndarray, scales: np.ndarray) -> float:
    """Squared error of x @ w computed with uint8 per-tensor x / s (min-max) and int8 per-column w * s, in numpy."""
    xs, ws = x / scales, w * scales[:, None]
    lo, hi = min(xs.min(), 0.0), max(xs.max(), 0.0)
    step = (hi - lo) / 255
    zero = np.round(-lo / step)
    xq = (np.clip(np.round(xs / step) + zero, 0, 255) - zero) * step
    wstep = np.abs(ws).max(axis=0) / 127
    wq = np.round(ws / wstep) * wstep
    return float(np.sum((x @ w - xq @ wq) ** 2))


def _stats(x: np.ndarray) -> ChannelStats:
    stats = ChannelStats()
    stats.add(x)
    return stats


def test_choose_equalizes_outlier_channels_and_the_real_error_falls():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 16))
    x[:, list(OUTLIERS)] *= 40
    w = rng.standard_normal((16, 24)) / 4
    scales, alpha, gain = choose(_stats(x), [w], 8, 8)
    assert alpha > 0 and gain < 0.5
    assert _simulated_error(x, w, scales) < 0.5 * _simulated_error(x, w, np.ones(16))  # independent of the estimate


def test_choose_leaves_even_channels_alone():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((512, 16)), rng.standard_normal((16, 24))
    scales, alpha, _ = choose(_stats(x), [w], 8, 8)
    assert alpha == 0.0 and np.array_equal(scales, np.ones(16))


def test_range_sqnr_matches_quantizing_the_values_themselves():
    rng = np.random.default_rng(0)
    values = rng.standard_normal(100_000)
    h = Histogram()
    h.add(values)
    r = Range(-3.0, 3.5)
    step = 6.5 / 255
    zero = np.round(3.0 / step)
    approx = (np.clip(np.round(values / step) + zero, 0, 255) - zero) * step
    direct = 10 * np.log10(np.sum(values**2) / np.sum((values - approx) ** 2))
    assert range_sqnr_db(h, r, 8) == pytest.approx(direct, abs=0.5)


def _w8a8(equalize: bool) -> tuple[float, list[str]]:
    config = QuantizeConfig(bits=8, activations=ActivationConfig(method=CalibrationMethod.MSE, bias_correction=BiasCorrection.OFF, equalize=equalize))
    result = quantize_with_report(encoder_block(), config, _data())
    feeds = {"x": np.concatenate([b["x"] for b in _data(64, seed=7)])}
    return _sqnr(_run(encoder_block(), feeds), _run(result.model, feeds)), [a.tensor for a in result.activations]


def test_w8a8_of_a_block_with_outlier_channels():
    """Equalization gains over 3 dB here (25.0 -> 29.2 dB); the residual sum, which one uint8 step holds badly, stays float."""
    plain, sites = _w8a8(equalize=False)
    equalized, eq_sites = _w8a8(equalize=True)
    assert equalized > plain + 3.0, (plain, equalized)
    assert "s" not in sites and "s" not in eq_sites  # the residual sum with its outliers: left float
    assert "h_equalized" in eq_sites and "h" not in eq_sites  # mm1 reads the equalized copy of h


def test_asq_does_not_equalize():
    assert not ActivationConfig(method=CalibrationMethod.ASQ).equalizing
    assert ActivationConfig(method=CalibrationMethod.MSE).equalizing and not ActivationConfig(equalize=False).equalizing
