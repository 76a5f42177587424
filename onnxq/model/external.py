"""Weights kept in external data files, read one tensor at a time instead of all at load.

A model with external data is loaded without its bytes; each external tensor's location
is made absolute, so it can be read later from wherever the model is used. The quantizer
reads a weight when it quantizes it, so a model's float weights are never all in memory
at once. Whatever still refers to the files when the model must be whole (an
onnxruntime session, writing the output) is read in then (:func:`materialize`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.errors import OnnxqError


def is_external(tensor: onnx.TensorProto) -> bool:
    """Whether the tensor's bytes live in a file."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def resolve(model: onnx.ModelProto, base_dir: Path, label: Path) -> None:
    """Make every external initializer's location absolute (relative to ``base_dir``) and check it can be read."""
    for tensor in model.graph.initializer:
        if not is_external(tensor):
            continue
        entries = _entries(tensor)
        location = entries.get("location", "")
        path = (base_dir / location).resolve()
        if not location or not path.is_file():
            raise OnnxqError(label, f"cannot read its external data: tensor {tensor.name} points at missing file {location!r}")
        offset, length = int(entries.get("offset", 0)), int(entries.get("length", path.stat().st_size))
        if offset < 0 or length < 0 or offset + length > path.stat().st_size:
            raise OnnxqError(label, f"cannot read its external data: tensor {tensor.name} lies beyond the end of {location}")
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = os.fspath(path)


def read_bytes(tensor: onnx.TensorProto) -> bytes:
    """The raw bytes of an external tensor (location already absolute)."""
    entries = _entries(tensor)
    path = entries["location"]
    offset = int(entries.get("offset", 0))
    length = int(entries["length"]) if "length" in entries else os.path.getsize(path) - offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(length)
    if len(data) != length:
        raise OnnxqError(path, f"external data of tensor {tensor.name} is cut short")
    return data


def load_in_place(tensor: onnx.TensorProto) -> None:
    """Read an external tensor's bytes into the tensor itself."""
    data = read_bytes(tensor)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = data


def to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values, read from its file when external (the tensor itself is not changed)."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    inline = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    inline.raw_data = read_bytes(tensor)
    return numpy_helper.to_array(inline)


def materialize(model: onnx.ModelProto) -> int:
    """Read every external initializer of the main graph into the model; returns how many were."""
    count = 0
    for tensor in model.graph.initializer:
        if is_external(tensor):
            load_in_place(tensor)
            count += 1
    return count

