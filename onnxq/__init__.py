"""onnxq: post-training quantization of ONNX models (REQuant weight ranges; int4/int8 QDQ or onnxq's integer ops)."""

from __future__ import annotations

from onnxq.config import Granularity, NBitsMode, QuantizeConfig, RangeMethod, SqrtMode, WeightFormat
from onnxq.errors import OnnxqError
from onnxq.model.save import save_model
from onnxq.native.library import get_library_path
from onnxq.native.session import session
from onnxq.pipeline import QuantizationResult, quantize, quantize_with_report

__version__ = "0.1.0"

__all__ = [
    "Granularity",
    "NBitsMode",
    "OnnxqError",
    "QuantizationResult",
    "QuantizeConfig",
    "RangeMethod",
    "SqrtMode",
    "WeightFormat",
    "get_library_path",
    "quantize",
    "quantize_with_report",
    "save_model",
    "session",
]
