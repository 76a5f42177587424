"""Calibration statistics on the activations real models produce at the edges: ranges that grow by 2**40 between batches,
values near float32's max, all-zero and constant tensors, and NaN/Inf (a clear error naming the tensor).

A model that squares int16-scale audio (a power spectrum) made W8A8 stop with "Python int too large to convert to C
long" when a later batch widened a histogram by more than 2**63 in one step.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibrate.collect import ChannelMeans, channel_means
from onnxq.calibrate.histogram import ChannelHistograms, Histogram, sample_histograms
from onnxq.calibrate.ranges import entropy_range, minmax_range, mse_range, percentile_range, quant_params
from onnxq.config import ActivationConfig, BiasCorrection, CalibrationMethod, QuantizeConfig
from onnxq.errors import OnnxqError
from onnxq.pipeline import quantize_with_report

F32_MAX = float(np.finfo(np.float32).max)


def expected_counts(values: np.ndarray, exponent: int, bins: int) -> np.ndarray:
    """Counts of ``values`` in ``bins`` bins of width 2**exponent centred on zero, bin by bin in Python (exact)."""
    counts = np.zeros(bins, dtype=np.int64)
    for v in np.asarray(values, dtype=np.float64).ravel():
        index = math.floor(math.ldexp(float(v), -exponent)) + bins // 2
        counts[min(max(index, 0), bins - 1)] += 1
    return counts


def growing_batches(rng: np.random.Generator, growth: float, steps: int, size: int = 50) -> list[np.ndarray]:
    """Batches whose magnitude grows by ``growth`` from one to the next, both signs."""
    return [rng.standard_normal(size) * growth**k * 1e-30 for k in range(steps)]


@pytest.mark.parametrize("bins", [16, 4096])
def test_histogram_takes_ranges_that_grow_by_2_to_the_40_each_batch(bins):
    """Five batches, each 2**40 wider than the last (2**160 in all, past int64 shifts): the counts equal those of
    every value binned directly at the final width, and min/max are exact."""
    rng = np.random.default_rng(0)
    batches = growing_batches(rng, 2.0**40, 5)
    h = Histogram(bins=bins)
    for batch in batches:
        h.add(batch)
    values = np.concatenate(batches)
    assert (h.min, h.max) == (values.min(), values.max())
    assert h.total == values.size
    np.testing.assert_array_equal(h.counts, expected_counts(values, h.exponent, bins))
    assert max(-h.min, h.max) < bins // 2 * math.ldexp(1.0, h.exponent) <= 2 * max(-h.min, h.max)  # the smallest width that holds them


def test_histogram_takes_one_jump_past_2_to_the_63():
    """Digital silence, then int16-scale power: the bins widen by 2**70 in one step (an int64 shift overflowed here)."""
    quiet, loud = np.array([1e-9, -2e-9]), np.array([1e-9 * 2.0**70, -3e-9 * 2.0**70, 5.0])
    h = Histogram(bins=64)
    h.add(quiet)
    h.add(loud)
    values = np.concatenate([quiet, loud])
    np.testing.assert_array_equal(h.counts, expected_counts(values, h.exponent, 64))


def test_histogram_result_does_not_depend_on_how_the_data_was_split():
    rng = np.random.default_rng(1)
    values = np.concatenate(growing_batches(rng, 2.0**45, 4))
    whole, streamed = Histogram(bins=64), Histogram(bins=64)
    whole.add(values)
    for part in np.array_split(values, 7):
        streamed.add(part)
    assert whole.exponent == streamed.exponent
    np.testing.assert_array_equal(whole.counts, streamed.counts)


def test_channel_histograms_take_huge_growth_and_float32_max():
    """Per channel, independently: channel 0 jumps from 1e-3 to float32's max, channel 1 stays small."""
    h = ChannelHistograms(channels=2, bins=32)
    first = np.array([[1e-3, -2e-3, 5e-4], [0.5, -0.25, 0.125]], np.float32)
    second = np.array([[F32_MAX, -F32_MAX, 1.0], [0.5, 0.25, -0.5]], np.float32)
    h.add(first)
    h.add(second)
    for c in range(2):
        values = np.concatenate([first[c], second[c]]).astype(np.float64)
        np.testing.assert_array_equal(h.counts[c], expected_counts(values, int(h.exponent[c]), 32))
        assert (h.min[c], h.max[c]) == (values.min(), values.max())


