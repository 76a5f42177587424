"""IDX and .npz readers (onnxq.analysis.datasets) on files written by hand, plus the installed Fashion-MNIST."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from onnxq.analysis.datasets import FASHION_MNIST_DIR, load_idx_split, load_labelled, load_npz, read_idx
from onnxq.errors import OnnxqError


def idx_bytes(array: np.ndarray, type_code: int = 0x08, big_endian_dtype: str = "u1") -> bytes:
    """The IDX encoding written out by hand: 0, 0, type, ndim, big-endian uint32 dims, big-endian data."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.dtype(big_endian_dtype).newbyteorder(">")).tobytes()


def write(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    x[0, 0, 0], x[-1, -1, -1] = 0, 255
    return x


@pytest.fixture
def labels() -> np.ndarray:
    return np.array([3, 0, 9, 9, 1], dtype=np.uint8)


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_uint8_images_and_labels(tmp_path: Path, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    """3-D uint8 images and 1-D labels come back with their stored shape, dtype and values,
    gzipped or not (the header's row-major order is kept: image i, row r, column c)."""
    ext = ".gz" if gz else ""
    img = read_idx(write(tmp_path / f"img-idx3-ubyte{ext}", idx_bytes(images)))
    lab = read_idx(write(tmp_path / f"lab-idx1-ubyte{ext}", idx_bytes(labels)))
    assert img.shape == (5, 4, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, images)
    assert lab.shape == (5,) and lab.dtype == np.uint8
    np.testing.assert_array_equal(lab, labels)


def test_read_idx_big_endian_types(tmp_path: Path) -> None:
    """Multi-byte IDX types are big-endian: int32 (0x0C) and float32 (0x0D) values decode right."""
    ints = np.array([[1, -2, 70000], [0, 2**31 - 1, -(2**31)]], dtype=np.int64)
    got = read_idx(write(tmp_path / "ints.idx", idx_bytes(ints, 0x0C, "i4")))
    np.testing.assert_array_equal(got.astype(np.int64), ints)
    floats = np.array([0.5, -1.25, 3e10], dtype=np.float32)
    got = read_idx(write(tmp_path / "floats.idx", idx_bytes(floats, 0x0D, "f4")))
    np.testing.assert_array_equal(got.astype(np.float32), floats)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x08",  # too short for a magic number
        b"\x01\x00\x08\x01\x00\x00\x00\x01\x05",  # first byte not 0
        b"\x00\x00\x07\x01\x00\x00\x00\x01\x05",  # unknown type code
        b"GIF89a........",
    ],
)
def test_read_idx_bad_magic_names_file(tmp_path: Path, data: bytes) -> None:
    """A file without an IDX magic number raises OnnxqError whose message names the file."""
    path = write(tmp_path / "bad-idx1-ubyte", data)
    with pytest.raises(OnnxqError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("cut", ["data", "header"])
def test_read_idx_truncated_names_file(tmp_path: Path, images: np.ndarray, gz: bool, cut: str) -> None:
    """A file shorter than its header promises (data or dims cut off) raises OnnxqError naming it."""
    full = idx_bytes(images)
    data = full[:-7] if cut == "data" else full[:10]
    path = write(tmp_path / ("short-idx3-ubyte" + (".gz" if gz else "")), data)
    with pytest.raises(OnnxqError) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_truncated_gzip_stream_names_file(tmp_path: Path, images: np.ndarray) -> None:
    """A gzip stream cut short (not just short content) is an OnnxqError naming the file."""
    whole = gzip.compress(idx_bytes(images))
    path = tmp_path / "cut-idx3-ubyte.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(OnnxqError) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    """A missing file is an OnnxqError too, naming the path."""
    path = tmp_path / "nothing-idx1-ubyte"
    with pytest.raises(OnnxqError) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_load_idx_split_scales_and_adds_channel(tmp_path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """An MNIST-layout folder (gzipped images, plain labels) loads as float32 NCHW /255 and int64."""
    write(tmp_path / "t10k-images-idx3-ubyte.gz", idx_bytes(images))
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(labels))
    data = load_labelled(tmp_path, "test")
    assert data.images.shape == (5, 1, 4, 3) and data.images.dtype == np.float32
    np.testing.assert_allclose(data.images[:, 0], images.astype(np.float64) / 255.0, rtol=1e-6)
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.labels, labels)
    assert len(data.head(2).images) == 2 and len(data.head(None).labels) == 5
    with pytest.raises(OnnxqError):
        load_idx_split(tmp_path, "train")  # no train files in this folder


# ---------------------------------------------------------------- npz and load_labelled


def test_load_npz_uint8_scaled_and_channel_added(tmp_path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """uint8 (N, H, W) images become float32 (N, 1, H, W) / 255; labels int64 (N,)."""
    path = tmp_path / "data.npz"
    np.savez(path, x=images, y=labels.reshape(5, 1))
    data = load_npz(path)
    assert data.images.shape == (5, 1, 4, 3) and data.images.dtype == np.float32
    np.testing.assert_allclose(data.images[:, 0], images / 255.0, rtol=1e-6)
    assert data.images.min() == 0.0 and data.images.max() == pytest.approx(1.0)
    assert data.labels.dtype == np.int64 and data.labels.shape == (5,)
    np.testing.assert_array_equal(data.labels, labels)
    # load_labelled dispatches on the .npz suffix to the same result.
    np.testing.assert_array_equal(load_labelled(path).images, data.images)


def test_load_npz_float_nchw_untouched(tmp_path: Path) -> None:
    """Float images already in NCHW are kept as they are (no rescaling, no extra axis)."""
    x = np.random.default_rng(1).random((3, 2, 4, 4)).astype(np.float32)
    path = tmp_path / "f.npz"
    np.savez(path, x=x, y=np.array([0, 1, 2]))
    data = load_npz(path)
    np.testing.assert_array_equal(data.images, x)


def test_load_npz_missing_arrays_names_file(tmp_path: Path) -> None:
    """An .npz without 'x' and 'y' raises OnnxqError naming the file."""
    path = tmp_path / "wrong.npz"
    np.savez(path, images=np.zeros((2, 3, 3)), labels=np.zeros(2))
    with pytest.raises(OnnxqError) as info:
        load_npz(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["missing.npz", "missing_folder", "missing.idx"])
def test_load_labelled_missing_path(tmp_path: Path, name: str) -> None:
    """A path that does not exist raises OnnxqError (not a bare OSError) naming it."""
    path = tmp_path / name
    with pytest.raises(OnnxqError) as info:
        load_labelled(path)
    assert str(path) in str(info.value)


def test_load_labelled_unknown_file_type(tmp_path: Path) -> None:
    """An existing file that is neither a folder nor an .npz is refused with OnnxqError."""
    path = tmp_path / "data.csv"
    path.write_text("1,2,3\n")
    with pytest.raises(OnnxqError):
        load_labelled(path)


def test_load_npz_with_npy_content_is_onnxq_error(tmp_path: Path) -> None:
    """A file named .npz that actually holds a single .npy array is a user error naming the file."""
    path = tmp_path / "single.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(OnnxqError):
        load_npz(path)


# ---------------------------------------------------------------- the installed data set


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason=f"{FASHION_MNIST_DIR} is absent (Debian package dataset-fashion-mnist)")
def test_fashion_mnist_test_split() -> None:
    """The installed Fashion-MNIST test split: 10,000 images (1, 28, 28) in [0, 1], labels 0..9,
    1,000 of each class."""
    data = load_labelled(FASHION_MNIST_DIR, "test")
    assert data.images.shape == (10_000, 1, 28, 28) and data.images.dtype == np.float32
    assert data.images.min() == 0.0 and data.images.max() == 1.0
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(data.labels, minlength=10), np.full(10, 1000))
    assert data.labels.min() == 0 and data.labels.max() == 9
    # Values are multiples of 1/255 (uint8 pixels scaled), and not all images are alike.
    np.testing.assert_allclose(data.images[:50] * 255.0, np.round(data.images[:50] * 255.0), atol=1e-3)
    assert data.images[:100].std(axis=(1, 2, 3)).min() > 0
