"""Calibration data: files, folders of images, Python iterables and onnxruntime readers, as checked batches.

Every source becomes a stream of ``{input name: batch}`` dicts whose names, ranks, fixed
dimensions and dtypes match the model's inputs, capped at a number of samples. Files are
read lazily (an .npy is memory-mapped), so memory does not grow with the data set.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import helper

from onnxq.errors import OnnxqError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
DEFAULT_BATCH = 32


class DataReader(Protocol):
    """onnxruntime's ``CalibrationDataReader`` interface: ``get_next()`` returns a dict or None at the end."""

    def get_next(self) -> Mapping[str, np.ndarray] | None: ...  # noqa: D102


CalibrationData = Iterable[Mapping[str, np.ndarray]] | DataReader | str | os.PathLike[str]


@dataclass(frozen=True)
class InputSpec:
    """A model input as calibration data must match it: name, dims (None where free) and dtype."""

    name: str
    dims: tuple[int | None, ...]
    dtype: np.dtype

    def describe(self) -> str:
        """E.g. ``input float32[N,1,28,28]``."""
        dims = ",".join("N" if d is None else str(d) for d in self.dims)
        return f"{self.name} {self.dtype}[{dims}]"


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))))
    return specs


def batch_size(batch: Mapping[str, np.ndarray]) -> int:
    """Samples in a batch: the first axis of its batched inputs (rank-0 inputs, such as an If's condition, have none)."""
    return next((len(v) for v in batch.values() if np.ndim(v) > 0), 1)


def batch_slice(batch: Mapping[str, np.ndarray], start: int | None, stop: int | None) -> dict[str, np.ndarray]:
    """Samples ``start:stop`` of a batch; rank-0 inputs go with every slice whole."""
    return {k: v[start:stop] if np.ndim(v) > 0 else v for k, v in batch.items()}



def first_samples(batches: list[dict[str, np.ndarray]], samples: int) -> list[dict[str, np.ndarray]]:
    """The first ``samples`` samples of ``batches``, in batches."""
    out, count = [], 0
    for batch in batches:
        if count >= samples:
            break
        out.append(batch_slice(batch, None, samples - count))
        count += batch_size(out[-1])
    return out


#: Bytes of fetched tensors one onnxruntime run should return. Batches are cut to stay under it: ResNet-50 at 224x224
#: returns about 100 MB of activations a sample, and calibrating it 32 samples a run peaked at 7.1 GB of memory
#: against 0.9 GB one sample a run, which was also faster (10.6 against 21.9 s for 64 samples).
RUN_BYTES = 128 << 20


