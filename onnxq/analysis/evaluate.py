"""Top-1 accuracy of image classifiers in onnxruntime, for comparing float and quantized models."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from onnxq.analysis.datasets import LabelledImages
from onnxq.errors import OnnxqError
from onnxq.native.session import session


@dataclass(frozen=True)
class Accuracy:
    """Top-1 accuracy of one model on one data set."""

    model: str
    correct: int
    total: int

    @property
    def top1(self) -> float:
        """Fraction of samples whose highest logit is the label."""
        return self.correct / self.total if self.total else 0.0


def predict(path: str | os.PathLike[str] | bytes, images: np.ndarray, batch_size: int = 500, threads: int | None = None) -> np.ndarray:
    """Argmax class of the model's first output for each image, run in batches (``path`` may be serialized bytes)."""
    sess = session(path, threads)
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise OnnxqError(_label(path), f"evaluation needs a model with one input, this one has {len(inputs)}")
    first_dim = inputs[0].shape[0] if inputs[0].shape else None
    if isinstance(first_dim, int):
        batch_size = first_dim
    name = inputs[0].name
    out = []
    for start in range(0, len(images), batch_size):
        logits = sess.run(None, {name: images[start : start + batch_size]})[0]
        out.append(np.argmax(logits.reshape(len(logits), -1), axis=1))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def accuracy(path: str | os.PathLike[str] | bytes, data: LabelledImages, batch_size: int = 500, threads: int | None = None) -> Accuracy:
    """Top-1 accuracy of the model at ``path`` (or serialized model bytes) on ``data``."""
    predicted = predict(path, data.images, batch_size, threads)
    return Accuracy(_label(path), int(np.sum(predicted == data.labels)), len(data.labels))


def _label(path: str | os.PathLike[str] | bytes) -> str:
    return "<model in memory>" if isinstance(path, bytes) else os.fspath(path)
