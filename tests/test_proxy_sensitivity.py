"""Sensitivity from the layers' H-weighted errors (onnxq/analysis/proxy.py) against measured whole-model runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.analysis.proxy import ProxySensitivity
from onnxq.analysis.sensitivity import SensitivityAnalysis
from onnxq.config import QuantizeConfig


def _one_matmul() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((32, 16)) * 0.2).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(samples: int = 64) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    mixing = rng.standard_normal((4, 32))
    return [{"x": (rng.standard_normal((samples, 4)) @ mixing + 0.1 * rng.standard_normal((samples, 32))).astype(np.float32)}]


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_one_layer_prediction_is_the_measured_noise(bits):
    """With a single layer the model output is the layer output: c r(b) must equal the noise a run measures, at any width.

    Up to the planned width (4) the proxy prices GPTQ's codes with H (without the coordinate-descent refinement), wider
    ones the codes quantized for their own error (ProxySensitivity.priced): the measured run gets the same codes, so only
    the noise estimate differs.
    """
    import functools

    config = QuantizeConfig(bits=4, first_last_bits=None)
    proxy = ProxySensitivity(_one_matmul(), config, _data())
    measured = SensitivityAnalysis(_one_matmul(), config, _data())
    if bits <= config.bits:
        measured.hessian = proxy.hessian
        measured.dequantized = functools.partial(SensitivityAnalysis.dequantized, measured, refined=False)
    assert proxy.layer("w", bits).noise == pytest.approx(measured.layer("w", bits).noise, rel=1e-3)
    assert proxy.layer("w", bits).model_sqnr_db == pytest.approx(measured.layer("w", bits).model_sqnr_db, abs=0.01)


@pytest.mark.parametrize("mode", ["proxy", "measured"])
def test_cli_mixed_precision_either_way(tmp_path, capsys, mode):
    """--target-size with either sensitivity: a model is written, and the raised layers fit the budget."""
    from models import conv_bn_relu_gemm
    from onnxq.cli import main

    path, data = tmp_path / "m.onnx", tmp_path / "x.npy"
    onnx.save(conv_bn_relu_gemm(), path)
    np.save(data, np.random.default_rng(3).standard_normal((16, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(path), "-b", "2", "--first-last-bits", "2", "--calibration", str(data), "--activations", "none",
                 "--sensitivity", mode, "--target-size", "5bits", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mixed precision (budget" in printed and out.exists()


def test_layers_inside_an_if_are_measured_with_the_codes_their_h_gives():
    """A body layer gets H through the branch the data take (numpy: the mean outer product of its inputs), is measured
    by a run rather than predicted, and that run's codes are the ones its H gives, as the quantizer writes them."""
    from models import network_in_if

    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((8, 16)).astype(np.float32), "cond": np.array(True)} for _ in range(8)]
    config = QuantizeConfig(bits=4, first_last_bits=None)
    proxy = ProxySensitivity(network_in_if(), config, feeds)
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    h = proxy.hessian("w1")
    assert h is not None
    np.testing.assert_allclose(h[0], x.T @ x / len(x), rtol=1e-5, atol=1e-6)
    assert not proxy.predicted("w1") and "w_else" not in proxy.hessians
    with_h = proxy.dequantized("w1", 4)
    assert not np.array_equal(with_h, proxy.dequantized("w1", 4, with_hessian=False))
    layer = proxy.layer("w1", 4)
    assert layer.noise == pytest.approx(proxy.probe.run({"w1": with_h}).model.noise, rel=1e-9)


