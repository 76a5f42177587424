"""Error-compensating rounding and ranges by output error, against independent numpy references.

The reference rounding is OBQ's: round one column, push its error onto the others through H^-1, then remove that
column from H^-1 by the rank-one update; GPTQ's Cholesky form must give the same codes, in the same column order
(largest mean-square input first, GPTQ's act order).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import coordinate_descent_reference, grid_values, obq_reference

from onnxq.native import stats
from onnxq.numerics import output_error, uniform
from onnxq.numerics.output_error import Compensation, Grid, damped, decode, gptq, inverse_cholesky, output_errors, quantize_rows, search_alpha
from onnxq.numerics.search import best_alpha


def correlated_inputs(rng: np.random.Generator, samples: int, k: int) -> np.ndarray:
    """Inputs whose features are strongly correlated (a random mixing of a few sources plus noise)."""
    sources = rng.standard_normal((samples, 4))
    return sources @ rng.standard_normal((4, k)) + 0.1 * rng.standard_normal((samples, k))


@pytest.mark.parametrize("native", [False, True], ids=["numpy", "native"])
@pytest.mark.parametrize("block", [3, 128])
def test_gptq_equals_obq_column_by_column(block, native, monkeypatch):
    if native and not stats.gptq_available():
        pytest.skip("libonnxq_stats.so was not built with onnxq_gptq_block (pip install .)")
    monkeypatch.setattr(output_error, "NATIVE_GPTQ", native)
    rng = np.random.default_rng(0)
    x = correlated_inputs(rng, 400, 12)
    h = damped(x.T @ x / len(x))
    rows = rng.standard_normal((5, 12))
    scale = (np.abs(rows).max(axis=1) / 7).astype(np.float32)
    codes = gptq(rows, x.T @ x / len(x), Grid("plain", 4), scale, block=block)
    by_mean_square = sorted(range(12), key=lambda j: -h[j, j])
    assert by_mean_square != list(range(12))  # the order matters in this case
    np.testing.assert_array_equal(codes, obq_reference(rows, h, scale.astype(np.float64), 4, by_mean_square))
    assert not np.array_equal(codes, obq_reference(rows, h, scale.astype(np.float64), 4, list(range(12))))


@pytest.mark.parametrize("k", [7, 300])  # 300: past the block the factor's upper triangle is cleared in
def test_inverse_factor_against_numpy(k):
    """U upper triangular with U^T U = H^-1 (numpy's inverse), for H as given and for the damped, reordered H of GPTQ."""
    rng = np.random.default_rng(3)
    x = correlated_inputs(rng, 2 * k, k)
    h = x.T @ x / len(x) + 0.01 * np.eye(k)
    upper = inverse_cholesky(h)
    np.testing.assert_array_equal(np.tril(upper, -1), 0.0)
    np.testing.assert_allclose(upper.T @ upper, np.linalg.inv(h), rtol=1e-6, atol=1e-9 * np.abs(np.linalg.inv(h)).max())
    compensation = Compensation.of(h)
    ordered = damped(h)[np.ix_(compensation.order, compensation.order)]
    np.testing.assert_array_equal(np.tril(compensation.upper, -1), 0.0)
    np.testing.assert_allclose(compensation.upper.T @ compensation.upper, np.linalg.inv(ordered), rtol=1e-6,
                               atol=1e-9 * np.abs(np.linalg.inv(ordered)).max())


@pytest.mark.parametrize("k", [1, 9, 300])  # 300: past the block the columns are permuted in
def test_factor_in_place_equals_the_copy(k):
    """Compensation.in_place: the order and factor of Compensation.of bit for bit, in H's own memory (a dead input too)."""
    rng = np.random.default_rng(k)
    x = correlated_inputs(rng, 2 * k, k)
    x[:, k // 2] = 0.0
    h = x.T @ x / len(x)
    want = Compensation.of(h)
    memory = h.copy()
    got = Compensation.in_place(memory)
    np.testing.assert_array_equal(got.order, want.order)
    np.testing.assert_array_equal(got.upper, want.upper)
    assert np.shares_memory(got.upper, memory)
    with pytest.raises(ValueError, match="in place"):
        Compensation.in_place(h.astype(np.float32))


@pytest.mark.parametrize("mode", ["plain", "sqrt", "post"])
@pytest.mark.parametrize("bits", [3, 4])
def test_compensated_rounding_beats_round_to_nearest_on_correlated_inputs(mode, bits):
    rng = np.random.default_rng(1)
    x = correlated_inputs(rng, 2000, 32)
    h = x.T @ x / len(x)
    rows = rng.standard_normal((16, 32)) * 0.1
    grid = Grid(mode, bits)
    scale = grid.scales(rows, np.ones(len(rows)))
    _, nearest = grid.round(rows, scale)
    compensated = decode(gptq(rows, h, grid, scale), scale, grid)
    outputs = lambda values: np.sum((x @ (rows - values).T) ** 2)  # noqa: E731  (measured on the inputs themselves)
    assert outputs(compensated) < 0.7 * outputs(nearest)


def test_range_by_output_error_beats_the_weight_mse_range_on_its_own_measure():
    """With H far from the identity, the alpha that minimises the output error is not the weight-MSE one."""
    rng = np.random.default_rng(2)
    x = correlated_inputs(rng, 2000, 24) * np.linspace(0.1, 5, 24)
    h = x.T @ x / len(x)
    rows = rng.standard_t(4, (32, 24))
    grid = Grid("plain", 4)
    by_output = search_alpha(rows, h, grid)
    by_weights = best_alpha(rows.astype(np.float32), uniform.codebook(4, False))
    err = lambda alpha: output_errors(rows - grid.round(rows, grid.scales(rows, alpha))[1], h).sum()  # noqa: E731
    assert err(by_output) <= err(by_weights)


def test_quantize_rows_reports_the_error_it_leaves():
    rng = np.random.default_rng(3)
    x = correlated_inputs(rng, 500, 16)
    h = x.T @ x / len(x)
    rows = rng.standard_normal((8, 16))
    result = quantize_rows(rows, h, Grid("plain", 4))
    values = decode(result.codes, result.scale, Grid("plain", 4))
    direct = np.einsum("rk,kl,rl->", rows - values, h, rows - values)
    assert result.error == pytest.approx(direct, rel=1e-9)
    assert np.abs(result.codes).max() <= 7


def test_no_row_ends_worse_than_rounding_to_nearest_at_its_scale():
    """Per row, the kept codes leave at most the output error of plain rounding at the same scale (numpy reference)."""
    rng = np.random.default_rng(7)
    x = correlated_inputs(rng, 300, 20) * np.linspace(0.01, 3, 20)  # nearly singular directions
    h = x.T @ x / len(x)
    rows = rng.standard_t(3, (24, 20))
    result = quantize_rows(rows, h, Grid("plain", 3))
    nearest = np.clip(np.rint(rows / result.scale[:, None].astype(np.float64)), -3, 3) * result.scale[:, None]
    kept = result.codes * result.scale[:, None].astype(np.float64)
    per_row = lambda values: np.einsum("rk,kl,rl->r", rows - values, h, rows - values)  # noqa: E731
    assert np.all(per_row(kept) <= per_row(nearest) * (1 + 1e-9) + 1e-12)
    assert per_row(kept).sum() < per_row(nearest).sum()


@pytest.mark.parametrize("mode", ["plain", "sqrt", "post"])
def test_small_groups_at_once_equal_one_by_one(mode):
    """A depthwise-like layer (40 groups, 2 rows each, K = 9, one dead input): the batched path gives quantize_rows' codes."""
    from onnxq.numerics.output_error import quantize_small_groups

    rng = np.random.default_rng(11)
    groups, per_group, k = 40, 2, 9
    hs = []
    for g in range(groups):
        x = correlated_inputs(rng, 200, k)
        x[:, g % k] = 0 if g % 7 == 0 else x[:, g % k]  # now and then an input that never fires
        hs.append(x.T @ x / len(x))
    h = np.stack(hs)
    rows = rng.standard_t(4, (groups, per_group, k)) * 0.3
    grid = Grid(mode, 4)
    batched = quantize_small_groups(rows, h, grid)
    one_by_one = [quantize_rows(rows[g], h[g], grid) for g in range(groups)]
    np.testing.assert_array_equal(batched.codes, np.concatenate([p.codes for p in one_by_one]))
    np.testing.assert_allclose(batched.scale, np.concatenate([p.scale for p in one_by_one]), rtol=1e-6)
    assert batched.error == pytest.approx(sum(p.error for p in one_by_one), rel=1e-6)


def diagonal_reference(rows: np.ndarray, d: np.ndarray, bits: int, sqrt: bool, alpha: np.ndarray) -> np.ndarray:
    """sum_k d_k (w_k - q_k)^2 per row, q rounded to nearest at range alpha, written out in plain numpy.

    The codes and the values they stand for are float32, as the written model stores and decodes them; the error float64.
    """
    q = 2 ** (bits - 1) - 1
    peak = np.abs(rows).max(axis=1)
    scale = (alpha * (np.sqrt(peak) if sqrt else peak) / q).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0))[:, None]
    w = rows.astype(np.float32)
    x = np.sign(w) * np.sqrt(np.abs(w)) if sqrt else w
    y = np.clip(np.round(x / scale), -q, q).astype(np.float32) * scale
    values = (y * np.abs(y) if sqrt else y).astype(np.float64)
    return ((rows - values) ** 2 * d).sum(axis=1)


