"""The calibration data in shards: whole runs, in order, a fixed number of samples each, whatever runs the pass.

A pass sums its statistics shard by shard, each from empty, and merges the shards' sums in order: in one process and on
Dask workers alike (onnxq/distribute/passes.py). Float sums depend on the order they are added in, so this is what
makes a run with workers write the very model a run without them writes: the same shards, summed the same way, merged
in the same order. The shard size depends on the pass's sample count only, never on how many workers there are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from onnxq.calibrate.samples import InputSpec, batch_size, sample_axes

#: Most shards a pass is cut into: enough for 64 workers to share it, few enough that merging the shards' statistics
#: (a transformer's or ResNet-50's H: hundreds of MB each) stays a small part of the pass.
MAX_SHARDS = 64
#: Samples a shard holds when the pass does not know how many it will get.
DEFAULT_SHARD_SAMPLES = 32


@dataclass(frozen=True)
class Shard:
    """Whole runs of the data, and the global index of their first sample (the moments keep rows by it)."""

    index: int
    first_sample: int
    batches: list[dict[str, np.ndarray]]


def shard_samples(total: int | None) -> int:
    """Samples per shard for a pass over ``total`` samples: the total over MAX_SHARDS shards (DEFAULT_SHARD_SAMPLES when unknown)."""
    return DEFAULT_SHARD_SAMPLES if total is None else max(1, math.ceil(total / MAX_SHARDS))


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
