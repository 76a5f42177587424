"""Packing of 4-bit integers two to a byte, as ONNX stores INT4 tensors.

ONNX (opset 21) puts element 2i in the low nibble and element 2i+1 in the high nibble of
byte i, in row-major order; an odd count leaves the last high nibble zero.
"""

from __future__ import annotations

import numpy as np


def pack_int4(codes: np.ndarray) -> bytes:
    """Pack signed values in [-8, 7] (any shape, row-major) into ONNX INT4 bytes."""
    flat = np.asarray(codes).ravel()
    if not np.issubdtype(flat.dtype, np.integer):
        raise TypeError(f"int4 packing takes integers, got {flat.dtype}")
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    nibbles = flat.astype(np.uint8) & 0x0F
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(data: bytes, count: int) -> np.ndarray:
    """Unpack ``count`` signed int4 values from ONNX INT4 bytes into int8."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size * 2 < count:
        raise ValueError(f"{raw.size} bytes hold fewer than {count} int4 values")
    nibbles = np.empty(raw.size * 2, dtype=np.uint8)
    nibbles[0::2] = raw & 0x0F
    nibbles[1::2] = raw >> 4
    values = nibbles[:count].astype(np.int8)
    return np.where(values > 7, values - 16, values).astype(np.int8)
