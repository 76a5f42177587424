"""Run the float model once over calibration data and gather statistics of chosen tensors.

The tensors are exposed as extra graph outputs of an in-memory copy of the model (nothing
is written to the working directory; a model too big for one protobuf goes to a private
temporary folder). Each batch updates a streaming histogram per tensor, so memory does not
grow with the number of samples. For ASQ it also keeps, per sample, a small histogram over
the sample's own range and the sample's channel means (the adapter's features).

The statistics of two parts of the data merge (``merge`` on each): histograms and counts exactly, means as float64
sums, per-sample lists one part after the other. A pass can then run in shards (on several workers) whose statistics
are merged in the order of the data.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.calibrate.histogram import ChannelHistograms, Histogram, sample_histograms
from onnxq.calibrate.moments import MomentCollector
from onnxq.calibrate.samples import InputSpec, RunSizer, batch_size, input_specs
from onnxq.calibrate.shards import shard_samples, shards
from onnxq.errors import OnnxqError, first_line
from onnxq.model.external import materialize
from onnxq.model.load import PROTOBUF_LIMIT, tensor_bytes, uses_external_data
from onnxq.native.session import session_options

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

SAMPLE_BINS = 256


@dataclass
class SampleStats:
    """Per-sample statistics for ASQ, appended batch by batch."""

    counts: list[np.ndarray] = field(default_factory=list)  # (B, SAMPLE_BINS) int32
    lo: list[np.ndarray] = field(default_factory=list)
    hi: list[np.ndarray] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)  # (B, C) float32
    channels: ChannelHistograms | None = None  # over all samples, per channel

    def add(self, batch: np.ndarray) -> None:
        """Histogram and features of every sample in ``batch``, and the per-channel histograms."""
        counts, lo, hi = sample_histograms(batch, SAMPLE_BINS)
        self.counts.append(counts.astype(np.int32))
        self.lo.append(lo)
        self.hi.append(hi)
        self.features.append(channel_means(batch).astype(np.float32))
        axis = channel_axis(batch.ndim) if batch.ndim > 1 else 0
        if self.channels is None:
            self.channels = ChannelHistograms(batch.shape[axis])
        self.channels.add_batch(batch, axis)

    def stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(counts, lo, hi, features) over all samples."""
        return tuple(np.concatenate(parts) for parts in (self.counts, self.lo, self.hi, self.features))  # type: ignore[return-value]

    def merge(self, other: SampleStats) -> None:
        """Append ``other``'s samples after these (the caller merges parts in the order of the data) and merge the channels.

        The per-sample arrays are shared, not copied: nothing changes them once appended.
        """
        for mine, theirs in ((self.counts, other.counts), (self.lo, other.lo), (self.hi, other.hi), (self.features, other.features)):
            mine.extend(theirs)
        if other.channels is None:
            return
        if self.channels is None:
            self.channels = copy.deepcopy(other.channels)
        else:
            self.channels.merge(other.channels)


@dataclass
class ChannelMeans:
    """Running mean of a tensor per index of axis 1 (NCHW channels, Gemm features): the inputs bias correction needs."""

    total: np.ndarray | None = None
    count: int = 0
    ragged: bool = False  # axis 1 changed length between runs: a batch axis there ((T, B, E) inside attention), no channels

    def add(self, batch: np.ndarray) -> None:
        """Add a batch (rank >= 2). Where axis 1's length differs from the earlier batches', there are no means at all.

        Only Conv/Gemm bias correction reads them, whose inputs keep channels on axis 1; sequence-first tensors (a
        Transformer's or an RNN's (T, B, E)) with a dynamic batch had runs of 31 and 32 samples fail calibration here.
        """
        if batch.ndim < 2 or batch.size == 0 or self.ragged:
            return
        rows = batch.reshape(batch.shape[0], batch.shape[1], -1)
        with np.errstate(over="ignore"):
            sums = np.einsum("ncs->c", rows).astype(np.float64)  # one pass; numpy's sum over axes (0, 2, 3) strides (slower)
        if not np.isfinite(sums).all():  # a float32 sum overflowed (values near float32's max): add in float64
            sums = np.einsum("ncs->c", rows, dtype=np.float64)
        if self.total is not None and sums.shape != self.total.shape:
            self.ragged, self.total = True, None
            return
        self.total = sums if self.total is None else self.total + sums
        self.count += batch.size // batch.shape[1]

    def mean(self) -> np.ndarray | None:
        """Mean per index of axis 1; None before any data, or where axis 1's length varied (see :meth:`add`)."""
        return None if self.ragged or self.total is None or self.count == 0 else self.total / self.count

    def merge(self, other: ChannelMeans) -> None:
        """Add ``other``'s float64 totals and count (``other`` is left as it is); ragged if either is or their lengths differ."""
        if self.ragged or other.ragged or (self.total is not None and other.total is not None and self.total.shape != other.total.shape):
            self.ragged, self.total = True, None
            return
        if other.total is not None:
            self.total = other.total.copy() if self.total is None else self.total + other.total
        self.count += other.count


