"""Runs over calibration data are cut so that each returns a bounded number of bytes, without changing any statistic."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from models import conv_bn_relu_gemm
from onnxq.calibrate.collect import collect, sample_bytes
from onnxq.calibrate.samples import InputSpec, RunSizer
from onnxq.model.prepare import prepare

collect_module = sys.modules["onnxq.calibrate.collect"]  # the package exports a function of the same name
samples_module = sys.modules["onnxq.calibrate.samples"]

FREE = [InputSpec("x", (None, 3, 8, 8), np.dtype(np.float32))]


def _batch(n: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(n * 192, dtype=np.float32).reshape(n, 3, 8, 8), "flag": np.array(True)}


def _sizes(pieces) -> list[int]:
    return [len(p["x"]) for p in pieces]


def test_an_unknown_size_is_learnt_from_a_one_sample_run():
    sizer = RunSizer(FREE, limit=1000)
    pieces = []
    for piece in sizer.pieces(_batch(10)):
        pieces.append(piece)
        sizer.record(piece, [np.zeros((len(piece["x"]), 75), np.float32)])  # 300 bytes a sample
    assert _sizes(pieces) == [1, 3, 3, 3]
    assert np.array_equal(np.concatenate([p["x"] for p in pieces]), _batch(10)["x"])  # every sample once, in order
    assert all(p["flag"] is not None and np.ndim(p["flag"]) == 0 for p in pieces)  # rank-0 inputs go with every piece


def test_a_known_size_cuts_from_the_start_and_a_small_one_not_at_all():
    assert _sizes(RunSizer(FREE, per_sample=400, limit=1000).pieces(_batch(5))) == [2, 2, 1]
    assert _sizes(RunSizer(FREE, per_sample=10, limit=1000).pieces(_batch(5))) == [5]
    assert _sizes(RunSizer(FREE, per_sample=1e9, limit=1000).pieces(_batch(3))) == [1, 1, 1]  # never below one sample


def test_a_fixed_batch_dimension_is_never_cut():
    fixed = [InputSpec("x", (4, 3, 8, 8), np.dtype(np.float32))]
    assert _sizes(RunSizer(fixed, per_sample=1e9, limit=1).pieces(_batch(4))) == [4]


def test_sample_bytes_reads_the_inferred_shapes():
    model = prepare(conv_bn_relu_gemm())
    assert sample_bytes(model, ["r1", "f"]) == 4 * (8 * 8 * 8 + 8)
    assert sample_bytes(model, ["not a tensor"]) is None


@pytest.mark.parametrize("known", [True, False])
def test_cut_runs_give_the_same_statistics(known, monkeypatch):
    model = prepare(conv_bn_relu_gemm())
    x = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    batches = [{"x": x[:32]}, {"x": x[32:]}]
    whole = collect(model, ["r1", "f"], batches, per_sample=True)
    monkeypatch.setattr(samples_module, "RUN_BYTES", 3 * 2048)  # r1 and f take 2080 bytes a sample: two samples a run
    if not known:
        monkeypatch.setattr(collect_module, "sample_bytes", lambda model, tensors: None)
    runs = []
    original = RunSizer.pieces
    monkeypatch.setattr(RunSizer, "pieces", lambda self, batch: (runs.append(len(p["x"])) or p for p in original(self, batch)))
    cut = collect(model, ["r1", "f"], batches, per_sample=True)
    assert max(runs) == 2 and sum(runs) == 40 and (runs[0] == 1) == (not known)
    for name in ("r1", "f"):
        a, b = whole[name], cut[name]
        assert np.array_equal(a.histogram.counts, b.histogram.counts) and (a.histogram.min, a.histogram.max) == (b.histogram.min, b.histogram.max)
        np.testing.assert_allclose(a.channels.mean(), b.channels.mean(), rtol=1e-6)
        np.testing.assert_array_equal(np.concatenate(a.samples.counts), np.concatenate(b.samples.counts))
