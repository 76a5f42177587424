"""Calibration numerics against direct numpy computations: histograms, ranges, fake quantization, ASQ."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxq.calibrate.asq import fit_adapter, sample_betas
from onnxq.calibrate.histogram import Histogram, sample_histograms
from onnxq.calibrate.ranges import (
    Range,
    entropy_range,
    fake_quantize,
    minmax_range,
    mse_range,
    percentile_range,
    quant_params,
)


def _relu_like(rng: np.random.Generator, n: int, scale: float = 2.0) -> np.ndarray:
    return np.maximum(rng.standard_normal(n) * scale, 0.0)


def _direct_error(x: np.ndarray, r: Range, bits: int) -> float:
    p = quant_params(r, bits)
    return float(np.sum((x - fake_quantize(x, p.scale, p.zero_point, bits)) ** 2))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_streaming_histogram_equals_numpy_histogram_of_all_data(dtype):
    """Bit-exact binning, float32 activations (what onnxruntime returns) included."""
    rng = np.random.default_rng(0)
    # Batches whose range keeps growing, so the bins widen (and merge) several times.
    chunks = [(rng.standard_normal(100_000) * s).astype(dtype) for s in (0.01, 0.3, 5.0, 40.0)]
    h = Histogram()
    for chunk in chunks:
        h.add(chunk)
    data = np.concatenate(chunks)
    expected, _ = np.histogram(data, bins=h.edges)
    np.testing.assert_array_equal(h.counts, expected)
    assert h.min == data.min() and h.max == data.max()
    assert np.abs(data).max() < h.edges[-1] <= 2 * np.abs(data).max() * 256 / 254 + h.width


def test_histogram_does_not_depend_on_batching():
    rng = np.random.default_rng(1)
    data = rng.standard_normal(3000) * np.geomspace(0.01, 10, 3000)
    one, many = Histogram(), Histogram()
    one.add(data)
    for chunk in np.array_split(data, 17):
        many.add(chunk)
    np.testing.assert_array_equal(one.counts, many.counts)
    assert one.exponent == many.exponent


def test_histogram_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        Histogram().add(np.array([1.0, np.nan]))


def test_sample_histograms_count_each_sample_over_its_own_range():
    rng = np.random.default_rng(2)
    batch = rng.standard_normal((3, 2, 5, 5)) * np.array([1.0, 3.0, 0.1])[:, None, None, None]
    counts, lo, hi = sample_histograms(batch, 16)
    for i in range(3):
        expected, _ = np.histogram(batch[i], bins=16, range=(batch[i].min(), batch[i].max()))
        np.testing.assert_array_equal(counts[i], expected)
    np.testing.assert_allclose(lo, batch.reshape(3, -1).min(axis=1))
    np.testing.assert_allclose(hi, batch.reshape(3, -1).max(axis=1))


def test_float32_sample_histograms_move_at_most_a_few_values_to_a_neighbour_bin():
    """float32 batches are binned in float32: against the float64 binning only values at a bin edge may move."""
    batch = (np.random.default_rng(15).standard_normal((4, 3, 50, 50)) * 2).astype(np.float32)
    c32, lo32, hi32 = sample_histograms(batch, 256)
    c64, lo64, hi64 = sample_histograms(batch.astype(np.float64), 256)
    np.testing.assert_array_equal(c32.sum(axis=1), np.full(4, 3 * 50 * 50))
    assert np.abs(c32 - c64).sum() <= 2 * 10  # each moved value changes two counts
    np.testing.assert_array_equal(lo32, lo64)
    np.testing.assert_array_equal(hi32, hi64)
    assert lo32.dtype == np.float64


def test_minmax_range_is_the_observed_range_widened_to_zero():
    h = Histogram()
    h.add(np.array([0.5, 2.0, 3.25]))
    assert minmax_range(h) == Range(0.0, 3.25)
    h.add(np.array([-1.5]))
    assert minmax_range(h) == Range(-1.5, 3.25)


def test_percentile_range_matches_numpy_percentile_within_a_bin():
    rng = np.random.default_rng(3)
    data = rng.standard_normal(200_000) * 2 + 0.5
    h = Histogram()
    h.add(data)
    r = percentile_range(h, 99.9)
    assert abs(r.hi - np.percentile(data, 99.9)) <= h.width
    assert abs(r.lo - np.percentile(data, 0.1)) <= h.width


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_range_is_as_good_as_a_dense_scan_on_the_raw_values(bits):
    rng = np.random.default_rng(4)
    data = np.concatenate([_relu_like(rng, 50_000), rng.standard_normal(20) * 30])  # a few outliers
    h = Histogram()
    h.add(data)
    chosen = _direct_error(data, mse_range(h, bits), bits)
    full = minmax_range(h)
    scan = min(_direct_error(data, full.scaled(a), bits) for a in np.linspace(0.01, 1.0, 400))
    assert chosen <= scan * 1.01
    assert chosen < _direct_error(data, full, bits)  # and it did clip: the outliers are not worth covering


def test_entropy_range_keeps_a_uniform_range():
    flat = Histogram()
    flat.add(np.random.default_rng(5).uniform(0, 10, 100_000))
    assert entropy_range(flat, 8).hi > 9.0


@pytest.mark.parametrize("bits", [4, 8])
def test_entropy_range_keeps_the_zero_spike_apart(bits):
    """After a Relu half the values are exactly 0: that bin is its own group in Q, so wide steps cost it no divergence.

    Were the spike averaged with its code's other bins, every step wider than one bin would look
    costly and the range would shrink to a sliver.
    """
    data = _relu_like(np.random.default_rng(7), 200_000)
    h = Histogram()
    h.add(data)
    assert _direct_error(data, entropy_range(h, bits), bits) < 2.0 * _direct_error(data, mse_range(h, bits), bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_entropy_range_does_not_clamp_a_spike_at_the_minimum(bits):
    """Normalised images: half the pixels are background (one value, the minimum), the rest 255 discrete levels.

    KL alone preferred, at 4 bits, a range that clamped the whole background into its edge bin; the
    range may clip at most 1 % of the values.
    """
    rng = np.random.default_rng(14)
    pixels = np.where(rng.random(200_000) < 0.5, 0, np.ceil(rng.beta(2.0, 3.0, 200_000) * 255)).astype(np.float32)
    data = (pixels / 255 - 0.286) / 0.353
    h = Histogram()
    h.add(data)
    r = entropy_range(h, bits)
    assert np.mean((data < r.lo) | (data > r.hi)) <= 0.01


@pytest.mark.parametrize("bits,elem", [(8, TensorProto.UINT8), (4, TensorProto.UINT4)])
def test_fake_quantize_equals_onnxruntime_quantize_dequantize(bits, elem):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(1000) * 3).astype(np.float32)
    x[:4] = [0.0, 100.0, -100.0, 0.5 * 0.05]  # zero, both saturations, a tie
    p = quant_params(Range(-2.0, 5.0), bits)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1000])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [p.scale]), helper.make_tensor("z", elem, [], [p.zero_point])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = fake_quantize(x.astype(np.float32), np.float32(p.scale), p.zero_point, bits).astype(np.float32)
    np.testing.assert_array_equal(got, expected)
    assert onnx.checker.check_model(model) is None


def test_quant_params_keep_zero_exact_and_span_the_range():
    p = quant_params(Range(-1.0, 3.0), 8)
    assert p.zero_point == round(1.0 / p.scale)
    assert fake_quantize(np.array([0.0]), p.scale, p.zero_point, 8)[0] == 0.0
    lo, hi = p.value_range
    assert lo == pytest.approx(-1.0, abs=p.scale) and hi == pytest.approx(3.0, abs=p.scale)


def test_sample_betas_follow_a_known_per_sample_scale():
    """Samples that are one pattern times gamma_i: the best step, relative to the base range, is gamma_i."""
    rng = np.random.default_rng(7)
    pattern = _relu_like(rng, 4000)
    gammas = np.geomspace(0.3, 3.0, 9)
    batch = gammas[:, None] * pattern[None]
    counts, lo, hi = sample_histograms(batch, 256)
    h = Histogram()
    h.add(pattern)
    base = mse_range(h, 4)
    betas = sample_betas(counts, lo, hi, base, 4)
    np.testing.assert_allclose(betas, gammas, rtol=0.04)


def test_fit_adapter_recovers_a_log_linear_scale_pattern():
    rng = np.random.default_rng(8)
    features = rng.standard_normal((400, 6)) * 2 + 5
    true_w = np.array([0.3, -0.2, 0.0, 0.1, 0.0, 0.0])
    beta = np.exp(features @ true_w - 1.0 + 0.01 * rng.standard_normal(400))
    adapter = fit_adapter(features[:300], beta[:300])
    predicted = adapter.predict(features[300:])
    np.testing.assert_allclose(np.log(predicted), np.log(beta[300:]), atol=0.05)


@pytest.mark.parametrize(("samples", "channels"), [(60, 7), (20, 45)])
def test_every_ridge_fit_solves_its_penalised_normal_equations(samples, channels):
    """(Z^T Z + r n I) w = Z^T (y - mean y) and bias = mean y - mean(Z) w, for every ridge, with more and fewer samples than channels."""
    from onnxq.calibrate.asq import RIDGES, _ridges

    rng = np.random.default_rng(12)
    z, y = rng.standard_normal((samples, channels)) + 0.3, rng.standard_normal(samples)
    for ridge, fit in zip(RIDGES, _ridges(z, y, RIDGES), strict=True):
        want = np.linalg.solve(z.T @ z + ridge * samples * np.eye(channels), z.T @ (y - y.mean()))
        np.testing.assert_allclose(fit.weight, want, rtol=1e-8, atol=1e-10)
        assert fit.bias == pytest.approx(y.mean() - z.mean(axis=0) @ want, rel=1e-8, abs=1e-10)


def test_adapter_steps_are_channel_steps_times_the_sample_factor():
    from onnxq.calibrate.asq import Adapter, LogLinear

    per_sample = LogLinear(np.array([0.5, -1.0]), 0.25)
    adapter = Adapter(per_sample, np.array([0.1, 0.2, 0.4]))
    features = np.array([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(adapter.predict(features), per_sample.predict(features)[:, None] * [0.1, 0.2, 0.4])


def test_fit_adapter_on_constant_betas_outputs_that_constant():
    features = np.random.default_rng(9).standard_normal((50, 3))
    adapter = fit_adapter(features, np.full(50, 1.7))
    np.testing.assert_allclose(adapter.predict(features), 1.7, rtol=1e-6)


def test_channel_histograms_equal_one_streaming_histogram_per_channel():
    from onnxq.calibrate.histogram import ChannelHistograms

    rng = np.random.default_rng(12)
    rows = ChannelHistograms(3, bins=64)
    singles = [Histogram(bins=64) for _ in range(3)]
    for spread in (0.01, 1.0, 50.0, 3.0):
        batch = rng.standard_normal((3, 100)) * spread * np.array([1.0, 10.0, 0.1])[:, None]
        rows.add(batch)
        for h, row in zip(singles, batch, strict=True):
            h.add(row)
    for i, h in enumerate(singles):
        np.testing.assert_array_equal(rows.counts[i], h.counts)
        assert rows.exponent[i] == h.exponent and rows.min[i] == h.min and rows.max[i] == h.max


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 7), (5, 3, 4, 6)])
def test_channel_means_over_batches_equal_the_mean_over_every_axis_but_one(shape):
    from onnxq.calibrate.collect import ChannelMeans

    rng = np.random.default_rng(13)
    batches = [(rng.standard_normal(shape) * 3 + np.arange(shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2))).astype(np.float32) for _ in range(3)]
    means = ChannelMeans()
    for batch in batches:
        means.add(batch)
    whole = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(means.mean(), whole.mean(axis=tuple(a for a in range(len(shape)) if a != 1)), rtol=1e-5, atol=1e-5)


def test_the_exposing_session_outputs_the_tensors_and_leaves_the_model_as_it_was():
    """The calibration session is built from the model's own bytes with the layer inputs added as outputs for as long
    as it takes to serialize: it returns them as a session of a copy with those outputs does, and the model keeps its
    outputs (the rewrite and the written file must not get them)."""
    from models import conv_bn_relu_gemm
    from onnxq.calibrate.collect import _with_outputs, exposing

    model = conv_bn_relu_gemm(seed=3)
    before = model.SerializeToString()
    tensors = ["r1", "f", "y"]
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with exposing(model, tensors) as sess:
        assert [o.name for o in sess.get_outputs()] == ["y", "r1", "f"]
        got = sess.run(tensors, {"x": x})
    assert model.SerializeToString() == before
    reference = ort.InferenceSession(_with_outputs(model, tensors).SerializeToString(), providers=["CPUExecutionProvider"])
    for a, b in zip(got, reference.run(tensors, {"x": x}), strict=True):
        np.testing.assert_array_equal(a, b)
