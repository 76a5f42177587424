"""Calibration statistics of parts of the data, merged, against one pass over all of it (issue 18: passes in shards).

Histograms and counts must merge exactly (bit for bit, however the data were split), means as float64 sums, per-sample
lists in order; the second moments must keep the same rows whatever the shards or runs (rows kept by their sample's
place in the whole stream) and sum to the one-pass H. References are one object fed everything, and numpy written
from the schemes' definitions.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from onnxq.calibrate.collect import ChannelMeans, SampleStats, TensorStats, _observe
from onnxq.calibrate.histogram import ChannelHistograms, Histogram


def _stream(rng: np.random.Generator, pieces: int, size: int = 400) -> list[np.ndarray]:
    """float32 runs whose scales differ by up to 1e12 (so the parts' bin widths differ), a few empty."""
    runs = []
    for _ in range(pieces):
        n = 0 if rng.random() < 0.15 else int(rng.integers(1, size))
        runs.append((rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 6) + rng.uniform(-1, 1)).astype(np.float32))
    return runs


def _split(rng: np.random.Generator, items: list, parts: int) -> list[list]:
    """``items`` cut into ``parts`` consecutive parts at random points (parts may be empty)."""
    cuts = np.sort(rng.integers(0, len(items) + 1, parts - 1))
    bounds = [0, *cuts.tolist(), len(items)]
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _folds(parts: list, fed) -> tuple:
    """The parts merged as ((a + b) + c) ... and as (a + (b + (c ...))), each part ``fed`` into a fresh object."""
    left = fed(parts[0])
    for part in parts[1:]:
        left.merge(fed(part))
    right = fed(parts[-1])
    for part in reversed(parts[:-1]):
        head = fed(part)
        head.merge(right)
        right = head
    return left, right


def _reference_histogram(values: np.ndarray, bins: int) -> tuple[np.ndarray, int]:
    """(counts, exponent) by definition: the narrowest width 2**e (e >= -40) with every |value| < bins/2 * 2**e, floor bins."""
    half = bins // 2
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    exponent = -40
    while peak >= half * 2.0**exponent:
        exponent += 1
    index = np.floor(values.astype(np.float64) / 2.0**exponent).astype(np.int64) + half
    return np.bincount(index, minlength=bins), exponent


def _same_histogram(a: Histogram | ChannelHistograms, b: Histogram | ChannelHistograms) -> None:
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.exponent, b.exponent)
    np.testing.assert_array_equal(a.min, b.min)
    np.testing.assert_array_equal(a.max, b.max)


@pytest.mark.parametrize("seed", range(6))
def test_histograms_merge_to_one_fed_everything(seed):
    rng = np.random.default_rng(seed)
    runs = _stream(rng, 12)

    def fed(part: list[np.ndarray]) -> Histogram:
        h = Histogram(bins=256)
        for run in part:
            h.add(run)
        return h

    whole = fed(runs)
    everything = np.concatenate(runs)
    counts, exponent = _reference_histogram(everything, 256)
    np.testing.assert_array_equal(whole.counts, counts)
    assert whole.exponent == exponent
    widths = set()
    for parts in range(2, 6):
        pieces = _split(rng, runs, parts)
        widths |= {(parts, fed(p).exponent) for p in pieces}
        for merged in _folds(pieces, fed):
            _same_histogram(merged, whole)
    assert len(widths) > len(range(2, 6)) + 1  # the parts' widths differ: the merges re-bin
    assert (whole.min, whole.max) == (float(everything.min()), float(everything.max()))


def test_an_empty_histogram_merges_as_nothing():
    data = np.random.default_rng(1).standard_normal(500).astype(np.float32) * 300
    full = Histogram(bins=64)
    full.add(data)
    for order in ("empty into full", "full into empty"):
        a, b = (copy.deepcopy(full), Histogram(bins=64)) if order == "empty into full" else (Histogram(bins=64), copy.deepcopy(full))
        a.merge(b)
        _same_histogram(a, full)
    untouched = copy.deepcopy(full)
    Histogram(bins=64).merge(full)
    _same_histogram(full, untouched)  # other is left as it is
    with pytest.raises(ValueError, match="bins"):
        full.merge(Histogram(bins=128))


def test_min_max_only_histograms_merge_their_ranges():
    """Min-max calibration only observes (no counts): the merge still gives the range of everything."""
    a, b = Histogram(), Histogram()
    a.observe(np.array([-3.0, 2.0]))
    b.observe(np.array([5.0, -1.0]))
    a.merge(b)
    assert (a.min, a.max, a.total) == (-3.0, 5.0, 0)


