"""Running models in onnxruntime: sessions with onnxq's settings, with its op library where a model needs it."""

from __future__ import annotations

import os

import onnx
import onnxruntime as ort

from onnxq.errors import OnnxqError
from onnxq.native.domain import DOMAIN
from onnxq.native.library import get_library_path


def session_options(threads: int | None = None, custom_ops: bool = False) -> ort.SessionOptions:
    """Session options onnxq uses everywhere; ``threads`` caps intra-op threads, ``custom_ops`` registers onnxq's library.

    The intra-op threads do not spin between runs: onnxq's sessions alternate runs with numpy work on the same cores
    (a calibration pass sums H after each run), which spinning threads take a core from (MiniLM's calibration pass on
    2 cores: 5.0 s spinning, 3.4 s not, one-off runs 2026-12-05).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
