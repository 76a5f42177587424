"""Calibration data: files, folders of images, Python iterables and onnxruntime readers, as checked runs.

Every source becomes a stream of runs, ``{input name: array}`` dicts whose names, ranks, fixed dimensions and dtypes
match the model's inputs, capped at a number of samples (counted along the inputs' sample axes: onnxq/calibrate/
samples.py says which axis that is for each input).

- An item of a Python iterable or of an onnxruntime ``CalibrationDataReader`` is one run, as onnxruntime's
  ``quantize_static`` takes it: its arrays are passed as they are (a missing sample axis is added; runs may be cut
  into pieces along sample axes to bound memory, never regrouped).
- An .npy/.npz file holds many samples along each input's sample axis (axis 0 for [N, ...] inputs, axis 1 for a
  [2, N, 128] state); onnxq feeds them 32 at a time. An input without a sample axis (a scalar, a fixed-size state)
  is stored once, as the model takes it, and fed to every run. A model with a fixed batch of B takes arrays of k * B
  along axis 0, fed B at a time.
- A folder of images feeds a model with one NCHW input.

Files are read lazily (an .npy is memory-mapped), so memory does not grow with the data set.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from onnxq.calibrate.samples import InputSpec, batch_size, batch_slice, cuttable, sample_axes
from onnxq.errors import OnnxqError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
DEFAULT_BATCH = 32


class DataReader(Protocol):
    """onnxruntime's ``CalibrationDataReader`` interface: ``get_next()`` returns a dict or None at the end."""

    def get_next(self) -> Mapping[str, np.ndarray] | None: ...  # noqa: D102


CalibrationData = Iterable[Mapping[str, np.ndarray]] | DataReader | str | os.PathLike[str]


def calibration_batches(source: CalibrationData, specs: list[InputSpec], limit: int | None) -> Iterator[dict[str, np.ndarray]]:
    """Checked runs from any supported source, ``limit`` samples at most (all when None).

    The last run is cut to fit where runs can be cut (along sample axes), else taken whole.
    """
    label = os.fspath(source) if isinstance(source, str | os.PathLike) else "calibration data"
    items = read_path(Path(source), specs) if isinstance(source, str | os.PathLike) else _iterate(source)
    axes = sample_axes(specs)
    seen = 0
    for item in items:
        for batch in _fixed_batches(check_batch(item, specs, label), specs):
            size = batch_size(batch, axes)
            if limit is not None and seen + size > limit and cuttable(axes):
                batch = batch_slice(batch, axes, None, limit - seen)
                size = limit - seen
            if size:
                yield batch
                seen += size
            if limit is not None and seen >= limit:
                return
    if seen == 0:
        raise OnnxqError(label, "holds no samples")


def check_batch(item: Mapping[str, Any], specs: list[InputSpec], label: str) -> dict[str, np.ndarray]:
    """One run with names, ranks, fixed dims and dtypes checked against the model (a missing sample axis is added)."""
    if not isinstance(item, Mapping):
        raise OnnxqError(label, f"each item must be a dict of input name -> array, got {type(item).__name__}")
    wanted = {s.name for s in specs}
    missing, extra = sorted(wanted - set(item)), sorted(set(item) - wanted)
    if missing or extra:
        expected = ", ".join(s.describe() for s in specs)
        raise OnnxqError(label, f"input names {sorted(item)} do not match the model's inputs ({expected})")
    batch = {s.name: _conform(np.asarray(item[s.name]), s, label) for s in specs}
    sizes = {s.name: (batch[s.name].shape[s.sample_axis], s.sample_axis) for s in specs if s.sample_axis is not None}
    if len({size for size, _ in sizes.values()}) > 1:
        listed = ", ".join(f"{name} {size} (axis {axis})" for name, (size, axis) in sizes.items())
        raise OnnxqError(label, f"inputs hold different numbers of samples along their sample axes: {listed}")
    return batch


def _fixed_batches(batch: dict[str, np.ndarray], specs: list[InputSpec]) -> Iterator[dict[str, np.ndarray]]:
    """A run whose fixed-batch inputs hold several batches (k * B along axis 0) as k runs; any other run as it is."""
    repeats = {len(batch[s.name]) // s.dims[0] for s in specs if _fixed_batch(s) and len(batch[s.name]) != s.dims[0]}
    if not repeats:
        yield batch
        return
    if len(repeats) > 1:
        raise OnnxqError(None, f"inputs of a fixed batch hold different numbers of batches: {sorted(repeats)}")
    count = repeats.pop()
    for k in range(count):
        yield {s.name: batch[s.name][k * s.dims[0] : (k + 1) * s.dims[0]] if _fixed_batch(s) else batch[s.name] for s in specs}


def _fixed_batch(spec: InputSpec) -> bool:
    """Whether an input has no sample axis but a fixed axis 0 that data may hold several times over."""
    return spec.sample_axis is None and bool(spec.dims) and spec.dims[0] is not None


def _conform(array: np.ndarray, spec: InputSpec, label: str) -> np.ndarray:
    """``array`` as ``spec``'s part of a run: rank, fixed dims and dtype kind must agree; floats are cast to the model's float type."""
    axis = spec.sample_axis
    if axis is not None and array.ndim == len(spec.dims) - 1:
        array = np.expand_dims(array, axis)  # one sample given without its sample axis
    if array.ndim != len(spec.dims):
        if not spec.dims:
            raise OnnxqError(label, f"input {spec.name!r} is a scalar ({spec.describe()}): give it as one value (shape []); "
                             "it is fed to every run")
        raise OnnxqError(label, f"input {spec.name!r} has shape {list(array.shape)}, the model expects {spec.describe()}")
    for index, (got, want) in enumerate(zip(array.shape, spec.dims, strict=True)):
        several_batches = index == 0 and _fixed_batch(spec) and got % want == 0 and got > 0  # see _fixed_batches
        if want is not None and index != axis and got != want and not several_batches:
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
        return _chunks(_read_npy(path, specs), specs, path)
    if path.suffix == ".npz":
        return _chunks(_read_npz(path, specs), specs, path)
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


def _chunks(arrays: dict[str, np.ndarray], specs: list[InputSpec], label: Path) -> Iterator[dict[str, np.ndarray]]:
    """Whole arrays as runs of DEFAULT_BATCH samples along each input's sample axis; inputs without one go whole with every run."""
    axes = sample_axes(specs)
    batched = {name: axes[name] for name, a in arrays.items() if axes[name] is not None and a.ndim > axes[name]}
    sizes = {name: arrays[name].shape[axis] for name, axis in batched.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {size} (axis {batched[name]})" for name, size in sizes.items())
        raise OnnxqError(label, f"arrays hold different numbers of samples along the inputs' sample axes: {listed}")
    if not sizes:  # no sample axis: one run, or a fixed batch held several times over (_fixed_batches cuts the runs)
        fixed = {s.name: s.dims[0] for s in specs if _fixed_batch(s) and arrays[s.name].ndim and len(arrays[s.name]) > s.dims[0]}
        groups = max((len(arrays[name]) // size for name, size in fixed.items()), default=1)
        for start in range(0, groups, DEFAULT_BATCH):
            yield {name: np.asarray(a[start * fixed[name] : (start + DEFAULT_BATCH) * fixed[name]] if name in fixed else a)
                   for name, a in arrays.items()}
        return
    count = next(iter(sizes.values()))
    for start in range(0, count, DEFAULT_BATCH):
        yield {name: np.asarray(batch_slice({name: a}, batched, start, start + DEFAULT_BATCH)[name]) for name, a in arrays.items()}


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
