"""Shards of a calibration pass: whole runs in order, a size set by the pass alone (onnxq/calibrate/shards.py)."""

from __future__ import annotations

import numpy as np

from onnxq.calibrate.samples import InputSpec
from onnxq.calibrate.shards import MAX_SHARDS, MIN_SHARD_SAMPLES, MIN_SHARDS, SHARD_STATISTICS_BYTES, shard_count, shard_samples, shards


def test_shards_hold_whole_runs_in_order_with_their_first_sample():
    batches = [{"x": np.full((n, 2), i, dtype=np.float32)} for i, n in enumerate([3, 5, 2, 4, 1])]
    got = list(shards(batches, [InputSpec("x", (None, 2), np.dtype(np.float32))], samples=6))
    assert [s.index for s in got] == [0, 1, 2]
    assert [s.first_sample for s in got] == [0, 8, 14]  # 3+5 >= 6, 2+4 >= 6, then the rest
    assert [[int(b["x"][0, 0]) for b in s.batches] for s in got] == [[0, 1], [2, 3], [4]]




def test_large_statistics_cut_a_pass_into_fewer_shards():
    """Each shard's statistics are fetched and merged by the client in turn: their bytes bound the shard count."""
    assert shard_count(0) == MAX_SHARDS == 64
    assert shard_count(SHARD_STATISTICS_BYTES // 100) == MAX_SHARDS
    assert shard_count(1 << 30) == SHARD_STATISTICS_BYTES // (1 << 30) == 16
    assert shard_count(SHARD_STATISTICS_BYTES * 10) == MIN_SHARDS
    assert shard_samples(10_000) == 157 and shard_samples(10_000, 1 << 30) == 625 and shard_samples(None) == 32
    assert shard_samples(256) == MIN_SHARD_SAMPLES == 64  # a short pass: a few shards, not 64 merges
