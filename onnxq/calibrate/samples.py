"""Where each model input keeps its samples, and runs of the model counted, sliced and cut along those axes.

A run feeds the model one ``{input name: array}`` dict. Most inputs hold a batch of samples along one axis, their
*sample axis*, read off the model's declared dims:

- a free dimension named like a batch (``batch``, ``batch_size``, ``N``, ``B``, ...);
- else axis 0 when it is free ([N, C, H, W], [N, T]);
- else, when axis 0 is fixed at more than 1, the first free axis: a recurrent state [2, N, 128] keeps its samples on
  axis 1 (onnxruntime's readers give such states as they are, and splitting them on axis 0 broke streaming models);
- no sample axis at all for scalars (a sample rate), inputs whose dims are all fixed (a fixed-size state) and inputs
  with a fixed batch of 1 whose free axes are lengths ([1, T] audio): those are the same in every run and go whole
  with every piece of one.

A run's samples are counted along the first input with a sample axis (a model without any counts each run as the
fixed batch of its first input). Slicing and cutting a run happen only along sample axes, so a piece of a run is a run
the model accepts.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

#: Free dimension names that say "batch".
BATCH_NAMES = re.compile(r"batch|^(n|b|bs|num_samples)$", re.IGNORECASE)


@dataclass(frozen=True)
class InputSpec:
    """A model input as calibration data must match it: name, dims (None where free), their names, and dtype."""

    name: str
    dims: tuple[int | None, ...]
    dtype: np.dtype
    dim_names: tuple[str, ...] = ()  # the declared name of each free dimension ("" where none)

    def describe(self) -> str:
        """E.g. ``input float32[N,1,28,28]``."""
        dims = ",".join(str(d) if d is not None else (self._name(i) or "?") for i, d in enumerate(self.dims))
        return f"{self.name} {self.dtype}[{dims}]"

    def _name(self, axis: int) -> str:
        return self.dim_names[axis] if axis < len(self.dim_names) else ""

    @property
    def sample_axis(self) -> int | None:
        """The axis along which this input holds its samples, or None (the input is the same in every run); see above."""
        free = [axis for axis, dim in enumerate(self.dims) if dim is None]
        if not free:
            return None
        named = [axis for axis in free if BATCH_NAMES.search(self._name(axis))]
        if named:
            return named[0]
        if free[0] == 0:
            return 0
        return None if self.dims[0] == 1 else free[0]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim)
        names = tuple("" if d.HasField("dim_value") and d.dim_value > 0 else d.dim_param for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), names))
    return specs


#: Input name -> its sample axis (None: no samples; the input goes whole with every run and every piece of one).
SampleAxes = Mapping[str, int | None]


def sample_axes(specs: Iterable[InputSpec]) -> dict[str, int | None]:
    """Each input's sample axis."""
    return {spec.name: spec.sample_axis for spec in specs}


def describe_axes(specs: Iterable[InputSpec]) -> str:
    """One line saying where each input keeps its samples (what ``-v`` prints)."""
    parts = [f"{s.name} along axis {s.sample_axis}" if s.sample_axis is not None else f"{s.name} the same every run" for s in specs]
    return "calibration inputs: " + ", ".join(parts)


def batch_size(batch: Mapping[str, np.ndarray], axes: SampleAxes) -> int:
    """Samples in a run: its length along the first sample axis; without one, axis 0 of its first array of rank 1 or more."""
    for name, value in batch.items():
        axis = axes.get(name)
        if axis is not None and np.ndim(value) > axis:
            return int(np.shape(value)[axis])
    return next((len(v) for v in batch.values() if np.ndim(v) > 0), 1)


def cuttable(axes: SampleAxes) -> bool:
    """Whether runs may be cut into pieces: only along sample axes, so some input must have one."""
    return any(axis is not None for axis in axes.values())


def batch_slice(batch: Mapping[str, np.ndarray], axes: SampleAxes, start: int | None, stop: int | None) -> dict[str, np.ndarray]:
    """Samples ``start:stop`` of a run, along each input's sample axis; inputs without one go whole."""
    out = {}
    for name, value in batch.items():
        axis = axes.get(name)
        if axis is None or np.ndim(value) <= axis:
            out[name] = value
        else:
            index = [slice(None)] * np.ndim(value)
            index[axis] = slice(start, stop)
            out[name] = value[tuple(index)]
    return out


def first_samples(batches: Iterable[dict[str, np.ndarray]], axes: SampleAxes, samples: int) -> list[dict[str, np.ndarray]]:
    """The first ``samples`` samples of ``batches``, in batches (whole runs where runs cannot be cut)."""
    out: list[dict[str, np.ndarray]] = []
    count = 0
    for batch in batches:
        if count >= samples:
            break
        out.append(batch_slice(batch, axes, None, samples - count) if cuttable(axes) else dict(batch))
        count += batch_size(out[-1], axes)
    return out


def peek(
    batches: Iterable[dict[str, np.ndarray]], axes: SampleAxes, samples: int
) -> tuple[list[dict[str, np.ndarray]], Iterator[dict[str, np.ndarray]]]:
    """The whole runs that hold the first ``samples`` samples, and the stream as it was (those runs first, then the rest).

    A second look at the start of a stream that can be read once (an onnxruntime reader is).
    """
    stream = iter(batches)
    head: list[dict[str, np.ndarray]] = []
    count = 0
    while count < samples and (batch := next(stream, None)) is not None:
        head.append(batch)
        count += batch_size(batch, axes)
    return head, itertools.chain(head, stream)


#: Bytes of fetched tensors one onnxruntime run should return. Batches are cut to stay under it: ResNet-50 at 224x224
#: returns about 100 MB of activations a sample, and 32 samples a run took several times the memory of cut runs, and
#: longer (tools/bench_calibration_memory.py measures both).
RUN_BYTES = 128 << 20


class RunSizer:
    """Cuts runs into pieces whose fetched outputs stay under ``limit`` bytes, along the inputs' sample axes.

    The bytes a sample come from the declared shapes where they give them, else from the first run, which then gets one
    sample. A model without a sample axis (a fixed batch) is never cut.
    """

    def __init__(self, specs: list[InputSpec], per_sample: float | None = None, limit: int | None = None) -> None:
        self.axes = sample_axes(specs)
        self.splittable = cuttable(self.axes)
        self.limit = RUN_BYTES if limit is None else limit
        self.per_sample = per_sample  # bytes the fetched tensors take a sample, when the shapes tell it ahead

    def pieces(self, batch: Mapping[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """The run in pieces, each sized from what the runs so far returned (see :meth:`record`)."""
        size = batch_size(batch, self.axes)
        start = 0
        while start < size:
            if not self.splittable:
                step = size
            elif self.per_sample is None:
                step = 1
            else:
                step = max(1, int(self.limit // max(self.per_sample, 1.0)))
            yield dict(batch) if start == 0 and step >= size else batch_slice(batch, self.axes, start, start + step)
            start += step

    def record(self, piece: Mapping[str, np.ndarray], outputs: Iterable[np.ndarray]) -> None:
        """Note what a run on ``piece`` returned (its bytes a sample size the next pieces)."""
        if self.per_sample is None:
            self.per_sample = sum(np.asarray(o).nbytes for o in outputs) / max(batch_size(piece, self.axes), 1)
