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
from conftest import splitmix64
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibrate import moments as moments_module
from onnxq.calibrate.collect import ChannelMeans, PassTask, SampleStats, TensorStats, _observe, exposing, observe_runs, sample_bytes
from onnxq.calibrate.histogram import ChannelHistograms, Histogram
from onnxq.calibrate.moments import LayerInput, MomentCollector
from onnxq.calibrate.samples import input_specs


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


def _feeder(make, add):
    """A function that feeds each run of a part, with ``add(statistics, run)``, into a fresh ``make()``, and returns it."""

    def fed(part: list) -> object:
        statistics = make()
        for run in part:
            add(statistics, run)
        return statistics

    return fed


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

    fed = _feeder(lambda: Histogram(bins=256), Histogram.add)

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

    fed = _feeder(lambda: ChannelHistograms(7, bins=128), ChannelHistograms.add_blocks)

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

    fed = _feeder(ChannelMeans, ChannelMeans.add)

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
    whole.merge(fed([np.ones((2, 3, 4), dtype=np.float32)]))  # axis 1 of another length: no channel axis, no means
    assert whole.mean() is None


def test_sample_stats_append_in_order():
    rng = np.random.default_rng(21)
    runs = _tensor_runs(rng, (6, 5, 5), 9)

    fed = _feeder(SampleStats, SampleStats.add)

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

    fed = _feeder(lambda: TensorStats(samples=SampleStats() if per_sample else None),
                  lambda entry, run: _observe(entry, "t", run, histograms=True))  # what collect() does with each run

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


CONV = LayerInput("a", "conv", 1, kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1))
MATMUL = LayerInput("b", "rows")
WIDE = LayerInput("c", "rows")  # K = 70: the products' upper triangle only (syrk)
INPUTS = {"conv": [CONV], "matmul": [MATMUL], "wide": [WIDE]}
SAMPLES = 96


