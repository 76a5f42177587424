"""Symmetric b-bit codes (onnxq.numerics.uniform) and per-tensor/per-channel weight quantization
(onnxq.numerics.weights), checked against numpy references written here."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_float32_decode, onnx_dequantize

from onnxq.config import RangeMethod, SqrtMode
from onnxq.numerics import uniform
from onnxq.numerics.weights import from_rows, quantize_weight, to_rows

ALL_BITS = range(2, 9)


def ref_q(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def ref_rows_rtn(rows: np.ndarray, bits: int, sqrt: bool) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest over the full range: float32 scale max|x|/Q per row (1 for zero rows),
    codes round(x/scale) with x = w or sign(w)*sqrt(|w|), computed in float64."""
    w = rows.astype(np.float64)
    x = np.sign(w) * np.sqrt(np.abs(w)) if sqrt else w
    top = np.abs(x).max(axis=1)
    scale = (top / ref_q(bits)).astype(np.float32)
    scale[scale == 0] = 1.0
    ratio = x / scale.astype(np.float64)[:, None]
    codes = np.clip(np.rint(ratio), -ref_q(bits), ref_q(bits))
    return codes, scale, ratio


def weight_rows(rng: np.random.Generator, r: int, n: int) -> np.ndarray:
    """Rows of Laplace weights with per-row scales spanning four decades, one row all zero."""
    rows = rng.laplace(size=(r, n)) * np.logspace(-3, 1, r)[:, None]
    rows[r // 2] = 0.0
    return rows.astype(np.float32)


# ---------------------------------------------------------------- codes and grid


@pytest.mark.parametrize("sqrt", [False, True])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_codes_within_symmetric_range(bits: int, sqrt: bool) -> None:
    """Codes lie in [-Q, Q], Q = 2**(b-1) - 1, are int8, and both ends are reached at alpha = 1;
    a small alpha clips many values to exactly +-Q."""
    rng = np.random.default_rng(bits)
    rows = weight_rows(rng, 5, 700)
    q = ref_q(bits)
    assert uniform.max_code(bits) == q
    for alpha in (np.ones(5), np.full(5, 0.2)):
        out = uniform.quantize_rows(rows, alpha, bits, sqrt)
        assert out.codes.dtype == np.int8 and out.codes.shape == rows.shape
        assert out.codes.min() >= -q and out.codes.max() <= q
    full = uniform.quantize_rows(rows, np.ones(5), bits, sqrt)
    for r in (0, 1, 3, 4):  # the non-zero rows reach the ends of the grid at alpha = 1
        assert np.abs(full.codes[r]).max() == q
    clipped = uniform.quantize_rows(rows, np.full(5, 0.2), bits, sqrt)
    assert np.sum(np.abs(clipped.codes) == q) > np.sum(np.abs(full.codes) == q)
    result = uniform.quantize_best(rows, bits, sqrt)
    assert result.codes.min() >= -q and result.codes.max() <= q


@pytest.mark.parametrize("sqrt", [False, True])
def test_dequantize_matches_reference(sqrt: bool) -> None:
    """dequantize gives codes*scale per row (plain) or its sign-kept square (sqrt), float32: bit for bit what
    onnxruntime's DequantizeLinear (+ Abs, Mul) computes, and within float32 rounding of the float64 definition."""
    rng = np.random.default_rng(5)
    codes = rng.integers(-127, 128, size=(4, 33)).astype(np.int8)
    scale = rng.uniform(1e-3, 2.0, size=4).astype(np.float32)
    got = uniform.dequantize(codes, scale, sqrt)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, onnx_dequantize(codes, scale, sqrt))
    assert_float32_decode(got, codes, scale, sqrt)
    # UniformWeights.dequantize decodes the same way.
    uw = uniform.quantize_rows(rng.normal(size=(3, 20)).astype(np.float32), np.ones(3), 5, sqrt)
    np.testing.assert_array_equal(uw.dequantize(), onnx_dequantize(uw.codes, uw.scale, sqrt))
    assert_float32_decode(uw.dequantize(), uw.codes, uw.scale, sqrt)
    if sqrt:  # signs survive the squaring
        assert np.all(np.sign(got) == np.sign(codes))


