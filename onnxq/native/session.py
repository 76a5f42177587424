"""Running models in onnxruntime: sessions with onnxq's settings and its custom-op library."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxq.errors import OnnxqError
from onnxq.native.built import find_built
from onnxq.native.domain import DOMAIN

LIBRARY_NAME = "libonnxq_ops.so"
#: Environment variable naming another build of the op library to load instead of the installed one
#: (tests/test_sanitizers.py points it at a build under AddressSanitizer/UBSan).
LIBRARY_ENV = "ONNXQ_OPS_LIBRARY"


def get_library_path() -> str:
    """Path of onnxq's onnxruntime custom-op library, for ``SessionOptions.register_custom_ops_library``.

    The environment variable ``ONNXQ_OPS_LIBRARY``, when set and not empty, names the library file to
    use instead of the installed one: another build of it, e.g. one under sanitizers.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        if not Path(override).is_file():
            raise OnnxqError(override, f"no such op library file (named by the environment variable {LIBRARY_ENV})")
        return os.path.abspath(override)
    path = find_built(LIBRARY_NAME)
    if path is None:
        raise OnnxqError(None, f"onnxq's op library {LIBRARY_NAME} is missing: onnxq was not built; reinstall it with `pip install .`")
    return str(path)


def session_options(threads: int | None = None, custom_ops: bool = False) -> ort.SessionOptions:
    """Session options onnxq uses everywhere; ``threads`` caps intra-op threads, ``custom_ops`` registers onnxq's library."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if custom_ops:
        library = get_library_path()
        try:
            options.register_custom_ops_library(library)
        except Exception as error:  # onnxruntime raises its own (non-public) exception types
            raise OnnxqError(library, f"onnxruntime cannot load onnxq's op library: {error}") from error
    return options


def uses_onnxq_ops(model: str | os.PathLike[str] | bytes | onnx.ModelProto) -> bool:
    """Whether a model imports onnxq's op domain (and so needs the library to run)."""
    if isinstance(model, bytes):
        proto = onnx.ModelProto()
        proto.ParseFromString(model)
        model = proto
    elif not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    return any(imp.domain == DOMAIN for imp in model.opset_import)


def session(path: str | os.PathLike[str] | bytes, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session for a model file (or serialized bytes), with onnxq's ops where it uses them."""
    model = path if isinstance(path, bytes) else os.fspath(path)
    options = session_options(threads, custom_ops=uses_onnxq_ops(model))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
