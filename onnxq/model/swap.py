"""A model serialized with some of its initializers replaced by other values, without a copy of the model or its weights.

Protobuf merges a message field that occurs more than once, and appends to the repeated fields inside it: the bytes of
a ModelProto followed by more ``graph`` fields, each holding one initializer, parse as that model with those
initializers added. So the model is serialized once without the swappable initializers, and each serialization with
new values appends them. Swapping the values into the model itself and serializing it held about four times the
weights at once (MiniLM: 357 MB for its 86 MB of weights, one-off, 2026-12-06); this holds them about twice (the pieces,
then the bytes they are joined into).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

#: Field numbers: ModelProto.graph and GraphProto.initializer (onnx.proto).
GRAPH_FIELD = 7
INITIALIZER_FIELD = 5


class SwappableWeights:
    """``model`` (its initializers held in it, not in external files) serializable with other values for ``names``."""

    def __init__(self, model: onnx.ModelProto, names: Iterable[str]) -> None:
        self.model = model
        self.names = frozenset(names)
        shell = onnx.ModelProto()
        shell.CopyFrom(model)
        kept = [t for t in shell.graph.initializer if t.name not in self.names]
        del shell.graph.initializer[:]
        shell.graph.initializer.extend(kept)
        self.base = shell.SerializeToString()  # the model without them, serialized once

    def serialized(self, weights: Mapping[str, np.ndarray]) -> bytes:
        """The model's bytes with ``weights`` ({initializer: values}, among ``names``) in place of its own values."""
        unknown = set(weights) - self.names
        if unknown:
            raise ValueError(f"not swappable initializers: {sorted(unknown)}")
        pieces = [self.base]
        for tensor in self.model.graph.initializer:
            if tensor.name in self.names:
                value = numpy_helper.from_array(np.asarray(weights[tensor.name]), tensor.name) if tensor.name in weights else tensor
                pieces.append(_field(GRAPH_FIELD, _field(INITIALIZER_FIELD, value.SerializeToString())))
        return b"".join(pieces)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field: its key, the payload's length, the payload."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    """``value`` (non-negative) as a protobuf varint: seven bits a byte, low first, the high bit set on all but the last."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)
