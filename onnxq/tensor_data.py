"""Big initializers' bytes set aside while onnx's C++ passes (version converter, shape inference) run.

Those passes serialise the whole model, parse it in C++ and hand back a new copy: several
times the model's size in memory, and impossible beyond protobuf's 2 GB. They need the
weights' types and shapes only, so the bytes of big tensors are moved out first and put
back into the pass's result by name.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

#: Initializers holding more than this are set aside; small ones (shapes, axes) stay, as passes may read them.
DETACH_BYTES = 1 << 20


def detach_large_tensors(model: onnx.ModelProto) -> dict[str, bytes]:
    """Move the raw bytes of the main graph's big initializers out of ``model``; returns them by tensor name."""
    held: dict[str, bytes] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.HasField("raw_data") and tensor.ByteSize() > DETACH_BYTES:
            held[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
    return held


def attach_tensors(model: onnx.ModelProto, held: dict[str, bytes]) -> None:
    """Put bytes set aside by :func:`detach_large_tensors` back into the initializers of ``model`` with those names.

    ``held`` is emptied as it goes, so each tensor's bytes exist once.
    """
    for tensor in model.graph.initializer:
        if tensor.name in held and not tensor.HasField("raw_data"):
            tensor.raw_data = held.pop(tensor.name)
    held.clear()  # tensors the pass dropped


def without_large_tensors(model: onnx.ModelProto, run: Callable[[onnx.ModelProto], onnx.ModelProto]) -> onnx.ModelProto:
    """``run(model)`` with big initializers' bytes set aside, and then back in its result (or in ``model`` if it fails)."""
    held = detach_large_tensors(model)
    try:
        result = run(model)
    except BaseException:
        attach_tensors(model, held)
        raise
    attach_tensors(result, held)
    return result