# Worked by hand: codes (R, n), one scale per row, and the weights they stand for (every value exact in float32).
HAND_DECODED = [
    # plain: q * s
    ([[3, -2, 0, 7]], [0.5], False, [[1.5, -1.0, 0.0, 3.5]]),
    ([[1, -4], [-3, 2]], [0.25, 2.0], False, [[0.25, -1.0], [-6.0, 4.0]]),
    # sqrt: sign(q) * (q * s)^2; (q^2 * s would give 4.5, -2, 0, 24.5 and 0.25, -4, -18, 8; no sign 1, ..., 36)
    ([[3, -2, 0, 7]], [0.5], True, [[2.25, -1.0, 0.0, 12.25]]),
    ([[1, -4], [-3, 2]], [0.25, 2.0], True, [[0.0625, -1.0], [-36.0, 16.0]]),
    ([[127, -127, 1]], [2.0**-10], True, [[16129 * 2.0**-20, -16129 * 2.0**-20, 2.0**-20]]),
]


@pytest.mark.parametrize("codes, scale, sqrt, weights", HAND_DECODED)
def test_dequantize_by_hand(codes, scale, sqrt, weights) -> None:
    got = uniform.dequantize(np.array(codes, np.int8), np.array(scale, np.float32), sqrt)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array(weights, np.float32))


@pytest.mark.parametrize(
    "rows, bits, alpha, sqrt, codes, weights",
    [
        # Q = 3, scale max|w| / Q = 1: -1.2 -> -1, 0.4 -> 0
        ([[3.0, -1.2, 0.4, 0.0]], 3, 1.0, False, [[3, -1, 0, 0]], [[3.0, -1.0, 0.0, 0.0]]),
        # alpha 0.5: scale 0.5, w / s = 6, -2.4, 0.8, 0 -> clipped to Q = 3: 3, -2, 1, 0
        ([[3.0, -1.2, 0.4, 0.0]], 3, 0.5, False, [[3, -2, 1, 0]], [[1.5, -1.0, 0.5, 0.0]]),
        # sqrt, Q = 7: sign(w) sqrt|w| = 1, -0.6, 0, 0.1; scale sqrt(1) / 7; x / s = 7, -4.2, 0, 0.7 -> 7, -4, 0, 1;
        # weights sign(q) (q / 7)^2 = 1, -16/49, 0, 1/49
        ([[1.0, -0.36, 0.0, 0.01]], 4, 1.0, True, [[7, -4, 0, 1]], [[1.0, -16 / 49, 0.0, 1 / 49]]),
        # sqrt, Q = 3, two rows: peaks 9 and 0.25 -> scales 3 / 3 = 1 and 0.5 / 3; x / s = 3, -2, 1 and 3, 0, -1.8
        ([[9.0, -4.0, 1.0], [0.25, 0.0, -0.09]], 3, 1.0, True, [[3, -2, 1], [3, 0, -2]], [[9.0, -4.0, 1.0], [0.25, 0.0, -1 / 9]]),
    ],
)
def test_quantize_rows_by_hand(rows, bits, alpha, sqrt, codes, weights) -> None:
    """Codes worked out by hand, and the weights they decode to, within float32 rounding (the scales are float32)."""
    out = uniform.quantize_rows(np.array(rows, np.float32), np.full(len(rows), alpha), bits, sqrt)
    assert out.codes.tolist() == codes
    np.testing.assert_allclose(out.dequantize(), np.array(weights), rtol=3 * 2.0**-24, atol=0)


@pytest.mark.parametrize("sqrt", [False, True])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_quantize_rows_alpha_one_is_round_to_nearest(bits: int, sqrt: bool) -> None:
    """quantize_rows with alpha = 1 equals a numpy round-to-nearest with scale max|x|/Q per row
    (codes may differ by one only where x/scale is within float32 noise of a half-integer)."""
    rng = np.random.default_rng(20 + bits)
    rows = weight_rows(rng, 6, 500)
    out = uniform.quantize_rows(rows, np.ones(6), bits, sqrt)
    codes, scale, ratio = ref_rows_rtn(rows, bits, sqrt)
    np.testing.assert_allclose(out.scale, scale, rtol=1e-6)
    assert out.scale.dtype == np.float32
    tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4
    diff = out.codes.astype(np.int64) - codes
    assert np.all(diff[~tie] == 0)
    assert np.all(np.abs(diff[tie]) <= 1)
    # Zero row: scale 1, codes 0, no NaN.
    assert out.scale[3] == 1.0 and np.all(out.codes[3] == 0)
    assert not np.any(np.isnan(out.dequantize()))
    # absmax_rows is the same thing.
    np.testing.assert_array_equal(uniform.absmax_rows(rows, bits, sqrt).codes, out.codes)


