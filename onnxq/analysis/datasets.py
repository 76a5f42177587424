"""Labelled image data for evaluation and calibration: IDX files (MNIST, Fashion-MNIST) and ``.npz``.

Images come back as float32 NCHW arrays scaled to [0, 1], which is what the models
we ship take; labels as int64.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxq.errors import OnnxqError

#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass(frozen=True)
class LabelledImages:
    """Images (N, C, H, W) float32 in [0, 1] and their integer labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def head(self, n: int | None) -> LabelledImages:
        """The first ``n`` samples (all when ``n`` is None)."""
        if n is None:
            return self
        return LabelledImages(self.images[:n], self.labels[:n])


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array of its stored shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise OnnxqError(path, f"cannot read IDX file: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise OnnxqError(path, "not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape)) if shape else 1
    if len(raw) < header + count * dtype.itemsize:
        raise OnnxqError(path, f"IDX file is truncated: header says {shape}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise OnnxqError(folder, f"no {stem}[.gz] in this folder")


def load_idx_split(folder: str | os.PathLike[str], split: str = "test") -> LabelledImages:
    """Load the ``train`` or ``test`` split of an MNIST-layout IDX folder."""
    folder = Path(folder)
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
    return LabelledImages(_to_nchw_unit(images), labels.astype(np.int64))


def load_npz(path: str | os.PathLike[str]) -> LabelledImages:
    """Load an ``.npz`` with arrays ``x`` (images; uint8 is scaled by 1/255) and ``y`` (labels)."""
    path = Path(path)
    try:
        data = np.load(path)
    except (OSError, ValueError, EOFError) as e:
        raise OnnxqError(path, f"cannot read .npz: {e}") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise OnnxqError(path, "holds a single array; expected an .npz with arrays 'x' (images) and 'y' (labels)")
    with data:
        if "x" not in data.files or "y" not in data.files:
            raise OnnxqError(path, f"expected arrays 'x' (images) and 'y' (labels), found {', '.join(data.files) or 'none'}")
        x, y = data["x"], np.asarray(data["y"]).astype(np.int64).reshape(-1)
    if len(x) != len(y):
        raise OnnxqError(path, f"{len(x)} images but {len(y)} labels")
    return LabelledImages(_to_nchw_unit(x), y)


def load_labelled(path: str | os.PathLike[str], split: str = "test") -> LabelledImages:
    """Load labelled images from an IDX folder or an ``.npz`` file."""
    path = Path(path)
    if path.is_dir():
        return load_idx_split(path, split)
    if path.suffix == ".npz":
        return load_npz(path)
    if not path.exists():
        raise OnnxqError(path, "no such file or folder")
    raise OnnxqError(path, "expected an IDX folder or an .npz file with 'x' and 'y'")


def _to_nchw_unit(x: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, C, H, W) images as float32 NCHW; integer pixels are scaled to [0, 1]."""
    scale = 1.0 / 255.0 if np.issubdtype(x.dtype, np.integer) else 1.0
    x = np.asarray(x, dtype=np.float32) * np.float32(scale)
    if x.ndim == 3:
        x = x[:, None, :, :]
    return np.ascontiguousarray(x)
