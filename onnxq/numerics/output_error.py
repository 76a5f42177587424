"""Weights rounded for the layer's output, not for themselves: error-compensating rounding and ranges by output error.

With H = E[x x^T] over the inputs a layer sees (onnxq/calibrate/moments.py), a weight row w (one output channel) that
becomes q changes the output by (w - q) x, whose mean square is (w - q) H (w - q)^T. Three things use it:

- The range factor alpha of each row (REQuant's search) minimises that H-weighted error of the row rounded to
  nearest, by the same scan and golden-section search as the weight-MSE search (onnxq/numerics/search.py).
- The rounding itself compensates (GPTQ, Frantar et al. 2023, after OBQ): the columns of W are rounded in order,
  and each column's rounding error is spread over the columns not yet rounded through the upper Cholesky factor
  U of H^-1 (U^T U = H^-1), so later columns absorb what earlier ones got wrong. Blocks of columns keep the
  updates to matrix products. The order is GPTQ's "act order": the inputs with the largest mean square (H's
  diagonal) first, while many columns are left to absorb their error (on MiniLM at 4 bits, a one-off run:
  embedding cosine 0.9881 against 0.9859 in the weights' own order).
- The codes GPTQ leaves are then refined by cyclic coordinate descent on the same error (QuantEase, Behdin et al.
  2023): GPTQ rounds each column once, seeing only the columns before it; a sweep gives every code in turn the grid
  value that minimises its row's error with the others fixed, which never raises it. Up to SWEEPS sweeps, rows that
  stop moving dropped. On the tensors of MiniLM's first layer this removed a further 3-16 % of GPTQ's error (most
  on sqrt codes, which GPTQ rounds to nearest in the sqrt domain, not by value), and in tools/eval_real_models.py
  the embedding cosine rose from 0.9895 to 0.9906. The H is the undamped one: the error itself (no inverse is
  needed; the damped one, GPTQ's, did no better).

Everything works on any grid a row maps to codes by rounding to nearest with a per-row scale: onnxq's uniform codes
(plain or in the sqrt domain) and POST codes. numpy, float64 (three inner loops in C where libonnxq_stats.so has them,
the same codes: onnxq/native/stats.py); H may be one matrix or one per group of rows
(grouped convolutions: each group's rows read their own inputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack

from onnxq.native import stats
from onnxq.numerics import post, uniform
from onnxq.numerics.search import minimise_on_grid, per_candidate, scan_points

#: Damping added to H's diagonal, as a fraction of its mean: keeps H^-1 well defined where inputs are (nearly) collinear.
DAMPING = 0.01
#: Columns rounded between two matrix-product updates of the rest.
BLOCK = 32
#: Columns a coordinate-descent sweep steps between two matrix-product updates of the rest's gradients: wider than
#: GPTQ's blocks, since every update reads and writes the whole (K, P) gradient (MiniLM's refinement 4.0 -> 3.4 s).
REFINE_BLOCK = 64
#: Lines of an array moved at a time within its own memory (small temporaries): H's rows permuted, refined rows dropped.
LINE_BLOCK = 64
#: Rows x K^2 above which the alpha search weighs each column by H's diagonal only (the full form costs R K^2 a try).
FULL_SEARCH_LIMIT = 1 << 24
#: Whether a sweep's column steps run in C where libonnxq_stats.so was built (the same codes; numpy's cost about twenty
#: calls a column: MiniLM's refinement 9 s in numpy).
NATIVE_DESCENT = True
#: Whether GPTQ's column loop runs in C on uniform grids where the library has it (the same codes; numpy's ten calls a
#: column were most of GPTQ's time on MiniLM).
NATIVE_GPTQ = True
#: Whether the diagonal range search's error runs in C where the library has it (the same codes, the float64 sum in
#: another order; numpy's five passes per candidate were a quarter of MiniLM's quantization time).
NATIVE_DIAGONAL = True
#: Coordinate-descent sweeps over the columns after GPTQ (QuantEase); 0 leaves GPTQ's codes as they are. 1, 2 and 8
#: sweeps did no better on the real models (docs/output-aware.md); each costs about two GPTQs.
SWEEPS = 4


@dataclass(frozen=True)
class Grid:
    """Codes a row rounds to: ``mode`` "plain", "sqrt" (uniform in sign(w) sqrt|w|) or "post" (powers of sqrt 2)."""

    mode: str
    bits: int

    def scales(self, rows: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """Per-row float32 scales for range factors ``alpha``, as the formats write them."""
        if self.mode == "post":
            peak = np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(len(rows))
            scale = (np.asarray(alpha, dtype=np.float64) * peak).astype(np.float32)
            return np.where(scale > 0, scale, np.float32(1.0))
        return uniform.scales_for(rows, alpha, self.bits, self.mode == "sqrt")

    def round(self, values: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes int8, the float32 values they stand for) of ``values`` (R, n) rounded to nearest with per-row ``scale``.

        ``scale`` may also be (R, n), a scale per value (blocks of inputs with scales of their own).
        """
        values = np.asarray(values, dtype=np.float32)
        columns = uniform.row_scales(scale)
        if self.mode == "post":
            index = np.searchsorted(post.codebook(self.bits).bounds.astype(np.float32), np.abs(values) / columns, side="right")
            codes = (np.sign(values) * index).astype(np.int8)
            return codes, post.dequantize(codes, scale, self.bits)
        sqrt = self.mode == "sqrt"
        codes = uniform.nearest_codes(uniform.to_domain(values, sqrt), columns, uniform.max_code(self.bits)).astype(np.int8)
        return codes, uniform.dequantize(codes, scale, sqrt)

    @property
    def codes(self) -> int:
        """How many codes the grid has (for the scan's resolution)."""
        return 2 ** self.bits - 1


