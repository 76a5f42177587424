"""The ONNX domain of onnxq's custom ops, defined once: CMakeLists.txt reads it from here for the C++ library."""

from __future__ import annotations

# CMakeLists.txt parses this exact line (DOMAIN = "..."); keep it a plain string literal.
DOMAIN = "ai.onnxq"
