"""Property-based checks (hypothesis) of the numeric core: uniform and POST codes, int4 packing, the alpha search.

Rows are drawn with the awkward cases mixed in: all zeros, one non-zero, constant rows,
magnitudes from subnormal (1e-42) to near float32's maximum. Every property is judged
against numpy written here. Runs are derandomized and keep no example database, so CI
sees the same examples every time, in bounded time.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_float32_decode, onnx_dequantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxq.config import RangeMethod, SqrtMode
from onnxq.numerics import post, uniform
from onnxq.numerics.packing import pack_int4, unpack_int4
from onnxq.numerics.search import best_alpha, search_alpha
from onnxq.numerics.weights import quantize_post_weight, quantize_weight

FIXED = settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

EPS32 = float(np.finfo(np.float32).eps)
TINY32 = float(np.finfo(np.float32).smallest_subnormal)

#: Row magnitudes to try: subnormal, tiny normal, ordinary, huge (the peak stays below float32's maximum).
MAGNITUDES = (1e-42, 1e-30, 1e-3, 1.0, 1e20, 3e38)


@st.composite
def weight_rows(draw: st.DrawFn, max_rows: int = 4, max_len: int = 48) -> np.ndarray:
    """Float32 rows (R, n) of one of several shapes of data, scaled to one magnitude."""
    r = draw(st.integers(1, max_rows))
    n = draw(st.integers(1, max_len))
    kind = draw(st.sampled_from(["random", "zeros", "one", "constant", "two levels"]))
    unit = draw(hnp.arrays(np.float64, (r, n), elements=st.floats(-1, 1, allow_nan=False, allow_subnormal=False)))
    if kind == "zeros":
        unit[:] = 0.0
    elif kind == "one":
        keep = unit[:, :1].copy()
        unit[:] = 0.0
        unit[:, draw(st.integers(0, n - 1))] = np.where(keep[:, 0] == 0, 0.5, keep[:, 0])
    elif kind == "constant":
        unit[:] = draw(st.sampled_from([-1.0, -0.25, 0.7]))
    elif kind == "two levels":
        unit = np.where(unit >= 0, 1.0, -0.01)
    return (unit * draw(st.sampled_from(MAGNITUDES))).astype(np.float32)


def bits_values() -> st.SearchStrategy[int]:
    return st.integers(2, 8)


# ---------------------------------------------------------------- uniform codes


@FIXED
@given(rows=weight_rows(), bits=bits_values(), sqrt=st.booleans(), data=st.data())
def test_uniform_round_trip_within_half_a_step_inside_the_range(rows, bits, sqrt, data):
    alpha = np.array(data.draw(st.lists(st.floats(0.05, 1.0), min_size=len(rows), max_size=len(rows))))
    q = uniform.quantize_rows(rows, alpha, bits, sqrt)
    top_code = 2 ** (bits - 1) - 1
    assert q.codes.dtype == np.int8 and np.abs(q.codes.astype(int)).max() <= top_code
    assert np.all(np.isfinite(q.scale)) and np.all(q.scale > 0)
    approx = q.dequantize()
    assert np.all(np.isfinite(approx))
    # Judge in the rounding domain (w, or sign(w)*sqrt|w|), in float64.
    w = rows.astype(np.float64)
    x = np.sign(w) * np.sqrt(np.abs(w)) if sqrt else w
    s = q.scale.astype(np.float64)[:, None]
    err = np.abs(x - q.codes * s)
    inside = np.abs(x) <= top_code * s
    tol = s / 2 * (1 + 4 * EPS32) + 4 * EPS32 * np.abs(x) + TINY32
    assert np.all(err[inside] <= np.broadcast_to(tol, err.shape)[inside])
    beyond = np.abs(x) > (top_code + 0.5) * s * (1 + 4 * EPS32)
    assert np.all(np.abs(q.codes[beyond]) == top_code)
    assert np.all(np.sign(q.codes) * np.sign(w) >= 0)  # never the wrong sign


@FIXED
@given(rows=weight_rows(), bits=bits_values(), sqrt=st.booleans())
def test_uniform_dequantize_is_codes_times_scale(rows, bits, sqrt):
    """Codes times scale (sign-kept square in sqrt mode): bit for bit what onnxruntime's DequantizeLinear (+ Abs, Mul)
    computes in a quantized model, and within float32 rounding of the float64 value of the definition."""
    q = uniform.quantize_rows(rows, np.ones(len(rows)), bits, sqrt)
    got = q.dequantize()
    np.testing.assert_array_equal(got, onnx_dequantize(q.codes, q.scale, sqrt))
    assert_float32_decode(got, q.codes, q.scale, sqrt)


# ---------------------------------------------------------------- POST codes


def ref_post_levels(bits: int) -> np.ndarray:
    """POST magnitudes in units of the row's scale: 0, then 2**(-(M - m) / 2) for m = 1..M."""
    top = 2 ** (bits - 1) - 1
    return np.array([0.0] + [2.0 ** (-(top - m) / 2) for m in range(1, top + 1)])