def damped(h: np.ndarray, damping: float = DAMPING) -> np.ndarray:
    """H (or a stack of them, (..., K, K)) with ``damping`` times its mean live diagonal added, dead inputs given that mean.

    Dead inputs (zero diagonal) get the mean of the live ones as their diagonal, or 1 where none is live.
    """
    return damp_in_place(np.array(h, dtype=np.float64), damping)


def damp_in_place(h: np.ndarray, damping: float = DAMPING) -> np.ndarray:
    """:func:`damped` on ``h`` itself (float64, a copy the caller made anyway: H gathered in another order, say).

    Every H of a wide layer copied costs its size in memory and, first touched, seconds of page faults on large models.
    """
    diagonal = np.diagonal(h, axis1=-2, axis2=-1).copy()
    dead = diagonal <= 0
    flat_diagonal, flat_dead = diagonal.reshape(-1, diagonal.shape[-1]), dead.reshape(-1, diagonal.shape[-1])
    mean = np.array([float(d[~m].mean()) if (~m).any() else 1.0 for d, m in zip(flat_diagonal, flat_dead, strict=True)])
    mean = mean.reshape(diagonal.shape[:-1])[..., None]
    index = np.arange(h.shape[-1])
    h[..., index, index] += damping * mean
    h[..., index, index] = np.where(dead, np.where(mean <= 0, 1.0, mean), h[..., index, index])
    return h


def grouped_output_error(delta: np.ndarray, h: np.ndarray) -> float:
    """Sum of :func:`output_errors` over ``delta`` (R, K), its rows split evenly among the groups of ``h`` (G, K, K)."""
    per_group = len(delta) // h.shape[0]
    return sum(float(output_errors(delta[g * per_group : (g + 1) * per_group], h[g]).sum()) for g in range(h.shape[0]))