def test_the_reference_is_the_float_run_and_the_signal_its_energy():
    """The probe's float reference (a session holding the weights as constants) is the float model's output on each
    batch (numpy), and the signal every noise is measured against their energy."""
    data = [{"x": x} for x in np.split(_data(48)[0]["x"], 3)]
    proxy = ProxySensitivity(_one_matmul(), QuantizeConfig(bits=4, first_last_bits=None), data)
    w = numpy_helper.to_array(_one_matmul().graph.initializer[0]).astype(np.float64)
    expected = [b["x"].astype(np.float64) @ w for b in data]
    for want, kept in zip(expected, proxy.probe.reference, strict=True):
        np.testing.assert_allclose(kept["y"], want, rtol=1e-5, atol=1e-5)
    assert proxy.signal == pytest.approx(sum(float(np.sum(y**2)) for y in expected), rel=1e-5)


def test_whole_model_runs_with_constant_weights_measure_what_overridden_inputs_do():
    """A whole-model run in a session holding the weights as constants gives the noise the session with the weights fed
    as inputs gives (the same arithmetic, pre-packed), and the same widths are run once."""
    from models import network_in_if

    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((8, 16)).astype(np.float32), "cond": np.array(True)} for _ in range(4)]
    analysis = SensitivityAnalysis(network_in_if(), QuantizeConfig(bits=3, first_last_bits=None), feeds)
    bits = {p.tensor: p.bits for p in analysis.plans}
    weights = {t: analysis.dequantized(t, b) for t, b in bits.items()}
    assert analysis.combined(bits).model.noise == pytest.approx(analysis.probe.run(weights).model.noise, rel=1e-5)
    assert analysis.combined(bits) is analysis.combined(dict(reversed(bits.items())))
    before = [t.SerializeToString() for t in analysis.model.graph.initializer]
    analysis.probe.run_constants({t: w * 2 for t, w in weights.items()})
    assert [t.SerializeToString() for t in analysis.model.graph.initializer] == before  # swapped back after serializing


def _pointwise_depthwise_pointwise() -> onnx.ModelProto:
    """x[N,4,6,6] -> Conv 1x1 (4->8) -> Relu -> depthwise 3x3 (8) -> Relu -> Conv 1x1 (8->4) -> y."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
             for name, shape in (("pw1", (8, 4, 1, 1)), ("dw", (8, 1, 3, 3)), ("pw2", (4, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "pw1"], ["a"], name="pw1"), helper.make_node("Relu", ["a"], ["ra"], name="r1"),
             helper.make_node("Conv", ["ra", "dw"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["rd"], name="r2"), helper.make_node("Conv", ["rd", "pw2"], ["y"], name="pw2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_8_bit_depthwise_layer_gets_no_h_and_is_priced_by_its_weight_error(monkeypatch):
    """The quantizer rounds 8-bit depthwise layers without H, so the proxy sums none for them and runs none for them.

    Their r is the weight's relative error: checked against per-channel max|w| codes at 8 bits computed here (what the
    data-free rounding gives at 8 bits).
    """
    model = _pointwise_depthwise_pointwise()
    data = [{"x": np.random.default_rng(4).standard_normal((32, 4, 6, 6)).astype(np.float32)}]
    measured_runs: list[str] = []
    original = SensitivityAnalysis.measure
    monkeypatch.setattr(SensitivityAnalysis, "measure", lambda self, keys: (measured_runs.extend(t for t, _ in keys), original(self, keys))[1])
    proxy = ProxySensitivity(model, QuantizeConfig(bits=4, first_last_bits=None), data)
    assert proxy.plan("dw").bits == 8
    assert "dw" not in proxy.hessians and {"pw1", "pw2"} <= set(proxy.hessians)
    assert proxy.predicted("dw")
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "dw")).astype(np.float64)
    step = np.abs(w).max(axis=(1, 2, 3), keepdims=True) / 127
    expected = np.sum((w - np.round(w / step) * step) ** 2) / np.sum(w**2)
    assert proxy.relative_error("dw", 8) == pytest.approx(expected, rel=1e-4)  # (float32 steps)
    assert proxy.layer("dw", 8).noise == pytest.approx(proxy.factor * expected, rel=1e-4)
    assert "dw" not in measured_runs
