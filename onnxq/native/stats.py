"""onnxq's numerics loops in C (libonnxq_stats.so, csrc/stats/), called through ctypes.

- The counting loops of calibration's histograms: numpy spends five or six passes and a 64-bit index array on every
  histogram update; these loops do one pass with the same float32 arithmetic, so their counts equal the numpy code's
  bit for bit (tests/test_native_stats.py). They take float32 C-contiguous arrays only (what onnxruntime returns);
  histogram.py uses numpy for anything else, and everywhere when the library was not built.
- The column steps of the output-aware codes' coordinate descent (onnxq/numerics/output_error.py, _Descent), which in
  numpy cost about twenty calls per column: the same float64 operations, the same codes (tests/test_output_error.py).
- The diagonal range search's error (output_error.DiagonalError): one pass per row and candidate scale instead of
  numpy's five, the same float32 codes, the float64 sum in another order (equal to rounding).
- GPTQ's column loop within a block on uniform grids (output_error._gptq_in_order): the same codes and updates.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from onnxq.native.library import find_built

LIBRARY_NAME = "libonnxq_stats.so"

_F32 = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
_F64 = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")
_I64 = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
_I8 = np.ctypeslib.ndpointer(np.int8, flags="C_CONTIGUOUS")
_U8 = np.ctypeslib.ndpointer(np.uint8, flags="C_CONTIGUOUS")
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
    if hasattr(lib, "onnxq_descent_block"):  # (a library built before it had none: descent_available says so)
        lib.onnxq_descent_block.argtypes = [_N, _N, _N, _N, _N, _F64, _F64, _F64, _I8, _F64, _I64, _F64, _N, _F64, _F64, _F64,
                                            _N, _F64, _U8]
        lib.onnxq_descent_block.restype = ctypes.c_int
    if hasattr(lib, "onnxq_diagonal_error"):
        lib.onnxq_diagonal_error.argtypes = [_N, _N, _F32, _F64, _F64, _F32, _N, ctypes.c_float, ctypes.c_int, _F64]
        lib.onnxq_diagonal_error.restype = None
    if hasattr(lib, "onnxq_gptq_block"):
        lib.onnxq_gptq_block.argtypes = [_N, _N, _N, _N, _F64, _F64, _F32, _N, ctypes.c_float, ctypes.c_int, _I8, _F64]
        lib.onnxq_gptq_block.restype = None
    return lib


def available() -> bool:
    """Whether the library was built (``pip install .``); without it histogram.py counts with numpy."""
    return _library() is not None


def takes(values: np.ndarray) -> bool:
    """Whether the native loops can count ``values`` as they are: float32, C-contiguous, library built."""
    return values.dtype == np.float32 and values.flags.c_contiguous and available()


def _has(function: str) -> bool:
    """Whether the library was built and exports ``function`` (one built before it was written does not)."""
    lib = _library()
    return lib is not None and hasattr(lib, function)


def descent_available() -> bool:
    """Whether the library has the coordinate descent's column steps (else output_error.py steps in numpy)."""
    return _has("onnxq_descent_block")


def diagonal_error_available() -> bool:
    """Whether the library has the diagonal range search's error (else output_error.py computes it with numpy)."""
    return _has("onnxq_diagonal_error")


def gptq_available() -> bool:
    """Whether the library has GPTQ's column loop (else output_error.py runs it with numpy)."""
    return _has("onnxq_gptq_block")


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


def descent_block(start: int, stop: int, h: np.ndarray, gradient: np.ndarray, values: np.ndarray, codes: np.ndarray,
                  table: np.ndarray, offsets: np.ndarray, bounds: np.ndarray, unit: np.ndarray, diagonal: np.ndarray,
                  inverse: np.ndarray, half: int, moves: np.ndarray, moved: np.ndarray) -> bool:
    """Columns [start, stop) of a coordinate-descent sweep (csrc/stats/coordinate_descent.cc says what each array is).

    gradient, values, codes (G, K, P), moves (G, stop - start, P) and moved (G, P, uint8) are updated in place; all
    C-contiguous. Returns whether any row moved.
    """
    groups, k, rows = values.shape
    return bool(_lib().onnxq_descent_block(groups, k, rows, start, stop, h, gradient, values, codes, table, offsets, bounds,
                                           len(bounds), unit, diagonal, inverse, half, moves, moved))


def diagonal_error(domain: np.ndarray, rows: np.ndarray, diagonal: np.ndarray, scales: np.ndarray, q: int, sqrt: bool) -> np.ndarray:
    """(R, C) errors sum_k d_k (w_k - q_k)^2 of ``rows`` (R, K float64) rounded at each of ``scales`` (R, C float32, > 0).

    ``domain`` (R, K float32) is the rows in the grid's domain, ``q`` the largest code (csrc/stats/diagonal_error.cc).
    """
    out = np.empty(scales.shape, dtype=np.float64)
    _lib().onnxq_diagonal_error(rows.shape[0], rows.shape[1], domain, rows, diagonal, scales, scales.shape[1], float(q), int(sqrt), out)
    return out


def gptq_block(start: int, stop: int, w: np.ndarray, upper: np.ndarray, scale: np.ndarray, q: int, sqrt: bool, codes: np.ndarray,
               errors: np.ndarray) -> None:
    """Columns [start, stop) of GPTQ's loop on a uniform grid (csrc/stats/gptq_block.cc says what each array is).

    ``w`` (K, R float64) and ``codes`` (K, R int8) are updated in place, ``errors`` (stop - start, R float64) written.
    ``scale`` (float32, C order) is each row's, (R,), or each code's in the columns' order, (K, R).
    """
    k, rows = w.shape
    if scale.shape not in ((rows,), (k, rows)):
        raise ValueError(f"scales of shape {scale.shape} for {k} columns of {rows} rows")
    stride = rows if scale.ndim == 2 else 0
    _lib().onnxq_gptq_block(k, rows, start, stop, w, upper, scale, stride, float(q), int(sqrt), codes, errors)