@FIXED
@given(rows=weight_rows(), bits=st.integers(2, 8), data=st.data())
def test_post_codes_decode_to_the_level_set_and_round_to_the_nearest(rows, bits, data):
    alpha = np.array(data.draw(st.lists(st.floats(0.05, 1.0), min_size=len(rows), max_size=len(rows))))
    q = post.quantize_rows(rows, alpha, bits)
    levels = ref_post_levels(bits)
    top = len(levels) - 1
    assert q.codes.dtype == np.int8 and np.abs(q.codes.astype(int)).max() <= top
    assert np.all(np.isfinite(q.scale)) and np.all(q.scale > 0)
    # Decoding gives exactly sign * level * scale (each rounded once to float32).
    expected = np.sign(q.codes) * (levels.astype(np.float32)[np.abs(q.codes)] * q.scale[:, None])
    np.testing.assert_array_equal(q.dequantize(), expected.astype(np.float32))
    # The chosen level is the nearest of all signed levels (brute force), up to float32 rounding of the boundaries.
    w = rows.astype(np.float64)
    s = q.scale.astype(np.float64)[:, None, None]
    candidates = np.concatenate([-levels[:0:-1], levels]) * s  # (R, 1, 2M+1)
    best = np.abs(w[..., None] - candidates).min(axis=-1)
    chosen = np.abs(w - np.sign(q.codes) * levels[np.abs(q.codes)] * s[..., 0])
    assert np.all(chosen <= best + 4 * EPS32 * (np.abs(w) + s[..., 0]) + TINY32)


# ---------------------------------------------------------------- int4 packing


@FIXED
@given(
    codes=hnp.arrays(
        st.sampled_from([np.int8, np.int16, np.int32, np.int64]),
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7),
        elements=st.integers(-8, 7),
    )
)
def test_pack_unpack_int4_round_trip(codes):
    packed = pack_int4(codes)
    assert len(packed) == (codes.size + 1) // 2
    back = unpack_int4(packed, codes.size)
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, codes.ravel().astype(np.int8))
    if codes.size % 2:
        assert packed[-1] >> 4 == 0  # the unused high nibble of an odd count is zero


@FIXED
@given(values=st.lists(st.integers(-200, 200), min_size=1, max_size=20).filter(lambda v: min(v) < -8 or max(v) > 7))
def test_pack_int4_refuses_values_outside_int4(values):
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(np.array(values, dtype=np.int16))


# ---------------------------------------------------------------- alpha search


def ref_exact_sse(rows: np.ndarray, alpha: np.ndarray, bits: int, sqrt: bool) -> np.ndarray:
    """Per row, the exact sum of squared errors of a float64 quantize-dequantize at ``alpha`` (units of peak**2)."""
    w = rows.astype(np.float64)
    peak = np.abs(w).max(axis=1, keepdims=True)
    u = w / np.where(peak > 0, peak, 1.0)  # scale-free, so huge and subnormal rows compare alike
    x = np.sign(u) * np.sqrt(np.abs(u)) if sqrt else u
    top_code = 2 ** (bits - 1) - 1
    s = np.asarray(alpha, dtype=np.float64)[..., None] / top_code
    y = np.clip(np.rint(x / s), -top_code, top_code) * s
    approx = np.sign(y) * y**2 if sqrt else y
    return np.sum((approx - u) ** 2, axis=-1)