@pytest.mark.parametrize("native", [False, True], ids=["numpy", "native"])
@pytest.mark.parametrize("mode", ["plain", "sqrt"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_diagonal_error_against_numpy(mode, bits, native, monkeypatch):
    """The diagonal search's error, blocks of rows and candidates at once (numpy) or in C, equals the weighted error written out."""
    if native and not stats.diagonal_error_available():
        pytest.skip("libonnxq_stats.so was not built with onnxq_diagonal_error (pip install .)")
    monkeypatch.setattr(output_error, "NATIVE_DIAGONAL", native)
    monkeypatch.setattr(output_error, "DIAGONAL_BLOCK", 100)  # 3 rows a block: several blocks, the last one short
    rng = np.random.default_rng(5)
    rows = (rng.standard_normal((11, 33)) * rng.uniform(0.01, 2.0, (11, 1))).astype(np.float32).astype(np.float64)
    rows[4] = 0.0  # an all-zero row: scale 1, no error
    d = rng.uniform(0.0, 3.0, 33)
    error = output_error.DiagonalError(rows, d, Grid(mode, bits))
    candidates = rng.uniform(0.05, 1.0, (11, 5))
    expected = np.stack([diagonal_reference(rows, d, bits, mode == "sqrt", candidates[:, i]) for i in range(5)], axis=1)
    np.testing.assert_allclose(error(candidates), expected, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(error(candidates[:, 2]), expected[:, 2], rtol=1e-9, atol=1e-300)
    assert error(candidates)[4].max() == 0.0


@pytest.mark.parametrize("sqrt", [False, True])
def test_native_diagonal_error_rounds_ties_to_even(sqrt):
    """Values exactly half a step between two codes round to the even code (numpy's rint), past the range they clip."""
    if not stats.diagonal_error_available():
        pytest.skip("libonnxq_stats.so was not built with onnxq_diagonal_error (pip install .)")
    steps = np.arange(-40, 41, dtype=np.float32) * np.float32(0.125)  # at scale 0.25 every odd multiple is a tie; +-5 clips at q 7
    domain = np.stack([steps, steps[::-1]])
    rows = (domain * np.abs(domain) if sqrt else domain).astype(np.float64)
    d = np.linspace(0.5, 2.0, steps.size)
    scales = np.array([[0.25, 0.5], [0.25, 1.0]], dtype=np.float32)
    codes = np.clip(np.rint(domain[:, :, None] / scales[:, None, :]), -7, 7)  # (row, k, candidate)
    y = (codes * scales[:, None, :]).astype(np.float32)
    values = (y * np.abs(y) if sqrt else y).astype(np.float64)
    expected = np.einsum("rkc,k->rc", (rows[:, :, None] - values) ** 2, d)
    got = stats.diagonal_error(np.ascontiguousarray(domain), rows, d, scales, 7, sqrt)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    away = np.clip(np.trunc(domain[:, :, None] / scales[:, None, :] + np.copysign(0.5, domain[:, :, None])), -7, 7)
    assert np.any(away != codes)  # ties occur: rounding them away from zero would give other codes


def test_long_rows_search_alpha_by_the_diagonal():
    """Past FULL_SEARCH_LIMIT the range minimises the diagonal-weighted error: no scanned alpha does better, and it
    differs from the alpha of the unweighted error (the weights matter)."""
    rng = np.random.default_rng(6)
    rows = rng.standard_normal((3, 4200)) * np.where(np.arange(4200) < 50, 6.0, 1.0)  # a few large weights
    d = np.where(np.arange(4200) < 50, 0.01, 1.0)  # ... on nearly silent inputs
    h = np.diag(d)
    assert rows.shape[0] * rows.shape[1] ** 2 > output_error.FULL_SEARCH_LIMIT
    alpha = search_alpha(rows, h, Grid("plain", 4))
    best = diagonal_reference(rows, d, 4, False, alpha)
    for a in np.linspace(0.02, 1.0, 50):
        assert np.all(best <= diagonal_reference(rows, d, 4, False, np.full(3, a)) * (1 + 1e-12))
    unweighted = search_alpha(rows, np.eye(4200), Grid("plain", 4))
    assert np.all(alpha < 0.8 * unweighted)


@pytest.mark.parametrize("mode", ["plain", "sqrt", "post"])
def test_gptq_column_rounding_equals_the_grids(mode):
    """GPTQ's one-column rounding gives Grid.round's codes and values, bit for bit."""
    rng = np.random.default_rng(7)
    grid = Grid(mode, 4)
    rows = rng.standard_normal((40, 3))
    scale = grid.scales(rows, rng.uniform(0.3, 1.0, 40))
    round_line = output_error._line_rounder(grid, scale)
    for j in range(3):
        codes, values = grid.round(rows[:, j : j + 1], scale)
        line_codes, line_values = round_line(rows[:, j])
        np.testing.assert_array_equal(np.asarray(line_codes, dtype=np.int8), codes[:, 0])
        np.testing.assert_array_equal(line_values, values[:, 0])
        assert line_values.dtype == np.float32


@pytest.mark.parametrize("mode", ["plain", "sqrt"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_native_gptq_loop_equals_numpy(mode, bits, monkeypatch):
    """GPTQ's column loop in C gives numpy's codes and leaves the columns as numpy's updates do, bit for bit."""
    if not stats.gptq_available():
        pytest.skip("libonnxq_stats.so was not built with onnxq_gptq_block (pip install .)")
    rng = np.random.default_rng(11)
    x = correlated_inputs(rng, 600, 70)
    h = x.T @ x / len(x)
    grid = Grid(mode, bits)
    rows = rng.standard_t(4, (23, 70)) * 0.1
    rows[3] = 0.0  # a dead row: scale 1, codes 0
    scale = grid.scales(rows, rng.uniform(0.3, 1.0, 23))
    upper = Compensation.of(h).upper
    results = []
    for native in (True, False):
        monkeypatch.setattr(output_error, "NATIVE_GPTQ", native)
        columns = np.ascontiguousarray(rows.T)
        results.append((output_error._gptq_in_order(columns, grid, scale, 16, upper), columns))  # 70 columns: blocks of 16, the last short
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert not np.array_equal(results[0][1], rows.T)  # the columns were updated


def _steps_in(native: bool, monkeypatch) -> None:
    """Make the descent's column steps run in C (libonnxq_stats.so) or in numpy; skip where C is asked and not built."""
    from onnxq.native import stats

    if native and not stats.descent_available():
        pytest.skip("libonnxq_stats.so with onnxq_descent_block is not built here (pip install .)")
    monkeypatch.setattr(output_error, "NATIVE_DESCENT", native)


@pytest.mark.parametrize("native", [True, False], ids=["c", "numpy"])
@pytest.mark.parametrize("mode", ["plain", "sqrt", "post"])
@pytest.mark.parametrize("sweeps", [1, 3])
@pytest.mark.parametrize("follow", [2, 128], ids=["follow-in-pieces", "follow-at-once"])
def test_refine_equals_a_plain_coordinate_descent(mode, sweeps, native, follow, monkeypatch):
    """Small rows refined from rounding to nearest: the same codes as trying every code of every column in turn."""
    _steps_in(native, monkeypatch)
    monkeypatch.setattr(output_error, "FOLLOW_COLUMNS", follow)  # the gradients brought up to date a few columns at a time
    rng = np.random.default_rng(21)
    k, bits = 9, 3
    x = correlated_inputs(rng, 300, k)
    h = x.T @ x / len(x)
    rows = rng.standard_normal((6, k)) * 0.2
    grid = Grid(mode, bits)
    scale = grid.scales(rows, np.full(6, 0.8))
    start = grid.round(rows, scale)[0]
    refined = output_error.refine_groups(rows[None], h[None], grid, scale[None], start[None], sweeps, block=4)[0]
    expected = coordinate_descent_reference(rows, h, scale, start, mode, bits, sweeps)
    assert not np.array_equal(expected, start)  # the descent moves codes in this case
    np.testing.assert_array_equal(refined, expected)


@pytest.mark.parametrize("mode", ["plain", "sqrt", "post"])
def test_refined_codes_no_single_code_can_improve(mode):
    """Run to the end, no row's error falls by changing any one code to any other code of the range (exhaustive)."""
    rng = np.random.default_rng(22)
    k, bits = 12, 4
    x = correlated_inputs(rng, 500, k)
    h = x.T @ x / len(x)
    rows = rng.standard_t(4, (5, k))
    grid = Grid(mode, bits)
    scale = grid.scales(rows, np.full(5, 0.9))
    refined = output_error.refine(rows, h, grid, scale, gptq(rows, h, grid, scale), sweeps=100)
    per_row = lambda codes: np.einsum("rk,kl,rl->r", rows - grid_values(codes, scale, mode, bits),  # noqa: E731
                                      h, rows - grid_values(codes, scale, mode, bits))
    floor = per_row(refined)
    for j in range(k):
        for c in range(-7, 8):
            trial = refined.copy()
            trial[:, j] = c
            assert np.all(per_row(trial) >= floor * (1 - 1e-12))


@pytest.mark.parametrize("mode", ["plain", "sqrt", "post"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refinement_lowers_gptq_error_and_keeps_codes_in_range(mode, seed):
    """On correlated inputs: per row never above GPTQ's error (the plain formula), below it in total, codes in [-7, 7]."""
    rng = np.random.default_rng(seed)
    k = 40
    x = correlated_inputs(rng, 1000, k) * rng.uniform(0.1, 3.0, k)
    h = x.T @ x / len(x)
    rows = rng.standard_t(4, (24, k)) * 0.1
    grid = Grid(mode, 4)
    scale = grid.scales(rows, rng.uniform(0.5, 1.0, 24))
    compensated = gptq(rows, h, grid, scale)
    refined = output_error.refine(rows, h, grid, scale, compensated)
    per_row = lambda codes: np.einsum("rk,kl,rl->r", rows - grid_values(codes, scale, mode, 4),  # noqa: E731
                                      h, rows - grid_values(codes, scale, mode, 4))
    assert np.all(per_row(refined) <= per_row(compensated) * (1 + 1e-12))
    assert per_row(refined).sum() < 0.99 * per_row(compensated).sum()
    assert refined.dtype == np.int8 and np.abs(refined).max() <= 7


def test_refinement_leaves_inputs_that_never_fire_alone():
    """Columns whose input is always zero (H's row and column zero) keep their codes; nothing turns NaN."""
    rng = np.random.default_rng(23)
    x = correlated_inputs(rng, 400, 10)
    x[:, [2, 7]] = 0.0
    h = x.T @ x / len(x)
    rows = rng.standard_normal((8, 10))
    grid = Grid("plain", 4)
    scale = grid.scales(rows, np.ones(8))
    start = rng.integers(-7, 8, (8, 10)).astype(np.int8)
    refined = output_error.refine(rows, h, grid, scale, start)
    np.testing.assert_array_equal(refined[:, [2, 7]], start[:, [2, 7]])
    assert not np.array_equal(refined, start)


def test_quantize_rows_keeps_the_refinement(monkeypatch):
    """quantize_rows with the refinement leaves less output error than without it (SWEEPS = 0), measured directly."""
    rng = np.random.default_rng(24)
    x = correlated_inputs(rng, 1000, 32)
    h = x.T @ x / len(x)
    rows = rng.standard_normal((16, 32))
    grid = Grid("sqrt", 4)
    measured = lambda result: np.einsum("rk,kl,rl->", rows - decode(result.codes, result.scale, grid), h,  # noqa: E731
                                        rows - decode(result.codes, result.scale, grid))
    refined = quantize_rows(rows, h, grid)
    monkeypatch.setattr(output_error, "SWEEPS", 0)
    plain = quantize_rows(rows, h, grid)
    assert measured(refined) < 0.95 * measured(plain)
    assert refined.error == pytest.approx(measured(refined), rel=1e-9)


@pytest.mark.parametrize("mode", ["plain", "sqrt", "post"])
@pytest.mark.parametrize("groups", [1, 3])
def test_the_column_steps_in_c_equal_numpy_bit_for_bit(mode, groups, monkeypatch):
    """The C steps (csrc/stats/coordinate_descent.cc) and numpy's give the same codes on many rows of correlated inputs,
    grouped H included, with dead inputs and blocks that end mid-matrix."""
    rng = np.random.default_rng(31 + groups)
    k, per_group = 45, 20
    hs, rows, starts, scales = [], [], [], []
    grid = Grid(mode, 4)
    for _ in range(groups):
        x = correlated_inputs(rng, 600, k) * rng.uniform(0.1, 3.0, k)
        x[:, 5] = 0.0
        hs.append(x.T @ x / len(x))
        w = rng.standard_t(4, (per_group, k)) * 0.1
        scale = grid.scales(w, rng.uniform(0.5, 1.0, per_group))
        rows.append(w)
        scales.append(scale)
        starts.append(gptq(w, hs[-1], grid, scale))
    args = (np.stack(rows), np.stack(hs), grid, np.stack(scales), np.stack(starts))
    _steps_in(True, monkeypatch)
    in_c = output_error.refine_groups(*args, sweeps=4, block=16)
    monkeypatch.setattr(output_error, "NATIVE_DESCENT", False)
    in_numpy = output_error.refine_groups(*args, sweeps=4, block=16)
    assert not np.array_equal(in_numpy, np.stack(starts))
    np.testing.assert_array_equal(in_c, in_numpy)


@pytest.mark.parametrize("groups", [1, 2])
def test_weights_for_the_output_with_the_factor_in_h_equal_the_copys(groups):
    """quantize_for_output with ``refill`` (GPTQ's factor made in H's memory, H written back) gives the same codes, H restored."""
    from onnxq.numerics.weights import quantize_for_output

    rng = np.random.default_rng(groups)
    k = output_error.SMALL_GROUP_FEATURES + 6  # past the small-groups path, which never factors in place
    h = np.stack([(lambda x: x.T @ x / len(x))(correlated_inputs(rng, 3 * k, k)) for _ in range(groups)])
    weight = rng.standard_normal((4 * groups, k)).astype(np.float32)
    want = quantize_for_output(weight, 4, 0, ("plain", "sqrt"), h.copy())
    calls = []

    def refill(out: np.ndarray) -> None:
        calls.append(out)
        out[...] = h

    memory = h.copy()
    got = quantize_for_output(weight, 4, 0, ("plain", "sqrt"), memory, refill=refill)
    assert len(calls) == 1 and calls[0] is memory
    np.testing.assert_array_equal(memory, h)
    np.testing.assert_array_equal(got.codes, want.codes)
    np.testing.assert_array_equal(got.scale, want.scale)
    assert got.sqrt == want.sqrt and got.mse == want.mse


@pytest.mark.parametrize("shape", [(1, 5, 7), (3, 200, 33), (2, 130, 1)])  # 200, 130 lines: past the block gathered at a time
@pytest.mark.parametrize("kept", [0.0, 0.3, 1.0])
def test_rows_dropped_in_their_own_memory_equal_compress(shape, kept):
    """The refinement's rows left in place: np.compress along the last axis, C order, in the array's own memory."""
    rng = np.random.default_rng(len(shape) + shape[1])
    a = rng.standard_normal(shape)
    keep = rng.random(shape[-1]) < kept
    want = np.compress(keep, a, axis=-1)
    got = output_error._keep_last(a, keep)
    np.testing.assert_array_equal(got, want)
    assert got.flags.c_contiguous and (got.size == 0 or np.shares_memory(got, a))
    strided = rng.standard_normal((shape[0], shape[2] + 1, shape[1])).transpose(0, 2, 1)  # not C order: a new array
    keep = rng.random(strided.shape[-1]) < kept
    want = np.compress(keep, strided, axis=-1)
    np.testing.assert_array_equal(output_error._keep_last(strided, keep), want)


def test_the_searches_leave_no_cycle_holding_h():
    """H is freed when its last name goes, not at the garbage collector's next run (a closure calling itself held it)."""
    import gc
    import weakref

    rng = np.random.default_rng(8)
    rows = rng.standard_normal((4, 6))
    enabled = gc.isenabled()
    gc.disable()
    try:
        for search in (lambda h: search_alpha(rows, h, Grid("plain", 4)),
                       lambda h: output_error.quantize_small_groups(rows.reshape(2, 2, 6), np.stack([h, h]), Grid("plain", 4), 0)):
            x = correlated_inputs(rng, 50, 6)
            h = x.T @ x / len(x)
            held = weakref.ref(h)
            search(h)
            del h
            assert held() is None
    finally:
        if enabled:
            gc.enable()