def _samples(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """All the samples of the stream per tensor: a conv input (3 x 8 x 8: 64 rows of K 27 a sample), rows of K 20 (6 a
    sample), rows of K 70 (16 a sample), each sample at its own scale."""
    scale = 10.0 ** rng.uniform(-1, 1, SAMPLES)
    return {
        "a": (rng.standard_normal((SAMPLES, 3, 8, 8)) * scale[:, None, None, None]).astype(np.float32),
        "b": (rng.standard_normal((SAMPLES, 6, 20)) * scale[:, None, None]).astype(np.float32),
        "c": (rng.standard_normal((SAMPLES, 16, 70)) * scale[:, None, None]).astype(np.float32),
    }


def _observed(data: dict[str, np.ndarray], bounds: list[int], start: int = 0, stop: int | None = None) -> MomentCollector:
    """A collector (told the pass has SAMPLES samples) fed the runs between ``bounds`` from sample ``start`` to ``stop``."""
    stop = SAMPLES if stop is None else stop
    collector = MomentCollector(INPUTS, samples=SAMPLES)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if start <= a and b <= stop:
            for name in collector.tensors:
                collector.observe(name, data[name][a:b], first_sample=a)
    return collector


def _thin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Caps small enough that every reader thins: MIN_ROWS 100 (cap 100, 100, 280 rows); conv patches one sample at a time."""
    monkeypatch.setattr(moments_module, "MIN_ROWS", 100)
    monkeypatch.setattr(moments_module, "PATCH_BYTES", 4 * 3 * 64 * 9)


def _strides(collector: MomentCollector) -> dict[str, int]:
    return {reader.tensor: m.stride for reader, m in collector.moments.items()}


def _rows(collector: MomentCollector) -> dict[str, tuple[int, int]]:
    return {reader.tensor: (m.kept, m.count) for reader, m in collector.moments.items()}


def _close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rtol: float) -> None:
    assert a.keys() == b.keys() == INPUTS.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=rtol * np.max(np.abs(b[name])), err_msg=name)


def test_moments_of_shards_merge_to_one_pass(monkeypatch):
    """Shards at run boundaries, each its own collector told its first sample, merged in order: the same rows kept and
    counted, the same H and E[x]. Only the order of the float32 sums differs (each shard's gathered from zero)."""
    _thin(monkeypatch)
    data = _samples(np.random.default_rng(30))
    bounds = list(range(0, SAMPLES + 1, 4))  # runs of 4 samples
    whole = _observed(data, bounds)
    assert min(_strides(whole).values()) > 1  # every reader thins
    for shard_bounds in ([0, 20, 52, 96], [0, 4, 8, 60, 64, 96], [0, 92, 96]):
        shards = [_observed(data, bounds, a, b) for a, b in zip(shard_bounds[:-1], shard_bounds[1:], strict=True)]
        merged = shards[0]
        for shard in shards[1:]:
            merged.merge(shard)
        assert _rows(merged) == _rows(whole)
        _close(merged.means(), whole.means(), 1e-12)
        _close(merged.hessians(), copy.deepcopy(whole).hessians(), 1e-6)


def test_moments_merge_leaves_the_other_as_it_is(monkeypatch):
    _thin(monkeypatch)
    data = _samples(np.random.default_rng(31))
    bounds = list(range(0, SAMPLES + 1, 8))
    first, second = _observed(data, bounds, 0, 48), _observed(data, bounds, 48)
    for m in second.moments.values():
        m.flush()  # its packed sums, not pending products: what an empty collector takes over must be a copy
    before = copy.deepcopy(second)
    empty = MomentCollector(INPUTS, samples=SAMPLES)
    empty.merge(second)
    empty.hessians()  # the sums become matrices in place: the copies
    first.merge(second)
    for reader, m in second.moments.items():
        b = before.moments[reader]
        assert (m.count, m.kept, m.stride) == (b.count, b.kept, b.stride)
        for got, want in ((m.sums, b.sums), (m.pending, b.pending), (m.linear, b.linear)):
            assert (got is None) == (want is None) and (got is None or np.array_equal(got, want))
    first.hessians()  # the merged sums become matrices in place: not the other's
    _close(second.hessians(), before.hessians(), 0)
    with pytest.raises(ValueError, match="different layer inputs"):
        first.merge(MomentCollector({"matmul": [MATMUL]}, samples=SAMPLES))


def test_taking_the_other_merges_the_same_sums(monkeypatch):
    """merge(take=True) may keep the other's arrays instead of copying them (a shard not used afterwards): same H, same means."""
    _thin(monkeypatch)
    data = _samples(np.random.default_rng(32))
    bounds = list(range(0, SAMPLES + 1, 8))
    parts = [_observed(data, bounds, a, b) for a, b in ((0, 24), (24, 48), (48, None))]
    for m in parts[1].moments.values():
        m.flush()  # one part with packed sums only, the others with products pending: both ways of taking
    copied, taken = MomentCollector(INPUTS, samples=SAMPLES), MomentCollector(INPUTS, samples=SAMPLES)
    for part in parts:
        copied.merge(part)
    for part in parts:
        taken.merge(copy.deepcopy(part), take=True)
    _close(taken.means(), copied.means(), 0)
    _close(taken.hessians(), copied.hessians(), 0)


def test_runs_of_other_sizes_keep_the_same_rows(monkeypatch):
    """The rows kept depend on the samples' places, not on the runs: the stream in runs of 4 and in runs of 3 (and of
    uneven sizes) keeps the same rows; H differs only by how the float32 products group (1e-6)."""
    _thin(monkeypatch)
    data = _samples(np.random.default_rng(32))
    fours = _observed(data, list(range(0, SAMPLES + 1, 4)))
    for bounds in (list(range(0, SAMPLES + 1, 3)), [0, 1, 2, 7, 20, 21, 50, 51, 90, 96]):
        other = _observed(data, bounds)
        assert _rows(other) == _rows(fours)
        _close(other.means(), fours.means(), 1e-6)
        _close(other.hessians(), copy.deepcopy(fours).hessians(), 1e-6)


def _reference(rows: np.ndarray, features: int, cap_rows: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(kept, count, sum of stride x x^T, sum of stride x) by the rule, walking every (sample, row) of ``rows`` (samples,
    R, K): the stride is the least power of two with samples x R < 2 x cap x stride; row r of sample i (position
    p = i * 2**32 + r) is kept when p % stride is the hash of p // stride, modulo stride."""
    samples, per_sample, _ = rows.shape
    cap = max(cap_rows, 4 * features)
    stride = 1
    while samples * per_sample >= 2 * cap * stride:
        stride *= 2
    kept, sums, linear = 0, np.zeros((features, features)), np.zeros(features)
    for i in range(samples):
        for r in range(per_sample):
            p = i * 2**32 + r
            if p % stride == splitmix64(p // stride) % stride:
                x = rows[i, r].astype(np.float64)
                kept += 1
                sums += stride * np.outer(x, x)
                linear += stride * x
    return kept, kept * stride, sums, linear


def test_the_collector_keeps_the_rows_of_the_rule(monkeypatch):
    """Against a walk over every (sample, row) by the rule (the conv's rows: its patches, per sample, 8 x 8 positions)."""
    _thin(monkeypatch)
    data = _samples(np.random.default_rng(33))
    collector = _observed(data, [0, 5, 6, 30, 31, 64, 96])
    patches = CONV.rows(data["a"])[0].reshape(SAMPLES, 64, 27)  # checked against onnxruntime in test_moments.py
    for reader, rows in ((CONV, patches), (MATMUL, data["b"]), (WIDE, data["c"])):
        kept, count, sums, linear = _reference(rows, rows.shape[2], 100)
        m = collector.moments[reader]
        assert m.stride > 1 and (m.kept, m.count) == (kept, count), reader.tensor
        np.testing.assert_allclose(m.hessian()[0], sums / count, rtol=1e-5, atol=1e-6 * np.max(sums / count))
        np.testing.assert_allclose(m.mean()[0], linear / count, rtol=1e-9, atol=1e-12 * np.max(np.abs(linear / count)))


def test_a_run_of_one_row_a_sample_thins_by_sample():
    """A Gemm's input has one row a sample: a sample's row is kept about once in ``stride`` (the hash must not keep
    every sample's row 0), and a 2-D input read by its columns (Gemm transA) has a sample per column."""
    m = moments_module.Moments(stride=8)
    kept = m.take(1000, 80000, 1)
    assert 0.9 / 8 < len(kept) / 80000 < 1.1 / 8
    x = np.zeros((5, 12))
    assert LayerInput("x", "transposed").layout(x) == (12, 1)
    assert LayerInput("x", "columns").layout(x) == (12, 1)
    assert LayerInput("x", "rows").layout(x) == (5, 1)
    assert LayerInput("x", "columns").layout(np.zeros((2, 5, 12))) == (2, 12)


def _conv_model() -> tuple:
    rng = np.random.default_rng(40)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["y"], name="relu")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "S", "S"])  # no declared sizes: each collect sizes its runs itself
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    reader = LayerInput("x", "conv", 1, kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"w": [reader]}


def test_collect_in_shards_merges_to_one_collect(monkeypatch):
    """A pass over the whole stream, and over two shards (the second told its first sample) merged: the same
    histograms and counts, the same rows kept for H. The shards' runs are cut otherwise (each collect runs its first
    piece on one sample, the shapes not being declared): the rows kept do not depend on it."""
    monkeypatch.setattr(moments_module, "MIN_ROWS", 200)
    model, inputs = _conv_model()
    rng = np.random.default_rng(41)
    batches = [{"x": rng.standard_normal((n, 3, 10, 10)).astype(np.float32)} for n in (5, 3, 6, 4, 6)]
    total = sum(len(b["x"]) for b in batches)

    def run(part: list[dict[str, np.ndarray]], first: int) -> tuple[dict[str, TensorStats], MomentCollector]:
        moments = MomentCollector(inputs, samples=total)
        task = PassTask(("h", "y"), ("h", "y", *moments.tensors), per_sample=True, histograms=True, moments=moments)
        with exposing(model, list(task.fetched)) as sess:  # what a worker does with its shard (onnxq/distribute/passes.py)
            observed = observe_runs(sess, task, part, sample_bytes(model, list(task.fetched)), input_specs(model), first, task.fresh(moments))
        return observed.stats, moments

    stats, moments = run(batches, 0)
    head, head_moments = run(batches[:2], 0)
    tail, tail_moments = run(batches[2:], 8)
    for name in stats:
        head[name].merge(tail[name])
        _same_histogram(head[name].histogram, stats[name].histogram)
        for got, want in zip(head[name].samples.stacked(), stats[name].samples.stacked(), strict=True):
            np.testing.assert_array_equal(got, want)
    head_moments.merge(tail_moments)
    assert _strides(moments)["x"] > 1 and _rows(head_moments) == _rows(moments)
    want = moments.hessians()["w"]
    np.testing.assert_allclose(head_moments.hessians()["w"], want, rtol=1e-6, atol=1e-6 * np.max(np.abs(want)))  # float32 products