class RunSizer:
    """Cuts batches into pieces whose fetched outputs stay under ``limit`` bytes.

    The bytes a sample come from the declared shapes where they give them, else from the first run, which then gets one
    sample. A model with a fixed batch dimension is never cut.
    """

    def __init__(self, specs: list[InputSpec], per_sample: float | None = None, limit: int | None = None) -> None:
        self.splittable = not any(s.dims and s.dims[0] is not None for s in specs)
        self.limit = RUN_BYTES if limit is None else limit
        self.per_sample = per_sample  # bytes the fetched tensors take a sample, when the shapes tell it ahead

    def pieces(self, batch: Mapping[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """The batch in pieces, each sized from what the runs so far returned (see :meth:`record`)."""
        size = batch_size(batch)
        start = 0
        while start < size:
            if not self.splittable:
                step = size
            elif self.per_sample is None:
                step = 1
            else:
                step = max(1, int(self.limit // max(self.per_sample, 1.0)))
            yield dict(batch) if start == 0 and step >= size else batch_slice(batch, start, start + step)
            start += step

    def record(self, piece: Mapping[str, np.ndarray], outputs: Iterable[np.ndarray]) -> None:
        """Note what a run on ``piece`` returned (its bytes a sample size the next pieces)."""
        if self.per_sample is None:
            self.per_sample = sum(np.asarray(o).nbytes for o in outputs) / max(batch_size(piece), 1)


def calibration_batches(source: CalibrationData, specs: list[InputSpec], limit: int | None) -> Iterator[dict[str, np.ndarray]]:
    """Checked batches from any supported source, ``limit`` samples at most (all when None)."""
    label = os.fspath(source) if isinstance(source, str | os.PathLike) else "calibration data"
    items = read_path(Path(source), specs) if isinstance(source, str | os.PathLike) else _iterate(source)
    seen = 0
    for item in items:
        for batch in _rebatch(check_batch(item, specs, label), specs):
            size = batch_size(batch)
            if limit is not None and seen + size > limit:
                batch = batch_slice(batch, None, limit - seen)
                size = limit - seen
            if size:
                yield batch
                seen += size
            if limit is not None and seen >= limit:
                return
    if seen == 0:
        raise OnnxqError(label, "holds no samples")


def check_batch(item: Mapping[str, Any], specs: list[InputSpec], label: str) -> dict[str, np.ndarray]:
    """One batch with names, ranks, fixed dims and dtypes checked against the model (a missing batch axis is added)."""
    if not isinstance(item, Mapping):
        raise OnnxqError(label, f"each item must be a dict of input name -> array, got {type(item).__name__}")
    wanted = {s.name for s in specs}
    missing, extra = sorted(wanted - set(item)), sorted(set(item) - wanted)
    if missing or extra:
        expected = ", ".join(s.describe() for s in specs)
        raise OnnxqError(label, f"input names {sorted(item)} do not match the model's inputs ({expected})")
    batch = {s.name: _conform(np.asarray(item[s.name]), s, label) for s in specs}
    sizes = {len(v) for v in batch.values() if v.ndim > 0}
    if len(sizes) > 1:
        raise OnnxqError(label, f"inputs have different numbers of samples: {sorted(sizes)}")
    return batch


def _rebatch(batch: dict[str, np.ndarray], specs: list[InputSpec]) -> Iterator[dict[str, np.ndarray]]:
    """Split a batch into pieces of the model's fixed batch size, if it has one (e.g. 1)."""
    fixed = {s.dims[0] for s in specs if s.dims and s.dims[0] is not None}
    size = batch_size(batch)
    step = fixed.pop() if len(fixed) == 1 else size
    for start in range(0, size - step + 1, max(step, 1)):
        yield batch_slice(batch, start, start + step)


def _conform(array: np.ndarray, spec: InputSpec, label: str) -> np.ndarray:
    """``array`` as a batch for ``spec``: rank, fixed dims and dtype kind must agree; floats are cast to the model's float type."""
    if array.ndim == len(spec.dims) - 1 and spec.dims:
        array = array[None]
    if array.ndim != len(spec.dims):
        raise OnnxqError(label, f"input {spec.name!r} has shape {list(array.shape)}, the model expects {spec.describe()}")
    for got, want in zip(array.shape[1:], spec.dims[1:], strict=True):  # the batch axis is free: see _rebatch
        if want is not None and got != want:
            raise OnnxqError(label, f"input {spec.name!r} has shape {list(array.shape)}, the model expects {spec.describe()}")
    if array.dtype != spec.dtype:
        if not (array.dtype.kind == "f" and spec.dtype.kind == "f"):
            raise OnnxqError(label, f"input {spec.name!r} is {array.dtype}, the model expects {spec.dtype}")
        array = array.astype(spec.dtype)
    return array


def _iterate(source: Iterable[Mapping[str, np.ndarray]] | DataReader) -> Iterator[Mapping[str, np.ndarray]]:
    """Items of an iterable, or of an onnxruntime CalibrationDataReader until it returns None."""
    if hasattr(source, "get_next"):
        while (item := source.get_next()) is not None:
            yield item
        return
    yield from source


def read_path(path: Path, specs: list[InputSpec]) -> Iterator[dict[str, np.ndarray]]:
    """Batches from an .npy/.npz file (first axis = samples) or a folder of images."""
    if not path.exists():
        raise OnnxqError(path, "no such file or folder")
    if path.is_dir():
        return _read_images(path, specs)
    if path.suffix == ".npy":
        return _chunks(_read_npy(path, specs), specs)
    if path.suffix == ".npz":
        return _chunks(_read_npz(path, specs), specs)
    raise OnnxqError(path, "calibration data must be an .npy or .npz file, or a folder of images")


def _read_npy(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise OnnxqError(path, f"an .npy file holds one array but the model has inputs {names}: use an .npz keyed by input name")
    try:
        return {specs[0].name: np.load(path, mmap_mode="r", allow_pickle=False)}
    except (OSError, ValueError) as e:
        raise OnnxqError(path, f"not a readable .npy file ({e})") from e


def _read_npz(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise OnnxqError(path, f"not a readable .npz file ({e})") from e
    keys = list(archive.keys())
    if len(specs) == 1 and len(keys) == 1:
        return {specs[0].name: archive[keys[0]]}
    missing = sorted({s.name for s in specs} - set(keys))
    if missing:
        raise OnnxqError(path, f"has arrays {keys} but no array for model input(s) {missing}")
    return {s.name: archive[s.name] for s in specs}


def _chunks(arrays: dict[str, np.ndarray], specs: list[InputSpec]) -> Iterator[dict[str, np.ndarray]]:
    """Split whole arrays (first axis = samples) into batches the model accepts."""
    size = DEFAULT_BATCH
    count = min(len(a) for a in arrays.values()) if all(a.ndim for a in arrays.values()) else 0
    for start in range(0, count, size):
        yield {name: np.asarray(a[start : start + size]) for name, a in arrays.items()}


def _read_images(folder: Path, specs: list[InputSpec]) -> Iterator[dict[str, np.ndarray]]:
    """Images resized to the model's (C, H, W) input and scaled to [0, 1], in file-name order."""
    if len(specs) != 1 or len(specs[0].dims) != 4 or None in specs[0].dims[1:] or specs[0].dims[1] not in (1, 3):
        expected = ", ".join(s.describe() for s in specs)
        raise OnnxqError(folder, f"a folder of images needs a model with one NCHW input of 1 or 3 channels and fixed size, this one has {expected}")
    try:
        from PIL import Image
    except ImportError as e:
        raise OnnxqError(folder, "reading images needs Pillow: pip install 'onnxq[images]'") from e
    spec = specs[0]
    _, channels, height, width = spec.dims
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise OnnxqError(folder, f"holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for start in range(0, len(files), DEFAULT_BATCH):
        batch = []
        for file in files[start : start + DEFAULT_BATCH]:
            try:
                with Image.open(file) as image:
                    picture = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
            except OSError as e:
                raise OnnxqError(file, f"not a readable image ({e})") from e
            pixels = np.asarray(picture, dtype=np.float32) / 255.0
            batch.append(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))
        yield {spec.name: np.stack(batch).astype(spec.dtype)}