@dataclass
class TensorStats:
    """Everything gathered about one tensor."""

    histogram: Histogram = field(default_factory=Histogram)
    samples: SampleStats | None = None
    channels: ChannelMeans = field(default_factory=ChannelMeans)
    rank: int = 0

    def merge(self, other: TensorStats) -> None:
        """Add the statistics of ``other``, the part of the data after this one's (``other`` is left as it is).

        The rank is the last run's (as one pass over all the data sets it): ``other``'s where it saw values, else this one's
        unless this one saw no run at all. Both must keep per-sample statistics, or neither.
        """
        if (self.samples is None) != (other.samples is None):
            raise ValueError("cannot merge tensor statistics with per-sample statistics and without")
        if other.histogram.observed or not self.rank:
            self.rank = other.rank or self.rank
        self.histogram.merge(other.histogram)
        self.channels.merge(other.channels)
        if self.samples is not None and other.samples is not None:
            self.samples.merge(other.samples)


def feature_axes(rank: int) -> tuple[int, ...]:
    """Axes averaged away to get one feature per channel: spatial axes of NCHW, tokens of (N, T, C)."""
    if rank <= 2:
        return ()
    if rank == 3:
        return (1,)
    return tuple(range(2, rank))


def channel_axis(rank: int) -> int:
    """The channel axis ASQ works along: 1 (NCHW, (N, C)), or the last one for (N, T, C) sequences."""
    return 2 if rank == 3 else 1


def channel_means(batch: np.ndarray) -> np.ndarray:
    """(B, C) per-sample channel means (the features ASQ's adapter reads)."""
    axes = feature_axes(batch.ndim)
    if not axes:
        return batch.reshape(len(batch), -1)
    with np.errstate(over="ignore"):
        means = batch.mean(axis=axes)
    if not np.isfinite(means).all():  # a float32 sum overflowed: the mean of finite values is finite in float64
        means = batch.mean(axis=axes, dtype=np.float64)
    return means.reshape(len(batch), -1)


@dataclass
class FirstOutputs:
    """The model's float outputs on the first ``samples`` samples of a pass, beside the runs that gave them.

    Mixed precision's proxy takes them as its float reference and its runs (onnxq/analysis/mixed_run.py): the same
    samples the pass starts with, so no second float run over them (3.6 s of the layout detector's 33). The outputs
    are copied (onnxruntime's arrays may hold its buffers); the runs are the pieces the pass fed, as they were. Keeping
    stops at the first run that would pass ``samples``.
    """

    names: list[str]
    samples: int
    runs: list[dict[str, np.ndarray]] = field(default_factory=list)
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    kept: int = 0
    full: bool = False

    def offer(self, run: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray], size: int) -> None:
        """Keep one run (of ``size`` samples) and its outputs among ``values`` while they fit in ``samples``."""
        if self.full or self.kept + size > self.samples:
            self.full = True
            return
        self.runs.append(dict(run))
        self.outputs.append({name: np.array(values[name]) for name in self.names})
        self.kept += size


