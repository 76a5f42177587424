"""libonnxq_stats.so's counting loops against the numpy code they replace: equal counts, bit for bit."""

import numpy as np
import pytest

from onnxq.calibrate.histogram import ChannelHistograms, Histogram, sample_histograms
from onnxq.native import stats

NATIVE_TAKES = stats.takes


@pytest.fixture
def numpy_only(monkeypatch):
    """numpy_only(True): from then on in the test, histogram.py counts with numpy (the reference); False: with the library."""

    def use(flag: bool) -> None:
        monkeypatch.setattr(stats, "takes", (lambda values: False) if flag else NATIVE_TAKES)

    return use


def awkward(rng: np.random.Generator, shape: tuple[int, ...], spread: float) -> np.ndarray:
    """float32 values with what binning gets wrong first: exact bin edges (multiples of powers of two), -0.0, ties, a Relu's zeros."""
    x = (rng.standard_normal(shape) * spread).astype(np.float32)
    flat = x.reshape(-1)
    k = len(flat)
    flat[: k // 8] = np.ldexp(rng.integers(-64, 64, k // 8), rng.integers(-12, 3, k // 8)).astype(np.float32)
    flat[k // 8 : k // 4] = 0.0
    flat[k // 4 : k // 4 + 3] = -0.0
    rng.shuffle(flat)
    return x


def test_the_library_is_built():
    assert stats.available(), "libonnxq_stats.so is missing: pip install ."


@pytest.mark.parametrize("bins", [4, 64, 4096])
def test_centred_histogram_counts_equal_numpy(numpy_only, bins):
    rng = np.random.default_rng(1)
    batches = [awkward(rng, (7, 3, 5, 5), spread) for spread in (0.001, 1.0, 30.0, 0.2)]
    results = []
    for reference in (False, True):
        numpy_only(reference)
        h = Histogram(bins=bins)
        for batch in batches:
            h.add(batch)
        results.append(h)
    fast, slow = results
    np.testing.assert_array_equal(fast.counts, slow.counts)
    assert (fast.exponent, fast.min, fast.max) == (slow.exponent, slow.min, slow.max)
    assert fast.total == sum(b.size for b in batches)


# NCHW-like shapes count each channel's runs into sub-histograms, channel-last (N, T, C) ones row by row; the two
# large shapes put several values in every bin.
@pytest.mark.parametrize(
    ("shape", "axis"), [((6, 5, 4, 3), 1), ((9, 7), 1), ((4, 6, 5), 2), ((2, 3, 1, 1), 1), ((16, 3, 20, 20), 1), ((8, 300, 3), 2)]
)
def test_channel_histogram_counts_equal_numpy(numpy_only, shape, axis):
    rng = np.random.default_rng(2)
    scale = np.ones(shape[axis], np.float32)
    scale[0], scale[-1] = 100.0, 1e-3  # channels of very different widths
    batches = [awkward(rng, shape, spread) * np.expand_dims(scale, tuple(a for a in range(len(shape)) if a != axis)) for spread in (1.0, 4.0, 0.5)]
    results = []
    for reference in (False, True):
        numpy_only(reference)
        h = ChannelHistograms(shape[axis], bins=256)
        for batch in batches:
            h.add_batch(batch, axis)
        results.append(h)
    fast, slow = results
    np.testing.assert_array_equal(fast.counts, slow.counts)
    np.testing.assert_array_equal(fast.exponent, slow.exponent)
    np.testing.assert_array_equal(fast.min, slow.min)
    np.testing.assert_array_equal(fast.max, slow.max)


def test_channel_histograms_of_a_batch_equal_counting_each_channel_alone():
    """add_batch reads channels in place; the same counts as one streaming histogram per channel of the moved-axis copy."""
    rng = np.random.default_rng(3)
    batch = awkward(rng, (5, 6, 4), 2.0)
    h = ChannelHistograms(4, bins=128)
    h.add_batch(batch, 2)
    for c in range(4):
        single = Histogram(bins=128)
        single.add(np.ascontiguousarray(batch[:, :, c]))
        np.testing.assert_array_equal(h.counts[c], single.counts)
        assert h.exponent[c] == single.exponent


@pytest.mark.parametrize("bins", [16, 100, 256])
def test_sample_histogram_counts_equal_numpy(numpy_only, bins):
    rng = np.random.default_rng(4)
    batch = awkward(rng, (12, 3, 24, 24), 3.0)
    batch[1] = 2.5  # a constant sample: everything in one bin
    batch[2] = np.linspace(-1, 1, batch[2].size, dtype=np.float32).reshape(batch[2].shape)  # values on exact bin edges
    numpy_only(False)
    fast = sample_histograms(batch, bins)
    numpy_only(True)
    slow = sample_histograms(batch, bins)
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)
    assert (fast[0].sum(axis=1) == batch[0].size).all()


def test_float64_and_strided_values_are_counted_by_numpy():
    """The loops take C-contiguous float32 only; anything else goes the numpy way and is still counted."""
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert stats.takes(x) and not stats.takes(x.astype(np.float64)) and not stats.takes(x[:, ::2])
    h = Histogram(bins=64)
    h.add(x[:, ::2].astype(np.float64))
    assert h.total == 12