def output_errors(delta: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per row of ``delta`` (R, K), delta H delta^T: the mean square it adds to the row's output."""
    return np.einsum("rk,rk->r", delta @ h, delta)


def search_alpha(rows: np.ndarray, h: np.ndarray, grid: Grid) -> np.ndarray:
    """Per row, the range factor whose round-to-nearest codes give the least H-weighted output error."""
    rows = np.asarray(rows, dtype=np.float64)
    full = rows.shape[0] * rows.shape[1] ** 2 <= FULL_SEARCH_LIMIT
    if not full and grid.mode != "post":
        return minimise_on_grid(DiagonalError(rows, np.diagonal(h), grid), np.ones(len(rows)), scan_points(grid.codes), 14)[0]

    def error(alpha: np.ndarray) -> np.ndarray:
        _, values = grid.round(rows, grid.scales(rows, alpha))
        delta = rows - values
        return output_errors(delta, h) if full else np.einsum("rk,k,rk->r", delta, np.diagonal(h), delta)

    alpha, _ = minimise_on_grid(per_candidate(error), np.ones(len(rows)), scan_points(grid.codes), 14)
    return alpha


#: Elements of a block of rows the diagonal error rounds at a time: its float32 and float64 temporaries stay in cache.
DIAGONAL_BLOCK = 1 << 14


class DiagonalError:
    """sum_k d_k (w_k - q_k)^2 per row, q the row rounded to nearest on a uniform grid at range factor alpha.

    The same numbers as rounding with :meth:`Grid.round` and weighing the difference by H's diagonal ``d``, in the same
    float32 and float64 steps, but what does not depend on alpha (the float32 rows in the grid's domain, the peaks) is
    computed once, not for each of the search's ~50 candidates, and the rows are rounded a block at a time, every
    candidate of the scan on a block before the next block, so the temporaries stay in cache (MiniLM: every layer is
    past FULL_SEARCH_LIMIT, and this search took a third of its quantization time).
    """

    def __init__(self, rows: np.ndarray, diagonal: np.ndarray, grid: Grid) -> None:
        if grid.mode == "post":
            raise ValueError("the diagonal error is for uniform grids (plain, sqrt)")
        self.rows = np.ascontiguousarray(rows, dtype=np.float64)
        self.diagonal = np.ascontiguousarray(diagonal, dtype=np.float64)
        self.sqrt = grid.mode == "sqrt"
        self.bits = grid.bits
        rounding = uniform.Rounding(self.rows, grid.bits, self.sqrt)
        self.domain, self.top = rounding.domain, rounding.top  # what Grid.round divides, and uniform.scales_for's tops, once
        self.step = max(1, DIAGONAL_BLOCK // max(self.rows.shape[1], 1))

    def __call__(self, alpha: np.ndarray) -> np.ndarray:
        """Errors of shape ``alpha``'s: (R,), or (R, G) for G candidates per row."""
        alpha = np.asarray(alpha, dtype=np.float64)
        columns = alpha[:, None] if alpha.ndim == 1 else alpha
        q = uniform.max_code(self.bits)
        scales = uniform.steps_for(columns, self.top[:, None], self.bits)  # uniform.scales_for, element by element
        if NATIVE_DIAGONAL and stats.diagonal_error_available():
            out = stats.diagonal_error(self.domain, self.rows, self.diagonal, np.ascontiguousarray(scales), q, self.sqrt)
            return out[:, 0] if alpha.ndim == 1 else out
        out = np.empty(columns.shape)
        for start in range(0, len(self.rows), self.step):
            stop = min(start + self.step, len(self.rows))
            domain, rows = self.domain[start:stop], self.rows[start:stop]
            for i in range(columns.shape[1]):
                scale = scales[start:stop, i, None]
                codes = uniform.nearest_codes(domain, scale, q)
                delta = rows - uniform.decoded(codes, scale, self.sqrt, out=codes)  # as uniform.dequantize computes them
                out[start:stop, i] = np.einsum("rk,k,rk->r", delta, self.diagonal, delta)
        return out[:, 0] if alpha.ndim == 1 else out


@dataclass(frozen=True)
class Compensation:
    """What GPTQ's rounding needs of H alone (shared by every grid tried): the column order and U of the reordered H^-1."""

    order: np.ndarray
    upper: np.ndarray

    @classmethod
    def of(cls, h: np.ndarray) -> Compensation:
        """Largest diagonal first; the upper Cholesky factor of the damped H^-1 in that order."""
        order = np.argsort(-np.diagonal(h), kind="stable")
        backwards = order[::-1]  # P (H in that order) P, gathered at once: the factorisation works in this copy
        gathered = np.asarray(h, dtype=np.float64)[np.ix_(backwards, backwards)]  # the one copy: damped in it, then factorised in it
        return cls(order, _upper_from_reversed(damp_in_place(gathered)))

    @classmethod
    def in_place(cls, h: np.ndarray) -> Compensation:
        """:meth:`of` computed in ``h``'s own memory (float64, C order), which then holds the factor, not H.

        The same numbers as :meth:`of`, without its copy of H: on a wide layer H and that copy were the quantizer's
        peak (CREPE's K 2048: 32 MB each). The caller writes H back when it needs it again.
        """
        if h.dtype != np.float64 or not h.flags.c_contiguous:
            raise ValueError("the factor is made in place only in a float64 C-ordered H")
        order = np.argsort(-np.diagonal(h), kind="stable")
        _permute_symmetric(h, order[::-1])
        return cls(order, _upper_from_reversed(damp_in_place(h)))


def _permute_symmetric(h: np.ndarray, order: np.ndarray) -> None:
    """``h`` becomes ``h[np.ix_(order, order)]`` in its own memory: columns a block of rows at a time, rows by cycles."""
    for start in range(0, len(h), LINE_BLOCK):
        block = h[start : start + LINE_BLOCK]
        block[:] = np.take(block, order, axis=1)
    placed = np.zeros(len(h), dtype=bool)
    for first in range(len(h)):
        if placed[first] or order[first] == first:
            continue
        saved, row = h[first].copy(), first
        while order[row] != first:  # row takes the row it is given, and so on around the cycle
            h[row] = h[order[row]]
            placed[row], row = True, int(order[row])
        h[row], placed[row] = saved, True


def gptq(rows: np.ndarray, h: np.ndarray, grid: Grid, scale: np.ndarray, block: int = BLOCK, compensation: Compensation | None = None) -> np.ndarray:
    """Codes (R, K) for ``rows`` with per-row ``scale``, rounded column by column with error compensation through H.

    ``scale`` may also be (R, K), a scale per code (blocks of inputs with their own scales, fixed before the rounding:
    GPTQ's "static groups", which keep its act order). ``compensation``: :meth:`Compensation.of` ``h``, when already
    computed (it depends on H alone).
    """
    compensation = Compensation.of(h) if compensation is None else compensation
    columns = np.ascontiguousarray(np.asarray(rows, dtype=np.float64).T[compensation.order])  # (K, R), in GPTQ's order
    if np.ndim(scale) == 2:
        scale = np.ascontiguousarray(np.asarray(scale, dtype=np.float32).T[compensation.order])  # (K, R) as the columns
    codes = _gptq_in_order(columns, grid, scale, block, compensation.upper)
    out = np.empty(codes.shape[::-1], dtype=np.int8)
    out[:, compensation.order] = codes.T
    return out


def _gptq_in_order(columns: np.ndarray, grid: Grid, scale: np.ndarray, block: int, upper: np.ndarray) -> np.ndarray:
    """GPTQ's loop over ``columns`` (K, R: W transposed, rounded and updated in place) as given; codes (K, R).

    ``upper`` is the factor of H^-1 in that order; ``scale`` each row's (R,) or each code's in that order (K, R). W is
    held transposed so that each column GPTQ rounds, and each update of the columns after it, is contiguous memory: a
    column of a wide C-order W strides over whole rows (MiniLM's 1536-wide layers), and that loop was a fifth of its
    quantization time.
    """
    w = columns
    k = w.shape[0]
    codes = np.empty(w.shape, dtype=np.int8)
    native = NATIVE_GPTQ and grid.mode != "post" and stats.gptq_available()
    per_code = np.ndim(scale) == 2
    round_line = None if per_code else _line_rounder(grid, scale)
    scale32 = np.ascontiguousarray(scale, dtype=np.float32)
    for start in range(0, k, block):
        stop = min(start + block, k)
        errors = np.empty((stop - start, w.shape[1]))
        if native:
            stats.gptq_block(start, stop, w, upper, scale32, uniform.max_code(grid.bits), grid.mode == "sqrt", codes, errors)
        else:
            for j in range(start, stop):
                codes[j], value = (_line_rounder(grid, scale32[j]) if per_code else round_line)(w[j])
                err = np.subtract(w[j], value, out=errors[j - start])
                err /= upper[j, j]
                w[j + 1 : stop] -= upper[j, j + 1 : stop, None] * err
        w[stop:] -= upper[start:stop, stop:].T @ errors
    return codes


def _line_rounder(grid: Grid, scale: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """:meth:`Grid.round` of one value per row, (R,) to (codes, the float32 values they stand for), at per-row ``scale``.

    The same float32 steps as the grid's rounding of an (R, 1) column, in fewer numpy calls, with what depends on the
    grid and the scales alone done once: GPTQ rounds K columns, each a handful of microsecond-long calls.
    """
    if grid.mode == "post":
        def round_post(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            codes, decoded = grid.round(values[:, None], scale)
            return codes[:, 0], decoded[:, 0]
        return round_post
    sqrt = grid.mode == "sqrt"
    q = uniform.max_code(grid.bits)
    scale32 = np.asarray(scale, dtype=np.float32)  # the grid's scales are float32 (Grid.scales)

    def round_uniform(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes = uniform.nearest_codes(uniform.to_domain(values.astype(np.float32), sqrt), scale32, q)  # float32, as Grid.round's
        return codes, uniform.decoded(codes, scale32, sqrt)

    return round_uniform


def inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """The upper factor U of H^-1 = U^T U, from one Cholesky factorisation and one triangular inverse.

    With P the reversal of rows and columns, P H P = L L^T (L lower) gives H^-1 = (P L^-1 P)^T (P L^-1 P), and
    P L^-1 P is upper triangular. A stack of small matrices (..., K, K) goes through numpy's stacked routines at once.
    """
    if h.ndim > 2:
        return np.linalg.inv(np.linalg.cholesky(h[..., ::-1, ::-1]))[..., ::-1, ::-1].copy()
    return _upper_from_reversed(np.array(h[::-1, ::-1], dtype=np.float64))


#: Rows of a factor cleared above the diagonal at a time (small temporaries).
TRIANGLE_BLOCK = 256


def _upper_from_reversed(reversed_h: np.ndarray) -> np.ndarray:
    """:func:`inverse_cholesky` of H given P H P (float64, C order), which is factorised and inverted in its own memory.

    H of a wide layer is tens of MB, and every copy of it counted in the quantizer's peak memory: the factor is turned
    to C order and reversed in that memory too (a copy of it was a third of CREPE's peak, 32 of 96 MB at K 2048).
    """
    column_major = reversed_h.T  # symmetric: the same matrix in LAPACK's order, so nothing is copied
    lower, info = lapack.dpotrf(column_major, lower=1, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"H is not positive definite (LAPACK dpotrf info {info})")
    inverse, info = lapack.dtrtri(lower, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"singular Cholesky factor (LAPACK dtrtri info {info})")
    for start in range(0, len(inverse), TRIANGLE_BLOCK):  # LAPACK left the upper triangle as it found it: clear it
        stop = min(start + TRIANGLE_BLOCK, len(inverse))
        block = inverse[start:stop, start:stop]
        block[np.triu_indices(stop - start, 1)] = 0.0
        inverse[start:stop, stop:] = 0.0
    if not inverse.flags.f_contiguous:  # (LAPACK worked in a copy after all: reverse it into another)
        return inverse[::-1, ::-1].copy()
    matrix = inverse.T  # the same memory as a C-ordered matrix: the factor transposed
    _transpose_in_place(matrix)  # now the factor itself, C order
    _reverse_in_place(matrix.reshape(-1))  # both axes reversed: P U P
    return matrix


def _transpose_in_place(matrix: np.ndarray) -> None:
    """Transpose a square C-ordered matrix in its own memory, a pair of blocks at a time (small temporaries)."""
    k = len(matrix)
    for start in range(0, k, TRIANGLE_BLOCK):
        stop = min(start + TRIANGLE_BLOCK, k)
        matrix[start:stop, start:stop] = matrix[start:stop, start:stop].T.copy()
        for other in range(stop, k, TRIANGLE_BLOCK):
            end = min(other + TRIANGLE_BLOCK, k)
            block = matrix[start:stop, other:end].copy()
            matrix[start:stop, other:end] = matrix[other:end, start:stop].T
            matrix[other:end, start:stop] = block.T


def _reverse_in_place(flat: np.ndarray) -> None:
    """Reverse a 1-D array in its own memory, a chunk from each end at a time (small temporaries)."""
    n = len(flat)
    chunk = TRIANGLE_BLOCK * TRIANGLE_BLOCK
    for start in range(0, n // 2, chunk):
        stop = min(start + chunk, n // 2)
        head = flat[start:stop].copy()
        flat[start:stop] = flat[n - stop : n - start][::-1]
        flat[n - stop : n - start] = head[::-1]


@dataclass(frozen=True)
class RowCodes:
    """Codes of a block of rows on one grid, their per-row scales and range factors, and the H-weighted error they leave."""

    codes: np.ndarray
    scale: np.ndarray
    alpha: np.ndarray
    error: float


def quantize_rows(rows: np.ndarray, h: np.ndarray, grid: Grid, compensate: bool = True, compensation: Compensation | None = None) -> RowCodes:
    """Rows (R, K) quantized for the output on ``grid``: alpha by output error, then (``compensate``) GPTQ's refined rounding.

    GPTQ's codes (:func:`compensated_rows`), then SWEEPS sweeps of coordinate descent (:func:`refined_rows`).
    """
    nearest = nearest_rows(rows, h, grid)
    return refined_rows(rows, h, grid, compensated_rows(rows, h, grid, nearest, compensation)) if compensate else nearest


@dataclass(frozen=True)
class ScoredRows(RowCodes):
    """:class:`RowCodes` with each row's own output error (the floor that a later rounding or refinement must beat, row by row)."""

    row_errors: np.ndarray


def nearest_rows(rows: np.ndarray, h: np.ndarray, grid: Grid) -> ScoredRows:
    """Rows (R, K) rounded to nearest on ``grid`` at the range factor that minimises each row's output error."""
    rows = np.asarray(rows, dtype=np.float64)
    alpha = search_alpha(rows, h, grid)
    scale = grid.scales(rows, alpha)
    codes = grid.round(rows, scale)[0]
    errors = output_errors(rows - decode(codes, scale, grid), h)
    return ScoredRows(codes, scale, alpha, float(errors.sum()), errors)


def nearest_blocks(rows: np.ndarray, h: np.ndarray, grid: Grid, block_size: int) -> ScoredRows:
    """Rows (R, K) rounded to nearest with a scale per row and block of ``block_size`` consecutive inputs.

    The last block is shorter where K is not a multiple. Each block's range factor is the one whose codes leave the
    least output error of that block alone (its part of H; what the blocks do to each other is GPTQ's to compensate),
    and its scale the nearest float16 value where float16 holds it (uniform.half_scales: half the bytes). Blocks give
    the inputs of a row with small weights a fine step of their own, where one scale per row follows its largest
    weights. The scales come back per code, (R, K), as GPTQ and the decoding take them; the range factors per block,
    (R, B).
    """
    rows = np.asarray(rows, dtype=np.float64)
    count, k = rows.shape
    blocks = -(-k // block_size)
    # Every block of every row searched at once, as rows (R B, block) of their own; the last blocks padded with zero
    # weights and zero H, which round to zero and add no error, so the padding changes nothing.
    padded = np.zeros((count, blocks * block_size))
    padded[:, :k] = rows
    diagonal_blocks = np.zeros((blocks, block_size, block_size))
    for b in range(blocks):
        part = h[b * block_size : (b + 1) * block_size, b * block_size : (b + 1) * block_size]
        diagonal_blocks[b, : len(part), : len(part)] = part
    alpha = np.empty((count, blocks))
    step = max(1, BLOCK_SEARCH_VALUES // (blocks * block_size))
    for start in range(0, count, step):  # rows a chunk at a time: the search's temporaries stay small
        chunk = padded[start : start + step].reshape(-1, block_size)
        alpha[start : start + step] = minimise_on_grid(per_candidate(_block_errors(chunk, diagonal_blocks, grid)),
                                                       np.ones(len(chunk)), scan_points(grid.codes), 14)[0].reshape(-1, blocks)
    scale = grid.scales(padded.reshape(-1, block_size), alpha.reshape(-1)).reshape(count, blocks)
    scale = uniform.expand_blocks(uniform.half_scales(scale), block_size, k)  # float16 where it holds them: half the bytes
    codes = grid.round(rows, scale)[0]
    errors = output_errors(rows - decode(codes, scale, grid), h)
    return ScoredRows(codes, scale, alpha, float(errors.sum()), errors)


#: Weights of a chunk of rows :func:`nearest_blocks` searches at once.
BLOCK_SEARCH_VALUES = 1 << 18


def _block_errors(chunk: np.ndarray, diagonal_blocks: np.ndarray, grid: Grid) -> Callable[[np.ndarray], np.ndarray]:
    """The output error of each block of ``chunk`` (rows (R B, block), row-major in R) rounded at range factor alpha.

    Each block is weighed by its own part of H, ``diagonal_blocks`` (B, block, block). On uniform grids the rounding
    is :meth:`Grid.round`'s in the same float32 steps, with what does not depend on alpha computed once
    (uniform.Rounding).
    """
    blocks, size = diagonal_blocks.shape[:2]
    if grid.mode == "post":
        def rounded(alpha: np.ndarray) -> np.ndarray:
            return grid.round(chunk, grid.scales(chunk, alpha))[1]
    else:
        rounded = uniform.Rounding(chunk, grid.bits, grid.mode == "sqrt").values

    def error(alpha: np.ndarray) -> np.ndarray:
        delta = (chunk - rounded(alpha)).reshape(-1, blocks, size).transpose(1, 0, 2)  # (B, R, block)
        return np.einsum("brk,brk->rb", np.matmul(delta, diagonal_blocks), delta).reshape(-1)

    return error


def compensated_rows(rows: np.ndarray, h: np.ndarray, grid: Grid, nearest: ScoredRows, compensation: Compensation | None = None) -> ScoredRows:
    """GPTQ's rounding of ``rows`` at the scales of ``nearest``, each row keeping the codes with the smaller output error.

    GPTQ's greedy order can lose on a row whose H is nearly singular; the nearest codes are the floor.
    """
    return kept_better(rows, h, grid, nearest, gptq(rows, h, grid, nearest.scale, compensation=compensation))


def refined_rows(rows: np.ndarray, h: np.ndarray, grid: Grid, start: ScoredRows, sweeps: int | None = None,
                 block_size: int | None = None) -> ScoredRows:
    """``start``'s codes (:func:`compensated_rows`') refined by :func:`refine` (``sweeps``: None SWEEPS), per row the lesser error kept.

    ``block_size``: ``start``'s scales are per code, the same over each block of that many inputs (:func:`nearest_blocks`).
    """
    scale = start.scale if block_size is None else np.ascontiguousarray(start.scale[:, ::block_size])
    return kept_better(rows, h, grid, start, refine(rows, h, grid, scale, start.codes, sweeps, block_size))


def kept_better(rows: np.ndarray, h: np.ndarray, grid: Grid, start: ScoredRows, codes: np.ndarray) -> ScoredRows:
    """``start`` with each row's codes replaced by ``codes``' (at the same scales) where they leave less output error."""
    rows = np.asarray(rows, dtype=np.float64)
    kept = _better_rows(_code_errors(rows, h, grid, start.scale), (start.codes, start.row_errors), codes)
    return ScoredRows(kept[0], start.scale, start.alpha, float(kept[1].sum()), kept[1])


def _code_errors(rows: np.ndarray, h: np.ndarray, grid: Grid, scale: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The row errors (:func:`output_errors`) that any codes of ``rows`` at per-row ``scale`` leave."""
    return lambda codes: output_errors(rows - decode(codes, scale, grid), h)


def _better_rows(errors: Callable[[np.ndarray], np.ndarray], kept: tuple[np.ndarray, np.ndarray],
                 codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, ``codes`` where they leave less output error than ``kept`` (codes, row errors), else the kept ones.

    ``errors`` gives the row errors of any codes; returns the codes and row errors kept.
    """
    candidate = errors(codes)
    better = candidate < kept[1]
    return np.where(better[:, None], codes, kept[0]), np.where(better, candidate, kept[1])


def refine(rows: np.ndarray, h: np.ndarray, grid: Grid, scale: np.ndarray, codes: np.ndarray, sweeps: int | None = None,
           block_size: int | None = None) -> np.ndarray:
    """``codes`` (R, K) of ``rows`` at per-row ``scale`` moved by cyclic coordinate descent on e H e^T, e = w - q.

    QuantEase's idea (Behdin et al. 2023): GPTQ rounds each column once, knowing only the columns before it; a sweep
    over the columns afterwards gives every code the value on the grid that minimises the row's error with all the
    other codes fixed, and no code moves unless that lowers it (a row's error never rises). See :func:`refine_groups`.
    ``block_size``: ``scale`` is per row and block of that many inputs, (R, B).
    """
    return refine_groups(rows[None], h[None], grid, scale[None], codes[None], sweeps, block_size=block_size)[0]


def refine_groups(rows: np.ndarray, h: np.ndarray, grid: Grid, scale: np.ndarray, codes: np.ndarray, sweeps: int | None = None,
                  block: int = REFINE_BLOCK, block_size: int | None = None) -> np.ndarray:
    """:func:`refine` of every group at once: rows and codes (G, P, K), each group with its own H (G, K, K), scale (G, P).

    Each sweep (:meth:`_Descent.sweep`) costs about R K^2 multiply-adds for the R rows still moving (GPTQ's updates
    are half that: only the columns after each); a row is done after ``sweeps`` (None: SWEEPS) or once a sweep leaves
    it as it was. The rule is per row, not a tolerance on the summed error, so that a row's codes do not depend on
    the rows refined with it (all groups of a depthwise layer at once or one by one give the same codes).
    ``block_size``: ``scale`` is per row and block of that many inputs, (G, P, B); the sweep's steps then stay within one.
    """
    descent = _Descent(rows, h, grid, scale, codes, block_size)
    step = block if block_size is None else min(block, block_size)  # (powers of two: a step never straddles two blocks)
    for _ in range(SWEEPS if sweeps is None else sweeps):
        descent.sweep(step)
        if not descent.settle():
            break
    return descent.result()


class _Descent:
    """Cyclic coordinate descent on e H e^T for rows (G, P, K) on a grid, every row of a column moved at once.

    With g = (e H)_j, moving q_j by delta changes a row's error by delta (delta H_jj - 2 g): the best value on the grid
    is the one nearest q_j + g / H_jj (the error is a parabola in q_j), taken where the change is negative, so no
    row's error rises. g is kept for every column as G = E H, held transposed (K, P) per group like GPTQ's W so that a
    column is contiguous: for the columns after a moved one in the current block by a rank-one update, for the others
    by matrix products once the block is done. Inputs that never fire (H_jj = 0) leave their codes alone.

    Each row is a problem of its own: a row none of whose codes moved in a whole sweep is at a minimum along every
    code and would never move again, so :meth:`settle` drops it (on MiniLM's plain codes a fifth to a third of the
    rows by the fourth sweep; most of them on random data).
    """

    def __init__(self, rows: np.ndarray, h: np.ndarray, grid: Grid, scale: np.ndarray, codes: np.ndarray, block_size: int | None = None) -> None:
        groups, per_group, k = codes.shape
        self.h, self.half = np.ascontiguousarray(h, dtype=np.float64), grid.codes // 2  # (no copy where it is so already)
        scale = np.ascontiguousarray(scale)
        self.block_size = block_size  # with it, scale is (G, P, B): per row and block of inputs
        table = _value_table(grid, scale)  # (G, P[, B], 2Q+1): the value of every code of every row [and block]
        self.table = table.reshape(-1)
        self.offsets = np.arange(scale.size).reshape(scale.shape) * table.shape[-1]  # (G, P[, B]): each row's start in it
        self.bounds, self.unit = _level_bounds(grid), _level_units(grid, scale)
        self.final = np.ascontiguousarray(codes.transpose(0, 2, 1))  # (G, K, P), as W^T in GPTQ
        self.live = np.arange(per_group)  # the rows (P's positions) still moving, and their codes
        self.codes = self.final.copy()
        row_scale = np.asarray(scale).reshape(groups * per_group, -1)  # a column per row, or its blocks
        if block_size is not None:
            row_scale = uniform.expand_blocks(row_scale, block_size, k)
        decoded = decode(codes.reshape(-1, k), row_scale, grid).reshape(groups, per_group, k)
        transposed = decoded.transpose(0, 2, 1)  # the float32 values first: one (K, P) float64 array fewer at a time
        error = np.subtract(np.asarray(rows, dtype=np.float64).transpose(0, 2, 1), transposed, out=np.empty((groups, k, per_group)))  # E^T
        self.gradient = np.matmul(self.h, error)  # (E H)^T, H symmetric
        del error
        self.values = np.ascontiguousarray(transposed, dtype=np.float64)  # the table's values, as Grid.round's
        del decoded, transposed
        self.diagonal = np.ascontiguousarray(np.diagonal(self.h, axis1=1, axis2=2))[:, :, None]
        self.inverse = np.divide(1.0, self.diagonal, out=np.zeros_like(self.diagonal), where=self.diagonal > 0)
        self.moved = np.zeros((groups, per_group), dtype=bool)

    def result(self) -> np.ndarray:
        """The codes (G, P, K) as they stand."""
        self.final[:, :, self.live] = self.codes
        return self.final.transpose(0, 2, 1).copy()

    def sweep(self, block: int) -> None:
        """One pass over the columns in order, ``block`` at a time."""
        groups, k, per_group = self.values.shape
        self.moved[:] = False
        native = NATIVE_DESCENT and stats.descent_available()
        for start in range(0, k, block):
            stop = min(start + block, k)
            moves = np.zeros((groups, stop - start, per_group))
            offsets, unit = self._scales_at(start)
            if native:
                moved = stats.descent_block(start, stop, self.h, self.gradient, self.values, self.codes, self.table, offsets,
                                            self.bounds, unit, self.diagonal, self.inverse, self.half, moves,
                                            self.moved.view(np.uint8))
            else:  # a list: every column steps
                moved = any([self._column(j, moves[:, j - start], start, stop, offsets, unit) for j in range(start, stop)])
            if moved:
                self._follow(moves, start, stop)

    def _scales_at(self, column: int) -> tuple[np.ndarray, np.ndarray]:
        """(offsets into the value table, level units), (G, P) each, of the rows' scales at ``column`` (its block's, with blocks)."""
        if self.block_size is None:
            return self.offsets, self.unit
        b = column // self.block_size
        return np.ascontiguousarray(self.offsets[..., b]), np.ascontiguousarray(self.unit[..., b])

    def _follow(self, moves: np.ndarray, start: int, stop: int) -> None:
        """Bring every column's gradient up to date with the block's ``moves`` (G, B, P).

        The block's own columns have had the moves of the columns before them (:meth:`_column`); they take those of
        their own and later ones. (Taking the products over the rows that moved alone was slower: a third to three
        quarters of MiniLM's rows move in a block.) The columns before and after the block are updated FOLLOW_COLUMNS at
        a time: one product for all of them was a (K, P) temporary, the refinement's peak on the orientation classifier.
        """
        for first in range(0, self.gradient.shape[1], FOLLOW_COLUMNS):
            last = min(first + FOLLOW_COLUMNS, self.gradient.shape[1])
            for low, high in ((first, min(last, start)), (max(first, stop), last)):  # the parts before and after the block
                if low < high:
                    self.gradient[:, low:high] -= np.matmul(self.h[:, low:high, start:stop], moves)
        self.gradient[:, start:stop] -= np.matmul(np.triu(self.h[:, start:stop, start:stop]), moves)

    def settle(self) -> bool:
        """Drop the rows no code of which moved in the last sweep (in every group); whether any row is left."""
        keep = self.moved.any(axis=0)
        if not keep.all():  # in their own memory: new (K, P) arrays beside the old ones were the refinement's peak
            self.final[:, :, self.live] = self.codes
            self.live = self.live[keep]
            self.codes, self.values, self.gradient = (_keep_last(a, keep) for a in (self.codes, self.values, self.gradient))
            self.offsets, self.unit, self.moved = (np.compress(keep, a, axis=1) for a in (self.offsets, self.unit, self.moved))
        return bool(keep.any())

    def _column(self, j: int, move: np.ndarray, start: int, stop: int, offsets: np.ndarray, unit: np.ndarray) -> bool:
        """Column ``j``'s step, all rows at once; whether any row moved (csrc/stats/coordinate_descent.cc does the same).

        ``move`` (G, P) receives each row's change of value; the gradient of the block's later columns follows it.
        ``offsets`` and ``unit``: :meth:`_scales_at` the column.
        """
        gradient, values = self.gradient[:, j], self.values[:, j]
        target = values + gradient * self.inverse[:, j]
        index = np.searchsorted(self.bounds, target / unit)  # the nearest level (the value table's order)
        delta = np.take(self.table, index + offsets) - values
        change = delta * (delta * self.diagonal[:, j] - 2.0 * gradient)
        better = change < 0
        if not better.any():
            return False
        np.multiply(delta, better, out=move)
        np.copyto(self.codes[:, j], index - self.half, where=better, casting="unsafe")
        self.moved |= better
        values += move
        self.gradient[:, j + 1 : stop] -= self.h[:, j + 1 : stop, j, None] * move[:, None, :]
        return True


#: Columns whose gradients :meth:`_Descent._follow` updates with one product (small temporaries).
FOLLOW_COLUMNS = 128


def _keep_last(a: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``np.compress(keep, a, axis=-1)`` of a C-ordered ``a``, written over the start of ``a``'s own memory (a view of it).

    The lines are moved forward in order, a block at a time: a line's new place ends before the next line's old one.
    """
    if not a.flags.c_contiguous:
        return np.compress(keep, a, axis=-1)
    index = np.flatnonzero(keep)
    lines = a.reshape(-1, a.shape[-1])  # (a view)
    out = lines.reshape(-1)[: len(lines) * len(index)].reshape(len(lines), len(index))
    for start in range(0, len(lines), LINE_BLOCK):
        out[start : start + LINE_BLOCK] = lines[start : start + LINE_BLOCK, index]  # (the gather copies before the write)
    return out.reshape(*a.shape[:-1], len(index))


def _level_bounds(grid: Grid) -> np.ndarray:
    """Midpoints between the values of consecutive codes -Q..Q at unit scale (:func:`_level_units`): c, c|c| or POST's."""
    levels = np.arange(-(grid.codes // 2), grid.codes // 2 + 1, dtype=np.float64)
    if grid.mode == "sqrt":
        levels = levels * np.abs(levels)
    elif grid.mode == "post":
        levels = np.sign(levels) * post.magnitudes(grid.bits)[np.abs(levels).astype(np.intp)]
    return (levels[1:] + levels[:-1]) / 2


def _level_units(grid: Grid, scale: np.ndarray) -> np.ndarray:
    """What a code's unit-scale level is multiplied by on each row: the scale, its square in the sqrt domain."""
    scale = np.asarray(scale, dtype=np.float64)
    return scale * scale if grid.mode == "sqrt" else scale


def _value_table(grid: Grid, scale: np.ndarray) -> np.ndarray:
    """(..., 2Q+1) float64: the float32 value every code -Q..Q stands for on each row of per-row ``scale`` (...)."""
    half = grid.codes // 2
    codes = np.broadcast_to(np.arange(-half, half + 1, dtype=np.int8), (scale.size, 2 * half + 1))
    return decode(codes, np.asarray(scale).reshape(-1), grid).astype(np.float64).reshape(*np.shape(scale), 2 * half + 1)


def decode(codes: np.ndarray, scale: np.ndarray, grid: Grid) -> np.ndarray:
    """The float32 values codes stand for on ``grid``."""
    if grid.mode == "post":
        return post.dequantize(codes, scale, grid.bits)
    return uniform.dequantize(codes, scale, grid.mode == "sqrt")


#: Input length up to which grouped layers (depthwise ones: 9 or 25) are quantized for all groups at once.
SMALL_GROUP_FEATURES = 64


def quantize_small_groups(rows: np.ndarray, h: np.ndarray, grid: Grid, sweeps: int | None = None) -> RowCodes:
    """:func:`quantize_rows` for every group at once: rows (G, P, K), each group with its own H (G, K, K), K small.

    A depthwise layer has one tiny problem per channel; solved one by one, Python's overhead was most of the cost of
    quantizing MobileNet-like models (5000 calls on a document classifier). The steps are those of :func:`quantize_rows`
    (alpha by output error, GPTQ in act order over the damped H, the per-row floor of rounding to nearest, ``sweeps``
    of the coordinate-descent refinement: None SWEEPS, 0 none), batched.
    """
    groups, per_group, k = rows.shape
    rows = np.asarray(rows, dtype=np.float64)
    flat = rows.reshape(groups * per_group, k)

    def errors(values: np.ndarray) -> np.ndarray:
        delta = (flat - values).reshape(groups, per_group, k)
        return np.einsum("gpk,gkl,gpl->gp", delta, h, delta).reshape(-1)

    def error(alpha: np.ndarray) -> np.ndarray:
        return errors(grid.round(flat, grid.scales(flat, alpha))[1])

    alpha, _ = minimise_on_grid(per_candidate(error), np.ones(len(flat)), scan_points(grid.codes), 14)
    scale = grid.scales(flat, alpha)
    nearest = grid.round(flat, scale)[0]

    def code_errors(codes: np.ndarray) -> np.ndarray:
        return errors(decode(codes, scale, grid))

    order = np.argsort(-np.diagonal(h, axis1=1, axis2=2), axis=1, kind="stable")  # (G, K)
    permuted = damp_in_place(np.asarray(h, dtype=np.float64)[np.arange(groups)[:, None, None], order[:, :, None], order[:, None, :]])
    upper = inverse_cholesky(permuted)
    w = np.take_along_axis(rows, order[:, None, :], 2).copy()
    codes = np.zeros(w.shape, dtype=np.int8)
    for j in range(k):
        column, value = grid.round(w[:, :, j].reshape(-1, 1), scale)
        codes[:, :, j] = column[:, 0].reshape(groups, per_group)
        err = (w[:, :, j] - value[:, 0].reshape(groups, per_group)) / upper[:, j, j][:, None]
        w[:, :, j:] -= err[:, :, None] * upper[:, None, j, j:]
    compensated = np.empty_like(codes)
    np.put_along_axis(compensated, np.broadcast_to(order[:, None, :], codes.shape), codes, 2)
    kept = _better_rows(code_errors, (nearest, code_errors(nearest)), compensated.reshape(-1, k))
    sweeps = SWEEPS if sweeps is None else sweeps
    if sweeps:
        refined = refine_groups(rows, h, grid, scale.reshape(groups, per_group), kept[0].reshape(groups, per_group, k), sweeps)
        kept = _better_rows(code_errors, kept, refined.reshape(-1, k))
    return RowCodes(kept[0], scale, alpha, float(kept[1].sum()))

