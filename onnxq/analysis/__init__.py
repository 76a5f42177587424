"""Measuring models: per-layer sensitivity, mixed precision, the float check, top-1 evaluation, ``onnxq inspect``."""
