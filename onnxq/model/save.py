"""Writing models (and report files): atomically, with external data where needed, verified before they land.

The model is written under a temporary name in the destination folder, checked with
``onnx.checker`` and loaded in onnxruntime, and only then moved over the final name; a
failure leaves the destination as it was.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import onnx

from onnxq.errors import OnnxqError
from onnxq.model.external import is_external
from onnxq.model.graph import all_tensors
from onnxq.model.load import PROTOBUF_LIMIT, tensor_bytes


def check_output_path(output: Path, inputs: list[Path]) -> None:
    """Fail early if ``output`` would overwrite an input or its folder does not exist."""
    out = output.resolve()
    for path in inputs:
        if path.exists() and out == path.resolve():
            raise OnnxqError(output, "output path is the input model; choose another with -o")
    if not out.parent.is_dir():
        raise OnnxqError(output, f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise OnnxqError(output, "output path is a folder; give a file name")


def referenced_files(path: Path) -> set[Path]:
    """The external data files that the model file ``path`` refers to (absolute), read from its protobuf alone.

    Every tensor counts (:func:`onnxq.model.graph.all_tensors`). An unreadable model refers to none.
    """
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # not a model (or not one onnx can parse): nothing of it to count or keep
        return set()
    locations = {e.value for tensor in all_tensors(model.graph) if is_external(tensor) for e in tensor.external_data if e.key == "location"}
    return {(path.parent / location).resolve() for location in locations if location}


def save_model(model: onnx.ModelProto, output: str | os.PathLike[str], external_data: bool = False) -> Path:
    """Write ``model`` to ``output`` atomically and return the path.

    Tensors go to ``<output name>.data`` beside the model when ``external_data`` is set or
    the model is too big for one protobuf. Note that writing external data moves the
    tensors' bytes out of ``model``. A ``.data`` file that the replaced output used and the new
    one does not (every tensor stayed inline) is removed with it.
    """
    output = Path(output)
    external = external_data or tensor_bytes(model) > PROTOBUF_LIMIT // 2
    data_name = output.name + ".data"
    old_data = (output.parent / data_name).resolve()
    stale = old_data.is_file() and output.is_file() and old_data in referenced_files(output)  # parse the old output only then
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        tmp_model = tmp_dir / output.name
        if external:
            onnx.save_model(
                model,
                os.fspath(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, os.fspath(tmp_model))
        verify_model_file(tmp_model, output)
        wrote_data = (tmp_dir / data_name).exists()  # absent when every tensor was small enough to stay inline
        if wrote_data:
            os.replace(tmp_dir / data_name, output.parent / data_name)
        os.replace(tmp_model, output)
        if stale and not wrote_data:
            old_data.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return output


def write_files(files: Mapping[Path, bytes]) -> None:
    """Write several files so that each appears whole or not at all: all are written under temporary names first, then renamed."""
    tmp_dirs: dict[Path, Path] = {}
    try:
        staged = []
        for path, data in files.items():
            folder = path.parent
            if folder not in tmp_dirs:
                tmp_dirs[folder] = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
            tmp = tmp_dirs[folder] / path.name
            tmp.write_bytes(data)
            staged.append((tmp, path))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp_dir in tmp_dirs.values():
            shutil.rmtree(tmp_dir, ignore_errors=True)


def verify_model_file(path: Path, label: Path | None = None) -> None:
    """Check a written model with onnx.checker and by opening an onnxruntime session on it."""
    label = label or path
    try:
        onnx.checker.check_model(os.fspath(path))
    except onnx.checker.ValidationError as e:
        raise OnnxqError(label, f"quantized model fails onnx.checker: {str(e).strip().splitlines()[0]}") from e
    check_onnxruntime_loads(path, label, "quantized model")


#: What onnxruntime puts before the reason: status code and name, and the file it was loading (here a temporary).
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (?:Load model from .*? failed:)?\s*")


def check_onnxruntime_loads(path: Path, label: Path | None = None, what: str = "model") -> None:
    """Open an onnxruntime session on ``path``, or raise a one-line error naming ``label`` and onnxruntime's reason.

    onnxruntime's own error log is off: the exception says the same, and the CLI prints one line.
    """
    import onnxruntime as ort

    from onnxq.native.session import session_options, uses_onnxq_ops

    options = session_options(custom_ops=uses_onnxq_ops(path))
    options.log_severity_level = 4
    try:
        ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        text = str(e).strip()
        reason = _ORT_PREFIX.sub("", text.splitlines()[0]) if text else type(e).__name__
        raise OnnxqError(label or path, f"{what} does not load in onnxruntime: {reason}") from e
