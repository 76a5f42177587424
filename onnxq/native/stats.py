"""The counting loops of calibration's histograms in C (libonnxq_stats.so, csrc/stats/), called through ctypes.

numpy spends five or six passes and a 64-bit index array on every histogram update; these loops do
one pass with the same float32 arithmetic, so their counts equal the numpy code's bit for bit
(tests/test_native_stats.py). They take float32 C-contiguous arrays only (what onnxruntime returns);
histogram.py uses numpy for anything else, and everywhere when the library was not built.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from onnxq.native.library import find_built

LIBRARY_NAME = "libonnxq_stats.so"

_F32 = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
_I64 = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
_N = ctypes.c_int64


@functools.cache
def _library() -> ctypes.CDLL | None:
    path = find_built(LIBRARY_NAME)
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    lib.onnxq_count_centred.argtypes = [_F32, _N, ctypes.c_float, _N, _I64]
    lib.onnxq_count_channels.argtypes = [_F32, _N, _N, _N, _F32, _N, _I64]
    lib.onnxq_count_spans.argtypes = [_F32, _N, _N, _F32, _F32, _N, _I64]
    for function in (lib.onnxq_count_centred, lib.onnxq_count_channels, lib.onnxq_count_spans):
        function.restype = None
    return lib


def available() -> bool:
    """Whether the library was built (``pip install .``); without it histogram.py counts with numpy."""
    return _library() is not None


def takes(values: np.ndarray) -> bool:
    """Whether the native loops can count ``values`` as they are: float32, C-contiguous, library built."""
    return values.dtype == np.float32 and values.flags.c_contiguous and available()


def _lib() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError(f"{LIBRARY_NAME} was not built (pip install .)")
    return lib


def count_centred(values: np.ndarray, inverse_width: float, counts: np.ndarray) -> None:
    """Add to ``counts`` the bins of ``values`` (any shape) in len(counts) bins of width 1/inverse_width centred on zero."""
    _lib().onnxq_count_centred(values, values.size, inverse_width, len(counts), counts)


def count_channels(blocks: np.ndarray, inverse_widths: np.ndarray, counts: np.ndarray) -> None:
    """Add to counts[c] the centred bins of blocks[:, c, :] ((outer, C, inner) float32); channel c's width is 1/inverse_widths[c]."""
    outer, channels, inner = blocks.shape
    widths = np.ascontiguousarray(inverse_widths, dtype=np.float32)
    _lib().onnxq_count_channels(blocks, outer, channels, inner, widths, counts.shape[1], counts)


def count_spans(rows: np.ndarray, lo: np.ndarray, span: np.ndarray, bins: int) -> np.ndarray:
    """(R, bins) counts: row r of ``rows`` ((R, n) float32) in ``bins`` equal bins over [lo[r], lo[r] + span[r]], clipped."""
    counts = np.zeros((rows.shape[0], bins), dtype=np.int64)
    lo, span = np.ascontiguousarray(lo, np.float32), np.ascontiguousarray(span, np.float32)
    _lib().onnxq_count_spans(rows, rows.shape[0], rows.shape[1], lo, span, bins, counts)
    return counts