def _channel_stream(rng: np.random.Generator, runs: int, channels: int) -> list[np.ndarray]:
    """(outer, channels, inner) blocks: each channel and each run at its own scale (1e-5 to 1e5), some all zero."""
    blocks = []
    for _ in range(runs):
        scales = 10.0 ** rng.uniform(-5, 5, channels)
        scales[rng.random(channels) < 0.1] = 0
        block = rng.standard_normal((int(rng.integers(1, 4)), channels, int(rng.integers(1, 30)))) * scales[None, :, None]
        blocks.append(block.astype(np.float32))
    return blocks


@pytest.mark.parametrize("seed", range(4))
def test_channel_histograms_merge_to_one_fed_everything(seed):
    rng = np.random.default_rng(seed + 10)
    blocks = _channel_stream(rng, 14, channels=7)

    def fed(part: list[np.ndarray]) -> ChannelHistograms:
        h = ChannelHistograms(7, bins=128)
        for block in part:
            h.add_blocks(block)
        return h

    whole = fed(blocks)
    for c in range(7):
        counts, exponent = _reference_histogram(np.concatenate([b[:, c, :].ravel() for b in blocks]), 128)
        np.testing.assert_array_equal(whole.counts[c], counts)
        assert whole.exponent[c] == exponent
    for parts in range(2, 6):
        for merged in _folds(_split(rng, blocks, parts), fed):
            _same_histogram(merged, whole)
    with pytest.raises(ValueError, match="channels"):
        whole.merge(ChannelHistograms(6, bins=128))


def _tensor_runs(rng: np.random.Generator, shape: tuple[int, ...], runs: int) -> list[np.ndarray]:
    """NCHW-like runs of 1 to 5 samples, each run at its own scale."""
    return [(rng.standard_normal((int(rng.integers(1, 6)), *shape)) * 10.0 ** rng.uniform(-2, 2)).astype(np.float32) for _ in range(runs)]


def test_channel_means_merge_to_one_pass():
    rng = np.random.default_rng(20)
    runs = _tensor_runs(rng, (5, 4, 3), 10)

    def fed(part: list[np.ndarray]) -> ChannelMeans:
        m = ChannelMeans()
        for run in part:
            m.add(run)
        return m

    whole = fed(runs)
    want = np.concatenate(runs).astype(np.float64).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(whole.mean(), want, rtol=1e-5)  # float32 sums per run
    for parts in range(2, 6):
        for merged in _folds(_split(rng, runs, parts), fed):
            assert merged.count == whole.count
            np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-12)
    empty = ChannelMeans()
    empty.merge(ChannelMeans())
    assert empty.mean() is None
    with pytest.raises(ValueError, match="shapes"):
        whole.merge(fed([np.ones((2, 3, 4), dtype=np.float32)]))


def test_sample_stats_append_in_order():
    rng = np.random.default_rng(21)
    runs = _tensor_runs(rng, (6, 5, 5), 9)

    def fed(part: list[np.ndarray]) -> SampleStats:
        s = SampleStats()
        for run in part:
            s.add(run)
        return s

    whole = fed(runs)
    for parts in range(2, 6):
        for merged in _folds(_split(rng, runs, parts), fed):
            for got, want in zip(merged.stacked(), whole.stacked(), strict=True):
                np.testing.assert_array_equal(got, want)
            _same_histogram(merged.channels, whole.channels)
    # the per-sample rows are the samples in the order of the data: sample 0 of run 1 follows run 0's samples
    lo = whole.stacked()[1]
    np.testing.assert_array_equal(lo, np.concatenate([r.reshape(len(r), -1).min(axis=1) for r in runs]))


@pytest.mark.parametrize("per_sample", [False, True])
def test_tensor_stats_merge_to_one_pass(per_sample):
    rng = np.random.default_rng(22)
    runs = _tensor_runs(rng, (4, 6, 6), 11)

    def fed(part: list[np.ndarray]) -> TensorStats:
        entry = TensorStats(samples=SampleStats() if per_sample else None)
        for run in part:
            _observe(entry, "t", run, histograms=True)  # what collect() does with each run
        return entry

    whole = fed(runs)
    for parts in range(2, 6):
        for merged in _folds(_split(rng, runs, parts), fed):
            _same_histogram(merged.histogram, whole.histogram)
            assert merged.rank == whole.rank == 4
            assert merged.channels.count == whole.channels.count
            np.testing.assert_allclose(merged.channels.mean(), whole.channels.mean(), rtol=1e-12)
            if per_sample:
                for got, want in zip(merged.samples.stacked(), whole.samples.stacked(), strict=True):
                    np.testing.assert_array_equal(got, want)
    empty = TensorStats(samples=SampleStats() if per_sample else None)
    empty.merge(whole)
    assert empty.rank == 4  # from the part that saw data
    whole.merge(TensorStats(samples=SampleStats() if per_sample else None))
    assert whole.rank == 4
    with pytest.raises(ValueError, match="per-sample"):
        whole.merge(TensorStats(samples=None if per_sample else SampleStats()))