def test_scale_follows_alpha() -> None:
    """The scale is alpha*max|w|/Q (alpha*sqrt(max|w|)/Q in sqrt mode), one per row."""
    rng = np.random.default_rng(1)
    rows = weight_rows(rng, 4, 100)
    alpha = np.array([0.3, 0.55, 0.8, 1.0])
    peak = np.abs(rows.astype(np.float64)).max(axis=1)
    for bits in (3, 6):
        plain = uniform.quantize_rows(rows, alpha, bits, False).scale
        root = uniform.quantize_rows(rows, alpha, bits, True).scale
        live = peak > 0
        np.testing.assert_allclose(plain[live], (alpha * peak / ref_q(bits))[live], rtol=1e-6)
        np.testing.assert_allclose(root[live], (alpha * np.sqrt(peak) / ref_q(bits))[live], rtol=1e-6)


# ---------------------------------------------------------------- bit widths


def test_storage_bits() -> None:
    """2-4 bit codes are stored as int4, 5-8 bit codes as int8."""
    assert [uniform.storage_bits(b) for b in ALL_BITS] == [4, 4, 4, 8, 8, 8, 8]


@pytest.mark.parametrize("bad", [1, 9, 0, -4, True, False, 4.0, "4", None])
def test_invalid_bits_raise(bad) -> None:
    """Bit widths outside 2..8, booleans and non-integers are rejected with ValueError."""
    for fn in (uniform.max_code, uniform.storage_bits, lambda b: uniform.codebook(b, False)):
        with pytest.raises(ValueError):
            fn(bad)
    with pytest.raises(ValueError):
        quantize_weight(np.ones((2, 3), np.float32), bad, 0)


# ---------------------------------------------------------------- weights.quantize_weight


@pytest.mark.parametrize(
    "shape, axis",
    [((8, 3, 3, 3), 0), ((3, 8, 3, 3), 1), ((16, 40), 0), ((40, 16), 1), ((6, 5, 7), None), ((50,), None), ((5, 7), None)],
)
@pytest.mark.parametrize("sqrt", [SqrtMode.OFF, SqrtMode.ON])
def test_quantize_weight_shapes_and_reported_mse(shape, axis, sqrt) -> None:
    """Codes keep the weight's shape, scale has shape (C,) along axis (() per tensor), and the
    reported mse and sqnr equal those of dequantize() against the original weight."""
    rng = np.random.default_rng(len(shape) * 10 + (axis or 0))
    weight = (rng.standard_t(5, size=shape) * 0.1).astype(np.float32)
    q = quantize_weight(weight, 4, axis, sqrt)
    assert q.codes.shape == weight.shape
    assert q.scale.shape == (() if axis is None else (shape[axis],))
    assert q.scale.dtype == np.float32
    assert q.sqrt == (sqrt is SqrtMode.ON) and q.axis == axis and q.bits == 4
    approx = q.dequantize()
    assert approx.shape == weight.shape
    mse = np.mean((weight.astype(np.float64) - approx.astype(np.float64)) ** 2)
    assert q.mse == pytest.approx(mse, rel=1e-6)
    sqnr = 10 * np.log10(np.sum(weight.astype(np.float64) ** 2) / np.sum((weight - approx.astype(np.float64)) ** 2))
    assert q.sqnr_db == pytest.approx(sqnr, abs=1e-6)
    # The dequantized tensor is what codes * scale along the axis gives, decoded by onnxruntime's DequantizeLinear
    # (+ Abs, Mul) bit for bit, and by float64 arithmetic within float32 rounding.
    np.testing.assert_array_equal(approx, onnx_dequantize(q.codes, q.scale, q.sqrt, axis))
    assert_float32_decode(approx, q.codes, q.scale, q.sqrt, axis)


def test_quantize_weight_per_channel_rows_are_independent() -> None:
    """Per channel along axis 1: each output channel gets its own scale, equal to quantizing that
    channel alone; channels of very different magnitude keep their relative accuracy."""
    rng = np.random.default_rng(9)
    weight = (rng.normal(size=(20, 6, 3)) * np.logspace(-4, 2, 6)[None, :, None]).astype(np.float32)
    q = quantize_weight(weight, 4, 1, SqrtMode.OFF)
    for c in range(6):
        alone = quantize_weight(np.ascontiguousarray(weight[:, c]), 4, None, SqrtMode.OFF)
        assert q.scale[c] == alone.scale
        np.testing.assert_array_equal(q.codes[:, c], alone.codes)
    per_tensor = quantize_weight(weight, 4, None, SqrtMode.OFF)
    small = per_tensor.dequantize()[:, 0]
    assert np.all(small == 0)  # per tensor, the tiny channel is flushed to zero ...
    assert np.any(q.dequantize()[:, 0] != 0)  # ... per channel it is not


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("axis", [0, None])
def test_sqrt_auto_picks_lower_mse(bits: int, axis) -> None:
    """SqrtMode.AUTO returns exactly the OFF or ON result, whichever has the lower weight MSE (up to 5 bits)."""
    rng = np.random.default_rng(bits)
    for weight in (
        (rng.standard_t(3, size=(8, 200)) * 0.05).astype(np.float32),  # heavy-tailed: sqrt tends to win
        rng.uniform(-1, 1, size=(8, 200)).astype(np.float32),  # flat: plain tends to win
    ):
        off = quantize_weight(weight, bits, axis, SqrtMode.OFF)
        on = quantize_weight(weight, bits, axis, SqrtMode.ON)
        auto = quantize_weight(weight, bits, axis, SqrtMode.AUTO)
        pick = on if on.mse < off.mse else off
        assert auto.sqrt == pick.sqrt
        assert auto.mse == pick.mse
        np.testing.assert_array_equal(auto.codes, pick.codes)
        np.testing.assert_array_equal(auto.scale, pick.scale)


