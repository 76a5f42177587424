"""Packing of 4-bit integers two to a byte: as ONNX stores INT4 tensors, and in halves into plain uint8 bytes.

ONNX (opset 21) puts element 2i in the low nibble and element 2i+1 in the high nibble of
byte i, in row-major order; an odd count leaves the last high nibble zero.

The halves form (:func:`pack_halves`) needs no int4 type, so no opset 21: onnxq's weight-only 4-bit weights are
decoded by ordinary ops that onnxruntime folds when it loads the model (onnxq/rewrite/qdq.py).
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


#: What the halves form adds to a code to store it unsigned (codes -8..7 as nibbles 0..15).
HALVES_OFFSET = 8


def pack_halves(codes: np.ndarray) -> np.ndarray:
    """Signed values in [-8, 7] (any shape, row-major, n of them) as ceil(n/2) uint8 bytes, two halves.

    Byte i holds value i in its low nibble and value i + ceil(n/2) in its high nibble, each plus HALVES_OFFSET (an
    odd count pads with 0). Unpacking is then a remainder, a shift and one concatenation of the two halves, all whole-tensor ops.
    """
    flat = np.asarray(codes).ravel()
    if not np.issubdtype(flat.dtype, np.integer):
        raise TypeError(f"4-bit packing takes integers, got {flat.dtype}")
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("4-bit values must lie in [-8, 7]")
    half = (flat.size + 1) // 2
    nibbles = np.full(2 * half, HALVES_OFFSET, dtype=np.uint8)
    nibbles[: flat.size] = (flat.astype(np.int16) + HALVES_OFFSET).astype(np.uint8)
    return (nibbles[:half] | (nibbles[half:] << 4)).astype(np.uint8)


def unpack_halves(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_halves`: ``count`` int8 values."""
    raw = np.asarray(packed, dtype=np.uint8).ravel()
    if raw.size * 2 < count:
        raise ValueError(f"{raw.size} bytes hold fewer than {count} 4-bit values")
    nibbles = np.concatenate([raw & 0x0F, raw >> 4])[:count]
    return (nibbles.astype(np.int16) - HALVES_OFFSET).astype(np.int8)
