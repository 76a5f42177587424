"""POST (powers of sqrt 2) weight numerics against direct numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.numerics import post


def test_four_bit_magnitudes_are_powers_of_sqrt2():
    expected = [0.0] + [2.0**e for e in (-3, -2.5, -2, -1.5, -1, -0.5, 0)]
    np.testing.assert_allclose(post.magnitudes(4), expected, rtol=1e-15)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_rounding_goes_to_the_nearest_level(bits):
    rng = np.random.default_rng(bits)
    rows = rng.standard_t(4, size=(3, 2000)).astype(np.float32)
    alpha = np.array([1.0, 0.7, 0.3])
    q = post.quantize_rows(rows, alpha, bits)
    m = 2 ** (bits - 1) - 1
    assert np.abs(q.codes).max() <= m
    # Brute force: the signed level closest to each weight, levels written out independently.
    peak = np.abs(rows).max(axis=1, keepdims=True)
    levels = np.array([0.0] + [np.sqrt(2.0) ** -(m - k) for k in range(1, m + 1)])
    candidates = alpha[:, None, None] * peak[..., None] * levels  # (R, 1, L)
    distance = np.abs(np.abs(rows)[..., None] - candidates)
    nearest = np.take_along_axis(candidates, np.argmin(distance, axis=-1)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.abs(q.dequantize()), nearest, rtol=2e-6, atol=1e-30)
    assert np.all((np.sign(q.dequantize()) == np.sign(rows)) | (q.codes == 0))


def test_search_matches_dense_scan():
    rng = np.random.default_rng(0)
    rows = rng.standard_t(5, size=(4, 3000)).astype(np.float32)
    for bits in (3, 4, 5):
        found = np.mean((post.quantize_best(rows, bits).dequantize() - rows) ** 2, axis=1)
        scan = np.linspace(1 / 2000, 1, 2000)
        best = np.min([np.mean((post.quantize_rows(rows, np.full(4, a), bits).dequantize() - rows) ** 2, axis=1) for a in scan], axis=0)
        assert np.all(found <= best * 1.01), (bits, found / best)


def test_all_zero_row_is_exact():
    rows = np.zeros((2, 16), dtype=np.float32)
    rows[1, 3] = -0.5
    q = post.quantize_best(rows, 4)
    np.testing.assert_array_equal(q.dequantize(), rows)


def test_range_absmax_gives_post_codes_at_the_full_range():
    """--range absmax with --format post: each row's scale is its max|w| (no search), through the pipeline's planner."""
    from onnx import numpy_helper

    from models import conv_bn_relu_gemm
    from onnxq import QuantizeConfig, RangeMethod, WeightFormat, quantize
    from onnxq.native.domain import POST_CONV
    from onnxq.pipeline import load_and_prepare

    model = conv_bn_relu_gemm()
    written = quantize(model, QuantizeConfig(bits=4, format=WeightFormat.POST, range=RangeMethod.ABSMAX, first_last_bits=4))
    inits = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    weights = {t.name: numpy_helper.to_array(t) for t in load_and_prepare(model).model.graph.initializer}  # BN folded in
    ops = [n for n in written.graph.node if n.op_type == POST_CONV]
    assert ops
    for node in ops:
        float_weight = next(w for name, w in weights.items() if node.input[1].startswith(name))
        peak = np.abs(float_weight.reshape(len(float_weight), -1)).max(axis=1).astype(np.float32)
        np.testing.assert_array_equal(inits[node.input[2]], peak)