def test_sqrt_auto_chooses_both_ways() -> None:
    """AUTO is not stuck on one mode: flat weights go plain, heavy-tailed ones go sqrt at 3 bits."""
    rng = np.random.default_rng(0)
    flat = rng.uniform(-1, 1, size=(4, 500)).astype(np.float32)
    heavy = (rng.standard_t(2, size=(4, 500)) * 0.05).astype(np.float32)
    assert quantize_weight(flat, 3, 0).sqrt is False
    assert quantize_weight(heavy, 3, 0).sqrt is True


@pytest.mark.parametrize("sqrt", [SqrtMode.OFF, SqrtMode.ON])
def test_absmax_method_uses_full_range(sqrt) -> None:
    """RangeMethod.ABSMAX gives alpha == 1 for every row, i.e. scale = max|x|/Q, and its MSE is
    never below the searched one."""
    rng = np.random.default_rng(4)
    weight = (rng.laplace(size=(6, 300)) * 0.1).astype(np.float32)
    q = quantize_weight(weight, 4, 0, sqrt, RangeMethod.ABSMAX)
    assert np.all(q.alpha == 1.0)
    codes, scale, _ = ref_rows_rtn(weight, 4, q.sqrt)
    np.testing.assert_allclose(q.scale, scale, rtol=1e-6)
    searched = quantize_weight(weight, 4, 0, sqrt, RangeMethod.SEARCH)
    assert searched.mse <= q.mse
    if sqrt is SqrtMode.OFF:  # Laplace rows at 4 bits always want some clipping in plain mode
        assert np.all(searched.alpha < 1.0)


# ---------------------------------------------------------------- rows


@pytest.mark.parametrize(
    "shape, axis",
    [((7,), 0), ((7,), None), ((4, 5), 0), ((4, 5), 1), ((2, 3, 4), 0), ((2, 3, 4), 1), ((2, 3, 4), 2), ((3, 1, 2, 5), 3), ((3, 4, 2, 5), None)],
)
def test_to_rows_from_rows_round_trip(shape, axis) -> None:
    """to_rows puts index i of ``axis`` in row i (one row when axis is None); from_rows undoes it."""
    w = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    rows = to_rows(w, axis)
    if axis is None:
        assert rows.shape == (1, w.size)
        np.testing.assert_array_equal(rows[0], w.ravel())
    else:
        assert rows.shape == (shape[axis], w.size // shape[axis])
        for i in range(shape[axis]):
            np.testing.assert_array_equal(np.sort(rows[i]), np.sort(np.take(w, i, axis=axis).ravel()))
    back = from_rows(rows, shape, axis)
    assert back.shape == w.shape
    np.testing.assert_array_equal(back, w)


def test_from_rows_negative_axis() -> None:
    """A negative axis (as ONNX allows) round-trips like its positive equivalent."""
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(from_rows(to_rows(w, -1), w.shape, -1), w)


@pytest.mark.parametrize("bits", [6, 7, 8])
def test_sqrt_auto_keeps_plain_codes_from_6_bits(bits: int) -> None:
    """Wider codes stay plain even where sqrt codes have the lower weight MSE (they cost the output more there)."""
    weight = (np.random.default_rng(0).standard_t(3, size=(8, 200)) * 0.05).astype(np.float32)
    assert quantize_weight(weight, bits, 0, SqrtMode.ON).mse < quantize_weight(weight, bits, 0, SqrtMode.OFF).mse  # sqrt's MSE is lower
    auto = quantize_weight(weight, bits, 0, SqrtMode.AUTO)
    assert not auto.sqrt and auto.mse == quantize_weight(weight, bits, 0, SqrtMode.OFF).mse
