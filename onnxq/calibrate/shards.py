"""The calibration data in shards: whole runs, in order, a fixed number of samples each, whatever runs the pass.

A pass sums its statistics shard by shard, each from empty, and merges the shards' sums in order: in one process and on
Dask workers alike (onnxq/distribute/passes.py). Float sums depend on the order they are added in, so this is what
makes a run with workers write the very model a run without them writes: the same shards, summed the same way, merged
in the same order. The shard size depends on the pass (its sample count, the size of its statistics), never on how many workers there are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from onnxq.calibrate.samples import InputSpec, batch_size, sample_axes

#: Most shards a pass is cut into: enough for 64 workers to share it.
MAX_SHARDS = 64
#: Fewer shards where each hands back large statistics: at most this many bytes of them are fetched and merged by the
#: client, one shard after another. A ResNet-50's H was 0.95 GB a shard as float64 matrices (0.24 GB as the packed
#: float32 sums a shard hands back now), fetched and merged in 3.7 s over loopback
#: (tools/bench_scale.py): 64 shards took the client 3.9 min, more than 64 workers computing 10,000 samples (0.3 min);
#: 16 shards cost it 1 min, and 8 and 64 workers then finish 10,000 samples soonest by that benchmark's cost model.
SHARD_STATISTICS_BYTES = 16 << 30
#: Fewest shards the byte budget may leave (a pass still spreads over a few workers).
MIN_SHARDS = 4
#: Samples a shard holds when the pass does not know how many it will get.
DEFAULT_SHARD_SAMPLES = 32
#: Fewest samples a shard holds: each shard's statistics start empty and are merged, which for MiniLM's 24 layer inputs
#: cost 1.5 s of its 22 s with 32 shards of 8 sentences (a one-off profile); a pass of a few hundred samples, seconds
#: long, then has a few shards, and a pass of thousands, minutes long, up to MAX_SHARDS.
MIN_SHARD_SAMPLES = 64


@dataclass(frozen=True)
class Shard:
    """Whole runs of the data, and the global index of their first sample (the moments keep rows by it)."""

    index: int
    first_sample: int
    batches: list[dict[str, np.ndarray]]


def shard_count(statistics_bytes: int = 0) -> int:
    """How many shards a pass is cut into when each shard hands back ``statistics_bytes`` (MAX_SHARDS, fewer for large H)."""
    if statistics_bytes <= 0:
        return MAX_SHARDS
    return max(MIN_SHARDS, min(MAX_SHARDS, SHARD_STATISTICS_BYTES // statistics_bytes))


def shard_samples(total: int | None, statistics_bytes: int = 0) -> int:
    """Samples per shard for a pass over ``total`` samples (DEFAULT_SHARD_SAMPLES when unknown).

    It depends on the pass only (its samples, the size of what a shard hands back), never on the workers.
    """
    return DEFAULT_SHARD_SAMPLES if total is None else max(MIN_SHARD_SAMPLES, math.ceil(total / shard_count(statistics_bytes)))


def shards(batches: Iterable[Mapping[str, np.ndarray]], specs: list[InputSpec], samples: int) -> Iterator[Shard]:
    """``batches`` grouped, in order, into shards of whole runs holding at least ``samples`` samples (the last fewer)."""
    axes = sample_axes(specs)
    group: list[dict[str, np.ndarray]] = []
    first = count = index = 0
    for batch in batches:
        group.append(dict(batch))
        count += batch_size(batch, axes)
        if count - first >= samples:
            yield Shard(index, first, group)
            group, first, index = [], count, index + 1
    if group:
        yield Shard(index, first, group)
