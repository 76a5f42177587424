"""Opsets: which one a model imports, which ones onnxq's formats need, and converting a model up to one."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import onnx
from onnx import version_converter

from onnxq.errors import OnnxqError
from onnxq.model.skeleton import on_skeleton

if TYPE_CHECKING:
    from onnxq.model.load import LoadedModel

#: Oldest default-domain opset onnxq works on; older models are converted up to it first.
MIN_OPSET = 13
#: First opset whose DequantizeLinear takes float16 scales (and so gives float16 weights).
FLOAT16_SCALE_OPSET = 19
#: First opset with int4 QuantizeLinear/DequantizeLinear.
INT4_OPSET = 21
#: IR version that goes with opset 21.
INT4_IR_VERSION = 10
#: The names of ONNX's default domain.
DEFAULT_DOMAINS = ("", "ai.onnx")


def is_default_domain(domain: str) -> bool:
    """Whether ``domain`` names ONNX's default domain (written "" or "ai.onnx")."""
    return domain in DEFAULT_DOMAINS


def default_opset(model: onnx.ModelProto) -> int | None:
    """The model's opset version of the default ONNX domain."""
    for imp in model.opset_import:
        if is_default_domain(imp.domain):
            return imp.version
    return None


def ensure_opset(loaded: LoadedModel, minimum: int) -> None:
    """Convert the model in place to at least ``minimum`` of the default domain, or fail clearly."""
    current = default_opset(loaded.model)
    if current is not None and current >= minimum:
        return
    metadata = {node.name: list(node.metadata_props) for node in loaded.model.graph.node if node.name and node.metadata_props}
    try:
        on_skeleton(loaded.model, lambda m: version_converter.convert_version(m, minimum))
    except Exception as e:  # the converter raises RuntimeError or its own errors
        reason = _conversion_failure(loaded.model, e)
        hint = " (int4 weights with quantized activations need opset 21; -b 5 or more keeps the opset)" if minimum >= INT4_OPSET else ""
        raise OnnxqError(loaded.label, f"cannot convert opset {current} to {minimum}: {reason}{hint}") from e
    for node in loaded.model.graph.node:  # the converter drops nodes' metadata_props (exporters' source locations)
        if not node.metadata_props and node.name in metadata:
            node.metadata_props.extend(metadata[node.name])
    if minimum >= INT4_OPSET:
        loaded.model.ir_version = max(loaded.model.ir_version, INT4_IR_VERSION)


def ensure_int4_ir(model: onnx.ModelProto) -> None:
    """Raise the IR version to the one int4 tensors need where the graph stores any (a weight-only model keeps its opset)."""
    packed = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    if any(t.data_type in packed for t in model.graph.initializer):
        model.ir_version = max(model.ir_version, INT4_IR_VERSION)


#: The file/line/assertion prefix of the version converter's C++ messages.
_ASSERTION_PREFIX = re.compile(r"^.*?Assertion `.*?` failed: ")


def _conversion_failure(model: onnx.ModelProto, error: Exception) -> str:
    """Why the version converter failed, said briefly: ops onnx does not know, or its message without the C++ prefix."""
    unknown = sorted({n.op_type for n in model.graph.node if is_default_domain(n.domain) and not onnx.defs.has(n.op_type)})
    if unknown:
        return f"ops that onnx {onnx.__version__} does not know: {', '.join(unknown)}"
    text = str(error).strip()
    return _ASSERTION_PREFIX.sub("", text.splitlines()[0]) if text else type(error).__name__
