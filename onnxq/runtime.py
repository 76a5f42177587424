"""Running models in onnxruntime: sessions with onnxq's settings."""

from __future__ import annotations

import os

import onnxruntime as ort


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options onnxq uses everywhere; ``threads`` caps intra-op threads."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def session(path: str | os.PathLike[str] | bytes, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session for a model file (or serialized bytes)."""
    model = path if isinstance(path, bytes) else os.fspath(path)
    return ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