@FIXED
@given(rows=weight_rows(max_len=64), bits=bits_values(), sqrt=st.booleans())
def test_best_alpha_in_unit_interval_and_near_a_dense_scan(rows, bits, sqrt):
    alpha = best_alpha(rows, uniform.codebook(bits, sqrt))
    assert alpha.shape == (len(rows),)
    assert np.all(np.isfinite(alpha)) and np.all(alpha > 0) and np.all(alpha <= 1)
    found = ref_exact_sse(rows, alpha, bits, sqrt)
    at_one = ref_exact_sse(rows, np.ones(len(rows)), bits, sqrt)
    scan = np.linspace(0.01, 1.0, 400)
    dense = np.stack([ref_exact_sse(rows, np.full(len(rows), a), bits, sqrt) for a in scan]).min(axis=0)
    slack = 1e-9 * rows.shape[1]
    assert np.all(found <= at_one * (1 + 1e-6) + slack)  # never worse than plain absmax
    assert np.all(found <= dense * 1.25 + 1e-3 * at_one + slack)  # and close to the best of a dense scan


@FIXED
@given(rows=weight_rows(), bits=bits_values(), sqrt=st.booleans())
def test_search_alpha_reports_finite_errors(rows, bits, sqrt):
    result = search_alpha(rows, uniform.codebook(bits, sqrt))
    assert np.all(np.isfinite(result.alpha)) and np.all((result.alpha > 0) & (result.alpha <= 1))
    assert np.all(np.isfinite(result.mse)) and np.all(result.mse >= 0)


# ---------------------------------------------------------------- whole tensors


@FIXED
@given(rows=weight_rows(), bits=bits_values(), sqrt=st.sampled_from(list(SqrtMode)), method=st.sampled_from(list(RangeMethod)))
def test_quantize_weight_never_gives_nan(rows, bits, sqrt, method):
    for axis in (0, None):
        q = quantize_weight(rows, bits, axis, sqrt, method)
        approx = q.dequantize()
        assert approx.shape == rows.shape and np.all(np.isfinite(approx))
        assert np.isfinite(q.mse) and q.mse >= 0 and not np.isnan(q.sqnr_db)
        assert np.all(np.isfinite(q.scale)) and np.all(q.scale > 0)
        if not rows.any():
            assert q.mse == 0 and not approx.any()


@FIXED
@given(rows=weight_rows(), bits=st.integers(2, 4))
def test_quantize_post_weight_never_gives_nan(rows, bits):
    for axis in (0, None):
        q = quantize_post_weight(rows, bits, axis)
        approx = q.dequantize()
        assert approx.shape == rows.shape and np.all(np.isfinite(approx))
        assert np.isfinite(q.mse) and q.mse >= 0 and not np.isnan(q.sqnr_db)


# ---------------------------------------------------------------- regressions found by the properties


@pytest.mark.parametrize("sqrt", [False, True])
def test_subnormal_rows_are_searched_and_quantized(sqrt):
    """bins / peak overflowed float32 for peaks below ~1e-35, and the histogram crashed on the inf."""
    rows = np.array([[1e-42, -5e-43, 0.0], [3e-39, 1e-40, -2e-39], [0.5, -0.25, 0.1]], dtype=np.float32)
    alpha = search_alpha(rows, uniform.codebook(4, sqrt)).alpha
    assert np.all(np.isfinite(alpha)) and np.all((alpha > 0) & (alpha <= 1))
    q = quantize_weight(rows, 4, 0, SqrtMode.ON if sqrt else SqrtMode.OFF)
    assert np.all(np.isfinite(q.dequantize()))
    assert q.codes[2].tolist() == quantize_weight(rows[2:], 4, 0, SqrtMode.ON if sqrt else SqrtMode.OFF).codes[0].tolist()