def collect(
    model: onnx.ModelProto,
    tensors: list[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    per_sample: bool = False,
    total: int | None = None,
    histograms: bool = True,
    moments: MomentCollector | None = None,
    client: Client | None = None,
    first: FirstOutputs | None = None,
) -> dict[str, TensorStats]:
    """Statistics of ``tensors`` over all ``batches``, from one run of the float model in onnxruntime.

    Without ``histograms`` only min/max (and channel means) are kept, which is all min-max calibration needs.
    ``moments`` also sums the second moments of the weighted layers' inputs, in the same runs. The runs are summed in
    shards (onnxq/calibrate/shards.py), each from empty, merged in order; with a Dask ``client`` the shards go to its
    workers (onnxq/distribute/passes.py): the same code per shard (:func:`observe_runs`), the same statistics.
    ``first`` keeps the model's outputs on the first samples (:class:`FirstOutputs`; not with a client: it stays empty).
    """
    first = first if client is None else None
    fetched = list(dict.fromkeys([*tensors, *(moments.tensors if moments is not None else []), *(first.names if first is not None else [])]))
    if not fetched:  # nothing to observe (onnxruntime would return every output); the batches still pass through
        for _ in batches:
            pass
        return {name: TensorStats(samples=SampleStats() if per_sample else None) for name in tensors}
    task = PassTask(tuple(tensors), tuple(fetched), per_sample, histograms, copy.deepcopy(moments))  # empty: each shard starts from it
    observed = task.fresh(moments)  # the caller's collector sums the shards
    if client is not None:
        from onnxq.distribute.passes import collect_on

        collect_on(client, model, task, batches, total, observed)
    else:
        specs, per_sample_bytes = input_specs(model), sample_bytes(model, fetched)
        with exposing(model, fetched, arena=uses_arena(per_sample_bytes)) as sess, progress(total) as bar:
            for shard in shards(batches, specs, shard_samples(total, task.statistics_bytes)):  # as on workers: the same sums and order
                observed.merge(observe_runs(sess, task, shard.batches, per_sample_bytes, specs, shard.first_sample, task.fresh_copy(), bar,
                                            first))
    return observed.stats


@dataclass(frozen=True)
class PassTask:
    """What one calibration pass observes: the tensors whose statistics it keeps, all it fetches, and how.

    ``moments`` is an empty collector of the layers whose H the pass sums: each shard starts from a copy of it.
    """

    tensors: tuple[str, ...]
    fetched: tuple[str, ...]
    per_sample: bool
    histograms: bool
    moments: MomentCollector | None = None

    @property
    def statistics_bytes(self) -> int:
        """Bytes of the largest statistics a shard hands back: its H (histograms are a few KB a tensor)."""
        return self.moments.sums_bytes if self.moments is not None else 0

    def fresh(self, moments: MomentCollector | None) -> Observed:
        """Empty statistics that sum the moments into ``moments``."""
        return Observed({name: TensorStats(samples=SampleStats() if self.per_sample else None) for name in self.tensors}, moments)

    def fresh_copy(self) -> Observed:
        """Empty statistics of their own: what one shard on a worker starts from."""
        return self.fresh(copy.deepcopy(self.moments))


@dataclass
class Observed:
    """The statistics of one pass (or one shard of it): per tensor, the moments, and the samples they cover."""

    stats: dict[str, TensorStats]
    moments: MomentCollector | None
    samples: int = 0

    def merge(self, other: Observed) -> None:
        """Add ``other`` (the shard after this one, not used afterwards): exact for counts and histograms, float sums for means and H."""
        for name, entry in other.stats.items():
            self.stats[name].merge(entry)
        if self.moments is not None and other.moments is not None:
            self.moments.merge(other.moments, take=True)
        self.samples += other.samples


def observe_runs(
    sess: ort.InferenceSession,
    task: PassTask,
    batches: Iterable[Mapping[str, np.ndarray]],
    per_sample_bytes: float | None,
    specs: list[InputSpec],
    first_sample: int,
    into: Observed,
    bar: progress | None = None,
    first: FirstOutputs | None = None,
) -> Observed:
    """Run ``sess`` over ``batches`` (one shard) and add the fetched tensors to the statistics ``task`` asks for, ``into``.

    ``into`` starts empty (a shard's own statistics); ``first_sample`` is the global index of the shard's first sample
    (its place in the whole stream: the moments keep rows by it). ``first``: offered every run (:class:`FirstOutputs`).
    """
    sizer = RunSizer(specs, per_sample_bytes)
    fetched = list(task.fetched)
    for batch in batches:
        for piece, outputs in sized_runs(sess, fetched, [batch], sizer):
            for name, value in zip(fetched, outputs, strict=True):
                if name in into.stats:
                    _observe(into.stats[name], name, value, task.histograms)
                if into.moments is not None:
                    into.moments.observe(name, value, first_sample + into.samples)
            size = batch_size(piece, sizer.axes)
            if first is not None and not first.full:
                first.offer(piece, dict(zip(fetched, outputs, strict=True)), size)
            into.samples += size
        if bar is not None:
            bar.update(batch_size(batch, sizer.axes))
    return into


def sample_bytes(model: onnx.ModelProto, tensors: list[str]) -> float | None:
    """Bytes ``tensors`` take for one sample by their declared or inferred shapes (all but the first axis known), else None."""
    graph = model.graph
    values = {v.name: v for v in [*graph.value_info, *graph.output, *graph.input]}
    total = 0
    for name in tensors:
        tensor_type = values[name].type.tensor_type if name in values else None
        if tensor_type is None or not tensor_type.HasField("shape") or not tensor_type.elem_type:
            return None
        dims = tensor_type.shape.dim
        if not dims or any(not d.HasField("dim_value") for d in dims[1:]):
            return None
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).itemsize
        total += itemsize * math.prod(d.dim_value for d in dims[1:])
    return float(total)


def sized_runs(
    sess: ort.InferenceSession, tensors: list[str], batches: Iterable[Mapping[str, np.ndarray]], sizer: RunSizer
) -> Iterator[tuple[dict[str, np.ndarray], list[np.ndarray]]]:
    """(piece, ``tensors``) of runs over ``batches``, cut by ``sizer`` into pieces that keep each run's outputs small."""
    for batch in batches:
        for piece in sizer.pieces(batch):
            try:
                outputs = sess.run(tensors, piece)
            except Exception as e:  # onnxruntime's exception types are not public
                raise OnnxqError(None, f"onnxruntime cannot run the model on the calibration data: {first_line(e)}") from e
            sizer.record(piece, outputs)
            yield piece, outputs


