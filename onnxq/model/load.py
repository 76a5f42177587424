"""Loading models from disk or memory, and the checks a model must pass before onnxq works on it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxq.errors import OnnxqError, first_line
from onnxq.model.external import resolve
from onnxq.model.graph import all_tensors
from onnxq.model.opset import default_opset

#: Protobuf cannot serialise more than this, so bigger models must keep external data.
PROTOBUF_LIMIT = 2**31 - 1


@dataclass
class LoadedModel:
    """A model in memory and where it came from."""

    model: onnx.ModelProto
    path: Path | None
    external_data: bool
    declared: frozenset[str] = frozenset()  # the tensors the file itself gave shapes (value_info, bodies too), before onnxq inferred more

    @property
    def label(self) -> str:
        """How errors refer to this model."""
        return str(self.path) if self.path else "<model>"


def load(source: str | os.PathLike[str] | onnx.ModelProto) -> LoadedModel:
    """Load ``source`` (a path or a ModelProto, which is copied) and check that it is a valid model."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        loaded = LoadedModel(model, None, False)
    else:
        loaded = _load_file(Path(source))
    _check(loaded)
    return loaded


def read_model_file(path: Path) -> onnx.ModelProto:
    """Read a model file's protobuf without its external data, or fail with a one-line error naming the file."""
    if not path.exists():
        raise OnnxqError(path, "no such file")
    if path.is_dir():
        raise OnnxqError(path, "is a folder, expected an .onnx file")
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, onnx raises others
        raise OnnxqError(path, f"not a readable ONNX model ({type(e).__name__})") from e
    if not model.graph.node and not model.graph.initializer:
        raise OnnxqError(path, "not an ONNX model (empty graph)")
    return model


def _load_file(path: Path) -> LoadedModel:
    model = read_model_file(path)
    external = uses_external_data(model)
    if external:  # weights are read one at a time when needed (onnxq.model.external), never all at once
        resolve(model, path.parent, path)
    return LoadedModel(model, path, external)


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether any initializer of the main graph keeps its bytes in an external file."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the main graph's initializers: what decides if protobuf can serialise the model.

    Serialised sizes, so no tensor's bytes are copied to count them.
    """
    return sum(t.ByteSize() for t in model.graph.initializer)


def _check(loaded: LoadedModel) -> None:
    model = loaded.model
    try:
        if loaded.path is not None and (loaded.external_data or tensor_bytes(model) > PROTOBUF_LIMIT // 2):
            onnx.checker.check_model(os.fspath(loaded.path))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise OnnxqError(loaded.label, f"invalid ONNX model: {first_line(e)}") from e
    except UnicodeDecodeError as e:  # the checker's message quotes a name whose bytes are not UTF-8
        raise OnnxqError(loaded.label, "invalid ONNX model: a name or string in it is not valid UTF-8") from e
    opset = default_opset(model)
    if opset is None:
        raise OnnxqError(loaded.label, "model does not import the default ONNX domain")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise OnnxqError(loaded.label, f"opset {opset} is newer than onnx {onnx.__version__} knows (up to {newest})")
    _check_tensors(loaded)


#: Bits per element of the types ONNX packs several to a byte.
_PACKED_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.FLOAT4E2M1: 4}


def _check_tensors(loaded: LoadedModel) -> None:
    """Every stored tensor (initializers, Constant values) has a known type and exactly the data its shape needs.

    onnx.checker catches too little data but not too much, nor (in raw_data) an unknown
    type; numpy would later fail on them with a message that names no tensor, or
    onnxruntime refuse the output.
    """
    for t in all_tensors(loaded.model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING:
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except KeyError:
            raise OnnxqError(loaded.label, f"tensor {t.name} has unknown data type {t.data_type}") from None
        count = math.prod(t.dims)
        bits = _PACKED_BITS.get(t.data_type, 8 * itemsize)
        if t.raw_data:
            held, needed, unit = len(t.raw_data), (count * bits + 7) // 8, "bytes"
        else:
            held = len(getattr(t, onnx.helper.tensor_dtype_to_field(t.data_type)))
            complex_parts = 2 if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1
            needed, unit = ((count * bits + 7) // 8 if t.data_type in _PACKED_BITS else count * complex_parts), "values"
        if held != needed:
            type_name = onnx.TensorProto.DataType.Name(t.data_type)
            raise OnnxqError(loaded.label, f"tensor {t.name} holds {held} {unit} but its shape {tuple(t.dims)} of {type_name} needs {needed}")
