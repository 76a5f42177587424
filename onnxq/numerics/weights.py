"""Quantize one weight tensor: rows per channel or per tensor, range search, plain or sqrt mode.

Pure numpy; the ONNX side only hands in an array and an axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from onnxq.config import RangeMethod, SqrtMode, check_bits
from onnxq.numerics import output_error, post, uniform
from onnxq.numerics.balance import balance_codes


def to_rows(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """View a tensor as rows: one per index of ``axis``, or a single row when ``axis`` is None."""
    if axis is None:
        return weight.reshape(1, -1)
    return np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)


def from_rows(rows: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    """Inverse of :func:`to_rows`."""
    if axis is None:
        return rows.reshape(shape)
    axis %= len(shape)
    moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
    return np.moveaxis(rows.reshape(moved), 0, axis)


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight tensor as integer codes plus scales, ready to be written as DequantizeLinear inputs.

    ``codes`` has the original shape; ``scale`` has shape (C,) along ``axis``, or () when
    ``axis`` is None (per tensor), or (C, B) with ``block_size``: a scale per channel and block of ``block_size``
    consecutive inputs of the channel's row (:func:`to_rows`' order), the last block shorter where the row is.
    """

    codes: np.ndarray
    scale: np.ndarray
    axis: int | None
    bits: int
    sqrt: bool
    alpha: np.ndarray
    mse: float
    sqnr_db: float
    post: bool = False
    block_size: int | None = None

    def dequantize(self) -> np.ndarray:
        """The float32 weights the model will compute with."""
        rows, scale = to_rows(self.codes, self.axis), np.atleast_1d(self.scale)
        if self.block_size is not None:
            scale = uniform.expand_blocks(scale, self.block_size, rows.shape[1])
        approx = post.dequantize(rows, scale, self.bits) if self.post else uniform.dequantize(rows, scale, self.sqrt)
        return from_rows(approx, self.codes.shape, self.axis)

    @property
    def scale_bytes(self) -> int:
        """Bytes per stored scale: 2 for block scales that float16 holds (onnxq/rewrite/qdq.py writes them so), else 4."""
        return 2 if self.block_size is not None and uniform.fits_half(self.scale) else 4


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    noise = float(np.sum((reference.astype(np.float64) - approx) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return _sqnr_from_sums(noise, signal)


#: Per-channel rows are searched in blocks of about this many weights and at most BLOCK_ROWS
#: rows: the search's temporaries (many times the block's weights, and a grid of errors per
#: row and level) then stay small however big the tensor.
BLOCK_WEIGHTS = 1 << 20
BLOCK_ROWS = 256


#: Rows of one block of short rows (a weight's blocks of inputs as rows of their own) quantized at a time: the exact
#: search's temporaries are a few times the rows' values.
SHORT_ROWS_BLOCK = 8192


def row_blocks(weight: np.ndarray, axis: int | None, max_rows: int = BLOCK_ROWS) -> Iterator[np.ndarray]:
    """The rows of :func:`to_rows` in consecutive blocks of about BLOCK_WEIGHTS weights and at most ``max_rows`` rows.

    One block per tensor when it is small, or per tensor.
    """
    if axis is None or (weight.size <= BLOCK_WEIGHTS and weight.shape[axis] <= max_rows):
        yield to_rows(weight, axis)
        return
    moved = np.moveaxis(weight, axis, 0)
    count = moved.shape[0]
    per_block = min(max_rows, max(1, BLOCK_WEIGHTS // max(1, weight.size // count)))
    for start in range(0, count, per_block):
        block = moved[start : start + per_block]
        yield block.reshape(len(block), -1)


#: Widest codes SqrtMode.AUTO tries sqrt codes for without data. Above, a lower weight MSE with sqrt codes often came
#: with a worse output: they are coarse where weights are large, and at 6-8 bits their MSE gain is small. On the shipped
#: models plain codes win at 8 bits on two of three and at 6 bits on two of three (`tools/eval_output_aware.py
#: --compare-sqrt`, BENCHMARKS.md); an independent check saw a text recognizer's character errors triple at 8 bits with
#: sqrt codes. With data, the choice is by the layer's output error at any width (quantize_for_output).
SQRT_AUTO_MAX_BITS = 5
#: Widest codes the range search (REQuant's alpha by weight MSE) runs for without data; 8-bit codes take the full range.
#: At 8 bits rounding noise is small and the search's clipping of a few large weights is what the output feels: on a
#: real document classifier 8-bit weights gave 58.0 dB output SQNR searched against 61.5 dB with max|w|
#: (tools/eval_real_models.py before this rule); on MiniLM 24.4 against 24.0, with the same embedding cosine. The issue asks -b 8 never to
#: lose to per-channel absmax, and the full range guarantees it. With data, the range minimises the output error instead.
SEARCH_MAX_BITS = 7


def quantize_weight(
    weight: np.ndarray,
    bits: int,
    axis: int | None,
    sqrt: SqrtMode = SqrtMode.AUTO,
    method: RangeMethod = RangeMethod.SEARCH,
    balanced: bool = False,
    block_size: int | None = None,
) -> QuantizedTensor:
    """Quantize ``weight`` to ``bits`` per row along ``axis`` (None: per tensor), or per row and block of ``block_size`` inputs.

    With SqrtMode.AUTO both plain and sqrt codes are tried and the one with the lower
    weight MSE is kept, up to SQRT_AUTO_MAX_BITS; wider codes stay plain. The range search runs up to SEARCH_MAX_BITS;
    wider codes take the full range. ``balanced``: each row's rounding errors then sum to nearly zero
    (onnxq/numerics/balance.py); with blocks, each block's. Block scales are float16 values (uniform.half_scales) where
    float16 holds them, and each block's range is searched on its values themselves (uniform.quantize_exact: a
    histogram of 1024 bins for 32 values was most of the time and memory).
    """
    weight = np.asarray(weight, dtype=np.float32)
    bits = check_bits(bits)
    if bits > SEARCH_MAX_BITS:
        method = RangeMethod.ABSMAX
    modes = {SqrtMode.OFF: (False,), SqrtMode.ON: (True,), SqrtMode.AUTO: (False, True) if bits <= SQRT_AUTO_MAX_BITS else (False,)}[sqrt]
    best: QuantizedTensor | None = None
    for use_sqrt in modes:
        if uses_blocks(weight, axis, block_size):  # one grid for all the blocks, each block a short row of its own
            quantize_short = uniform.quantize_exact if method is RangeMethod.SEARCH else uniform.absmax_rows
            candidate = _in_blocks(weight, axis, block_size, lambda part, s=use_sqrt, f=quantize_short: _quantize_blocks(
                part, 0, lambda rows: f(rows, bits, s, True), s, False, balanced, SHORT_ROWS_BLOCK))
        elif method is RangeMethod.SEARCH:
            candidate = _quantize_blocks(weight, axis, lambda rows, s=use_sqrt: uniform.quantize_best(rows, bits, s), use_sqrt, False, balanced)
        else:
            candidate = _quantize_blocks(weight, axis, lambda rows, s=use_sqrt: uniform.absmax_rows(rows, bits, s), use_sqrt, False, balanced)
        if best is None or candidate.mse < best.mse:
            best = candidate
    assert best is not None
    return best


#: Widest codes that take a scale per block of inputs (--block-size): 8-bit codes keep one per channel (their rounding
#: error is small beside what a float16 scale per block would add to their size).
BLOCKS_MAX_BITS = 7


def blocked(bits: int, block_size: int | None) -> bool:
    """Whether codes of ``bits`` get the blocks ``block_size`` asks for (None: none)."""
    return block_size is not None and bits <= BLOCKS_MAX_BITS


def uses_blocks(weight: np.ndarray, axis: int | None, block_size: int | None) -> bool:
    """Whether ``weight`` gets a scale per block of ``block_size`` inputs: per channel, with rows longer than one block."""
    return block_size is not None and axis is not None and weight.size > block_size * weight.shape[axis]


def _in_blocks(weight: np.ndarray, axis: int, block_size: int, quantize: Callable[[np.ndarray], QuantizedTensor]) -> QuantizedTensor:
    """``weight`` quantized per row and block of ``block_size`` inputs: each block a row of its own for ``quantize``.

    The rows' full blocks go in one call, their shorter last blocks (where the row length is not a multiple) in another.
    """
    rows = to_rows(weight, axis)
    count, k = rows.shape
    full = k // block_size * block_size
    parts = [quantize(rows[:, :full].reshape(-1, block_size))] if full else []
    if full < k:
        parts.append(quantize(np.ascontiguousarray(rows[:, full:])))
    blocks = -(-k // block_size)
    codes = np.concatenate([p.codes.reshape(count, -1) for p in parts], axis=1)
    scale = np.concatenate([p.scale.reshape(count, -1) for p in parts], axis=1)
    alpha = np.concatenate([np.asarray(p.alpha).reshape(count, -1) for p in parts], axis=1)
    noise = sum(p.mse * p.codes.size for p in parts)
    signal = float(np.sum(rows.astype(np.float64) ** 2))
    assert scale.shape == (count, blocks)
    return dataclasses.replace(
        parts[0], codes=from_rows(codes, weight.shape, axis), scale=scale, axis=axis, alpha=alpha,
        mse=noise / weight.size if weight.size else 0.0, sqnr_db=_sqnr_from_sums(noise, signal), block_size=block_size,
    )


def quantize_post_weight(weight: np.ndarray, bits: int, axis: int | None, search: bool = True, balanced: bool = False) -> QuantizedTensor:
    """Quantize ``weight`` to b-bit POST codes (powers of sqrt 2) per row along ``axis``, alpha searched (else 1: max|w|).

    ``balanced``: as :func:`quantize_weight`'s.
    """
    weight = np.asarray(weight, dtype=np.float32)
    if not search:
        return _quantize_blocks(weight, axis, lambda rows: post.quantize_rows(rows, np.ones(len(rows)), bits), False, True, balanced)
    return _quantize_blocks(weight, axis, lambda rows: post.quantize_best(rows, bits), False, True, balanced)


def _quantize_blocks(
    weight: np.ndarray,
    axis: int | None,
    quantize_rows: Callable[[np.ndarray], uniform.UniformWeights | post.PostWeights],
    sqrt: bool,
    is_post: bool,
    balanced: bool = False,
    max_rows: int = BLOCK_ROWS,
) -> QuantizedTensor:
    """Quantize the rows block by block (at most ``max_rows`` at a time) and join the codes, measuring the error they leave.

    ``balanced``: the codes of each row are then moved so that its errors sum to nearly zero (onnxq/numerics/balance.py).
    """
    codes, scales, alphas = [], [], []
    noise = signal = 0.0
    bits = 0
    for rows in row_blocks(weight, axis, max_rows):
        q = quantize_rows(rows)
        if balanced and axis is not None:
            q = _balanced(rows, q)
        reference = rows.astype(np.float64)
        noise += float(np.sum((reference - q.dequantize()) ** 2))
        signal += float(np.sum(reference**2))
        del reference
        codes.append(q.codes)
        scales.append(q.scale)
        alphas.append(q.alpha)
        bits = q.bits
    scale = np.concatenate(scales)
    return QuantizedTensor(
        codes=from_rows(np.concatenate(codes) if len(codes) > 1 else codes[0], weight.shape, axis),
        scale=scale if axis is not None else scale.reshape(()),
        axis=axis,
        bits=bits,
        sqrt=sqrt,
        alpha=np.concatenate(alphas),
        mse=noise / weight.size if weight.size else 0.0,
        sqnr_db=_sqnr_from_sums(noise, signal),
        post=is_post,
    )


def _balanced(rows: np.ndarray, q: uniform.UniformWeights | post.PostWeights) -> uniform.UniformWeights | post.PostWeights:
    """``q`` with each row's codes balanced (:func:`onnxq.numerics.balance.balance_codes`) on its own grid."""
    if isinstance(q, post.PostWeights):
        codes = balance_codes(rows, q.codes, lambda c: post.dequantize(c, q.scale, q.bits), post.max_index(q.bits))
    else:
        codes = balance_codes(rows, q.codes, lambda c: uniform.dequantize(c, q.scale, q.sqrt), uniform.max_code(q.bits))
    return dataclasses.replace(q, codes=codes)


def _sqnr_from_sums(noise: float, signal: float) -> float:
    """:func:`sqnr_db` from the summed squared error and signal."""
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(signal / noise)) if signal > 0 else float("-inf")


def quantize_for_output(
    weight: np.ndarray, bits: int, axis: int, modes: tuple[str, ...], hessian: np.ndarray, baseline: QuantizedTensor | None = None,
    sweeps: int | None = None, refill: Callable[[np.ndarray], object] | None = None, block_size: int | None = None,
) -> QuantizedTensor:
    """Quantize ``weight`` per row along ``axis`` for its layer's output: ranges by output error, compensated rounding.

    ``hessian`` is E[x x^T] of the layer's input rows, (groups, K, K) with the rows split evenly among the groups
    (onnxq/calibrate/moments.py); ``modes`` are the grids to try ("plain", "sqrt", "post"), and the one leaving the
    least output error is kept. A ``baseline`` (the weight-error quantization) is kept instead where its output
    error is lower, so the output error is never worse than before. ``sweeps``: the coordinate-descent refinement's
    after GPTQ (None: output_error.SWEEPS, 0: none). ``refill``: writes the same ``hessian`` into the array it is given
    again; with it (and ``hessian`` float64 in C order) GPTQ's factors are made in ``hessian``'s own memory, which
    ``refill`` then restores: the same codes without a copy of H (:meth:`output_error.Compensation.in_place`).
    ``block_size``: a scale per row and block of that many inputs (:func:`output_error.nearest_blocks`) where the rows
    are longer than a block.
    """
    weight = np.asarray(weight, dtype=np.float32)
    rows = to_rows(weight, axis).astype(np.float64)
    groups = hessian.shape[0]
    small = groups > 1 and rows.shape[1] <= output_error.SMALL_GROUP_FEATURES  # depthwise: all groups at once
    blocks = block_size if uses_blocks(weight, axis, block_size) and not small else None
    if refill is not None and (hessian.dtype != np.float64 or not hessian.flags.c_contiguous):
        refill = None
    best = (_small_groups_for_output(rows, hessian, modes, bits, sweeps) if small
            else _groups_for_output(rows, hessian, modes, bits, sweeps, refill, blocks))
    if baseline is not None and baseline.axis == axis:
        delta = rows - to_rows(baseline.dequantize(), axis)
        if output_error.grouped_output_error(delta, hessian) <= best[0]:
            return baseline
    error, codes, scale, alpha, mode = best
    values = output_error.decode(codes, scale, output_error.Grid(mode, bits))
    noise, signal = float(np.sum((rows - values) ** 2)), float(np.sum(rows**2))
    if blocks is not None:
        scale = np.ascontiguousarray(scale[:, ::blocks])  # per code -> per block
    return QuantizedTensor(
        codes=from_rows(codes, weight.shape, axis), scale=scale, axis=axis, bits=bits, sqrt=mode == "sqrt", alpha=alpha,
        mse=noise / weight.size if weight.size else 0.0, sqnr_db=_sqnr_from_sums(noise, signal), post=mode == "post",
        block_size=blocks,
    )


#: A grid whose rounding to nearest leaves more than this times the best grid's output error is not compensated.
GRID_MARGIN = 1.5

#: What the grid searches hand back: (output error, codes, scales, range factors, grid mode).
_Best = tuple[float, np.ndarray, np.ndarray, np.ndarray, str]


def _groups_for_output(rows: np.ndarray, hessian: np.ndarray, modes: tuple[str, ...], bits: int, sweeps: int | None,
                       refill: Callable[[np.ndarray], object] | None = None, block_size: int | None = None) -> _Best:
    """Each group's rows rounded by GPTQ on the grids that round them nearly as well as the best to nearest; the best refined and kept.

    Compensating every grid doubled the time on MiniLM; compensating only the best nearest one lost 0.2 dB on the
    layout detector (tools/eval_real_models.py): grids within GRID_MARGIN of it are compensated too. The refinement
    (``sweeps``, coordinate descent) costs about two GPTQs per sweep, so only the grid GPTQ leaves best is refined.
    ``refill``: :func:`quantize_for_output`'s (GPTQ's factors made in ``hessian``, which it then restores). ``block_size``:
    a scale per row and block of inputs (then the scales come back per code).
    """
    groups = hessian.shape[0]
    per_group = len(rows) // groups
    slices = [rows[g * per_group : (g + 1) * per_group] for g in range(groups)]

    def nearest_of(part: np.ndarray, h: np.ndarray, grid: output_error.Grid) -> output_error.ScoredRows:
        return output_error.nearest_rows(part, h, grid) if block_size is None else output_error.nearest_blocks(part, h, grid, block_size)

    nearest = {mode: [nearest_of(part, hessian[g], output_error.Grid(mode, bits)) for g, part in enumerate(slices)] for mode in modes}
    floor = min(sum(p.error for p in nearest[m]) for m in modes)
    chosen = [mode for mode in modes if sum(p.error for p in nearest[mode]) <= GRID_MARGIN * floor]
    factor = output_error.Compensation.of if refill is None else output_error.Compensation.in_place
    compensations = [factor(hessian[g]) for g in range(groups)]  # shared by the grids
    codes = {mode: [output_error.gptq(part, hessian[g], output_error.Grid(mode, bits), nearest[mode][g].scale, compensation=compensations[g])
                    for g, part in enumerate(slices)] for mode in chosen}
    del compensations
    if refill is not None:
        refill(hessian)
    compensated = {mode: [output_error.kept_better(part, hessian[g], output_error.Grid(mode, bits), nearest[mode][g], codes[mode][g])
                          for g, part in enumerate(slices)] for mode in chosen}
    mode = min(compensated, key=lambda m: sum(p.error for p in compensated[m]))
    grid, parts = output_error.Grid(mode, bits), compensated[mode]
    if sweeps != 0:
        parts = [output_error.refined_rows(part, hessian[g], grid, parts[g], sweeps, block_size) for g, part in enumerate(slices)]
    return (sum(p.error for p in parts), np.concatenate([p.codes for p in parts]), np.concatenate([p.scale for p in parts]),
            np.concatenate([p.alpha for p in parts]), mode)


def _small_groups_for_output(rows: np.ndarray, hessian: np.ndarray, modes: tuple[str, ...], bits: int, sweeps: int | None) -> _Best:
    """Depthwise-like layers (many groups, short rows): every grid compensated for all groups at once, the best kept."""
    groups = hessian.shape[0]
    best: _Best | None = None
    for mode in modes:
        part = output_error.quantize_small_groups(rows.reshape(groups, len(rows) // groups, -1), hessian, output_error.Grid(mode, bits), sweeps)
        if best is None or part.error < best[0]:
            best = (part.error, part.codes, part.scale, part.alpha, mode)
    assert best is not None
    return best
