"""Big initializers' bytes set aside while onnx's C++ passes (version converter, shape inference) run.

Those passes serialise the whole model, parse it in C++ and hand back a new copy: several
times the model's size in memory, and impossible beyond protobuf's 2 GB. They need the
weights' types and shapes only, so they run on a skeleton of the model (big tensors
without their bytes) and what they changed is grafted back onto the model. (With upb
protobuf, clearing a field frees nothing until the whole message tree goes, so the bytes
cannot simply be moved out and back.)
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

#: Initializers holding more than this are set aside; small ones (shapes, axes) stay, as passes may read them.
DETACH_BYTES = 1 << 20


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose big initializers keep name, type and shape but no values.

    Built field by field: copying the whole model (CopyFrom) would copy every weight.
    """
    out = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _set_field(out, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _set_field(out.graph, field, value)
    for tensor in model.graph.initializer:
        if _is_large(tensor):
            out.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        else:
            out.graph.initializer.add().CopyFrom(tensor)
    return out


def graft(model: onnx.ModelProto, result: onnx.ModelProto) -> None:
    """Make ``model`` what a pass run on its :func:`skeleton` returned, keeping ``model``'s own big initializers.

    Initializers the pass added are added, those it dropped are dropped, small ones take
    the pass's values; the big ones are not touched, so their bytes are not copied.
    """
    for field in model.DESCRIPTOR.fields:
        if field.name != "graph":
            model.ClearField(field.name)
    for field, value in result.ListFields():
        if field.name != "graph":
            _set_field(model, field, value)
    for field in model.graph.DESCRIPTOR.fields:
        if field.name != "initializer":
            model.graph.ClearField(field.name)
    for field, value in result.graph.ListFields():
        if field.name != "initializer":
            _set_field(model.graph, field, value)
    wanted = {t.name: t for t in result.graph.initializer}
    for i in reversed(range(len(model.graph.initializer))):
        tensor = model.graph.initializer[i]
        if tensor.name not in wanted:
            del model.graph.initializer[i]
        elif not _is_large(tensor):
            tensor.CopyFrom(wanted[tensor.name])
    present = {t.name for t in model.graph.initializer}
    for name, tensor in wanted.items():
        if name not in present:
            model.graph.initializer.add().CopyFrom(tensor)


def _is_large(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.ByteSize() > DETACH_BYTES


def _set_field(message: object, field: object, value: object) -> None:
    """Copy one field's value (as ListFields gives it) into ``message``."""
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    if repeated:
        getattr(message, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def on_skeleton(model: onnx.ModelProto, run: Callable[[onnx.ModelProto], onnx.ModelProto]) -> None:
    """Apply ``run`` (a pass that returns a new model, such as onnx's converter) to ``model`` in place without copying its big weights."""
    graft(model, run(skeleton(model)))


def compact(model: onnx.ModelProto) -> onnx.ModelProto:
    """A fresh copy of ``model`` holding only what is still in it.

    With upb protobuf, tensors removed from a model (the float weights, once quantized)
    keep their memory until the whole message tree is gone; the copy lets it go.
    """
    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    return fresh