def test_per_sample_histograms_of_a_sample_spanning_all_of_float32():
    """max - min overflows float32: the sample is binned in float64, its extremes in the first and last bins."""
    batch = np.array([[-F32_MAX, 0.0, F32_MAX, F32_MAX / 2], [0.0, 1.0, 2.0, 3.0]], np.float32)
    counts, lo, hi = sample_histograms(batch, 8)
    np.testing.assert_array_equal(counts[0], [1, 0, 0, 0, 1, 0, 1, 1])  # bins of width 2*max/8: -max | 0 | max/2 | max
    np.testing.assert_array_equal(counts[1], [1, 0, 1, 0, 0, 1, 0, 1])
    assert (lo[0], hi[0]) == (-F32_MAX, F32_MAX)


def test_channel_means_near_float32_max_are_finite_and_right():
    batch = np.full((2, 3, 4, 4), F32_MAX / 2, np.float32)  # a float32 sum of 32 of these overflows
    means = ChannelMeans()
    means.add(batch)
    np.testing.assert_array_equal(means.mean(), np.full(3, np.float64(np.float32(F32_MAX / 2))))
    np.testing.assert_array_equal(channel_means(batch), np.full((2, 3), np.float64(np.float32(F32_MAX / 2))))


@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_all_zero_and_constant_tensors_give_a_usable_range(value, method):
    """A constant tensor: a range holding the value and zero, a positive step, and the value quantized to itself."""
    h = Histogram()
    h.add(np.full(100, value, np.float32))
    r = {"minmax": minmax_range, "percentile": lambda h: percentile_range(h, 99.9), "mse": lambda h: mse_range(h, 8),
         "entropy": lambda h: entropy_range(h, 8)}[method](h)
    p = quant_params(r, 8)
    assert p.scale > 0 and math.isfinite(p.scale) and 0 <= p.zero_point <= 255
    code = min(max(round(value / p.scale) + p.zero_point, 0), 255)
    assert abs((code - p.zero_point) * p.scale - value) <= p.scale / 2 * (1 + 1e-9)


def _power_model() -> onnx.ModelProto:
    """x[N,16] -> Mul(x, x) (a power spectrum) -> MatMul(16x8) -> Relu -> MatMul(8x3) -> y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32) * 1e-3, "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Mul", ["x", "x"], ["power"], name="power"), helper.make_node("MatMul", ["power", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "power", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("method", list(CalibrationMethod))
def test_w8a8_on_int16_scale_audio_after_silence(method):
    """The first batches are near silence, the next loud (int16 scale): the power's range grows by about 2**63 at once."""
    rng = np.random.default_rng(0)
    data = [{"x": (rng.standard_normal((8, 16)) * scale).astype(np.float32)} for scale in (1e-6, 1e-6, 3e4, 3e4)]
    activations = ActivationConfig(method=method, bias_correction=BiasCorrection.OFF, equalize=False)  # the power stays the layer's input
    config = QuantizeConfig(bits=8, first_last_bits=None, activations=activations)
    result = quantize_with_report(_power_model(), config, data)
    power = next(a for a in result.activations if a.tensor == "power")
    assert power.params.zero_point == 0  # a square is never negative
    assert 3e4**2 * 16 / 255 < power.params.scale * 20 and power.params.scale < (3e4 * 6) ** 2 / 255  # loud batches set it


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_activations_are_an_error_naming_the_tensor(bad):
    model = _power_model()
    x = np.ones((2, 16), np.float32)
    x[1, 3] = bad
    config = QuantizeConfig(bits=8, activations=ActivationConfig())
    with pytest.raises(OnnxqError, match=r"tensor 'power'.*NaN or infinity"):
        quantize_with_report(model, config, [{"x": x}])