def _observe(entry: TensorStats, name: str, value: np.ndarray, histograms: bool) -> None:
    """Add one run's values of a tensor to its statistics."""
    entry.rank = value.ndim
    try:
        entry.histogram.add(value) if histograms else entry.histogram.observe(value)
    except ValueError as e:
        raise OnnxqError(None, f"calibration: tensor {name!r}: {e}") from e
    entry.channels.add(value)
    if entry.samples is not None:
        entry.samples.add(value)


#: Bytes of fetched tensors a sample from which a calibration pass keeps onnxruntime's CPU arena (see :func:`uses_arena`).
ARENA_SAMPLE_BYTES = 16 << 20


def uses_arena(per_sample_bytes: float | None) -> bool:
    """Whether a pass fetching ``per_sample_bytes`` a sample (None: unknown ahead) runs with onnxruntime's CPU arena.

    Large feature maps only (a sample's fetched tensors at least ARENA_SAMPLE_BYTES, by the declared shapes). Without
    the arena every run allocates and faults in its buffers anew: on the layout detector (800 x 608 pages, 102 MB
    fetched a page, one page a run) its -b 4 took 30.0-32.3 s with the arena off and 24.9 s with it on, for a peak 47
    MB higher (423 against 376 MB, still a quarter of quantize_static's); `tools/profile_memory.py --cases layout`,
    one-off runs, 2026-12-06. On small samples the arena saves less and its memory is what counts (see :class:`exposing`).
    """
    return per_sample_bytes is not None and per_sample_bytes >= ARENA_SAMPLE_BYTES


class exposing:
    """Context manager: an onnxruntime session of ``model`` with ``tensors`` added as outputs.

    A model whose weights are all in it goes to onnxruntime as its own serialized bytes, the outputs added for as long
    as it takes to serialize it: no copy of the model, and the bytes only while the session is built (MiniLM's 90 MB
    copy was held through the whole pass, beside its bytes while onnxruntime read them). Others: a copy with the
    weights read in (the model stays as it is), through a temporary file where protobuf cannot hold it. Without
    onnxruntime's memory arena: it kept the largest runs' blocks through the pass (CREPE's pass peaked 18 MB lower
    without it, one-off profile), and the pass is no slower for it; ``arena`` keeps it (:func:`uses_arena`).
    """

    def __init__(self, model: onnx.ModelProto, tensors: list[str], arena: bool = False) -> None:
        self.model, self.tensors, self.arena = model, tensors, arena
        self.tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> ort.InferenceSession:
        options = session_options()
        options.enable_cpu_mem_arena = self.arena
        if not uses_external_data(self.model) and tensor_bytes(self.model) < PROTOBUF_LIMIT:
            return ort.InferenceSession(_bytes_with_outputs(self.model, self.tensors), options, providers=["CPUExecutionProvider"])
        exposed = _with_outputs(self.model, self.tensors)
        if tensor_bytes(exposed) < PROTOBUF_LIMIT:
            return ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.tmp = tempfile.TemporaryDirectory(prefix="onnxq-calibration-")
        path = Path(self.tmp.name) / "model.onnx"
        onnx.save_model(exposed, path, save_as_external_data=True, location="model.data")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def _added_outputs(model: onnx.ModelProto, tensors: list[str]) -> list[onnx.ValueInfoProto]:
    """Graph outputs for those of ``tensors`` the graph does not output (typed as shape inference found them, else float32).

    A float16 model's layer inputs are float16: declaring them float32 failed the session.
    """
    graph = model.graph
    present = {o.name for o in graph.output}
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input] if v.type.tensor_type.elem_type}
    return [onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None) for name in dict.fromkeys(tensors)
            if name not in present]


def _with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``tensors``, its external weights read in (onnxruntime needs them)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    materialize(exposed)
    exposed.graph.output.extend(_added_outputs(model, tensors))
    return exposed


def _bytes_with_outputs(model: onnx.ModelProto, tensors: list[str]) -> bytes:
    """``model`` serialized with ``tensors`` as outputs too; the model itself gets them only while it is serialized."""
    outputs = model.graph.output
    kept = len(outputs)
    outputs.extend(_added_outputs(model, tensors))
    try:
        return model.SerializeToString()
    finally:
        del outputs[kept:]


class progress:
    """A tqdm bar on a terminal, silence elsewhere."""

    def __init__(self, total: int | None, desc: str = "calibrating", unit: str = "sample") -> None:
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, unit=unit, desc=desc, leave=False)

    def __enter__(self) -> progress:
        return self

    def update(self, n: int) -> None:
        """Advance the bar by ``n``."""
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
