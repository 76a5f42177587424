"""Balanced rounding (onnxq/numerics/balance.py): against a brute-force numpy reference, and where the pipeline uses it."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import residual_block
from onnxq import QuantizeConfig, RangeMethod, SqrtMode, quantize
from onnxq.numerics import post, uniform
from onnxq.numerics.balance import balance_codes
from onnxq.numerics.weights import quantize_post_weight, quantize_weight, to_rows


def _plain_values(scale: np.ndarray):  # noqa: ANN202
    return lambda codes: codes.astype(np.float64) * scale[:, None]


def _brute_force(row: np.ndarray, codes: np.ndarray, scale: float, top: int) -> tuple[float, float]:
    """(|sum of errors|, square error) of the best codes that move any subset one level towards a zero sum.

    Every subset of the row's codes is tried (plain uniform grid): the least |sum| first, then the least square error.
    """
    excess = float(np.sum(codes * scale - row))
    step = -1 if excess > 0 else 1
    best = (abs(excess), float(np.sum((codes * scale - row) ** 2)))
    for size in range(1, len(row) + 1):
        for subset in itertools.combinations(range(len(row)), size):
            moved = codes.astype(np.int64).copy()
            moved[list(subset)] += step
            if np.any(np.abs(moved) > top):
                continue
            candidate = (round(abs(float(np.sum(moved * scale - row))), 9), float(np.sum((moved * scale - row) ** 2)))
            if candidate < (round(best[0], 9), best[1]):
                best = candidate
    return best


@pytest.mark.parametrize("bits", [3, 4])
def test_plain_rows_match_brute_force(bits: int) -> None:
    """On a uniform grid every move removes one step: the fewest cheapest moves are the exhaustive search's optimum."""
    rng = np.random.default_rng(bits)
    top = uniform.max_code(bits)
    rows = rng.normal(0.2, 1.0, size=(40, 8))
    scale = np.abs(rows).max(axis=1) / top
    codes = np.clip(np.rint(rows / scale[:, None]), -top, top).astype(np.int8)
    balanced = balance_codes(rows, codes, _plain_values(scale), top)
    for row, start, got, s in zip(rows, codes, balanced, scale, strict=True):
        want = _brute_force(row, start, float(s), top)
        got_sum = abs(float(np.sum(got * s - row)))
        assert got_sum == pytest.approx(want[0], abs=1e-9)
        assert float(np.sum((got * s - row) ** 2)) == pytest.approx(want[1], rel=1e-9)


def test_moves_are_one_level_one_way_within_range() -> None:
    rng = np.random.default_rng(1)
    rows = rng.normal(0.5, 1.0, size=(64, 200))
    top = uniform.max_code(4)
    scale = np.abs(rows).max(axis=1) / top
    codes = np.clip(np.rint(rows / scale[:, None]), -top, top).astype(np.int8)
    balanced = balance_codes(rows, codes, _plain_values(scale), top)
    moves = balanced.astype(int) - codes.astype(int)
    assert set(np.unique(moves)) <= {-1, 0, 1}
    assert np.all(np.abs(balanced) <= top)
    excess = np.sum(codes * scale[:, None] - rows, axis=1)
    assert np.all((moves == 0) | (np.sign(moves) == -np.sign(excess)[:, None]))  # towards zero only
    after = np.abs(np.sum(balanced * scale[:, None] - rows, axis=1))
    assert np.all(after <= scale / 2 + 1e-12)  # within half a step: one more or one fewer move would be further
    assert np.abs(excess).mean() > 10 * after.mean()  # and the sums were far from it before


@pytest.mark.parametrize("grid", ["sqrt", "post"])
def test_nonuniform_grids_shrink_the_sum(grid: str) -> None:
    """Sqrt and POST codes: moves of unequal size, still one level each, the sum no further from zero in any row."""
    rng = np.random.default_rng(2)
    rows = rng.normal(0.3, 1.0, size=(32, 300)).astype(np.float32)
    if grid == "sqrt":
        q = uniform.quantize_rows(rows, np.ones(len(rows)), 4, sqrt=True)
        values, top = (lambda c: uniform.dequantize(c, q.scale, True)), uniform.max_code(4)
    else:
        q = post.quantize_rows(rows, np.ones(len(rows)), 4)
        values, top = (lambda c: post.dequantize(c, q.scale, 4)), post.max_index(4)
    balanced = balance_codes(rows, q.codes, values, top)
    before = np.abs(np.sum(values(q.codes).astype(np.float64) - rows, axis=1))
    after = np.abs(np.sum(values(balanced).astype(np.float64) - rows, axis=1))
    assert np.all(after <= before + 1e-6)
    assert after.mean() < before.mean() / 4
    assert set(np.unique(balanced.astype(int) - q.codes.astype(int))) <= {-1, 0, 1}


def test_quantize_weight_balances_only_when_asked() -> None:
    rng = np.random.default_rng(3)
    weight = rng.normal(0.1, 1.0, size=(16, 4, 3, 3)).astype(np.float32)
    near = quantize_weight(weight, 4, 0, SqrtMode.OFF, RangeMethod.SEARCH)
    bal = quantize_weight(weight, 4, 0, SqrtMode.OFF, RangeMethod.SEARCH, balanced=True)
    np.testing.assert_array_equal(near.scale, bal.scale)  # the same ranges, other codes
    sums = [np.abs(np.sum(to_rows(q.dequantize(), 0) - to_rows(weight, 0), axis=1)) for q in (near, bal)]
    assert np.all(sums[1] <= near.scale / 2 + 1e-6)
    assert sums[1].mean() < sums[0].mean() / 4
    reported = float(np.mean((bal.dequantize().astype(np.float64) - weight) ** 2))
    assert bal.mse == pytest.approx(reported, rel=1e-6)  # the reported error is that of the balanced codes
    post_bal = quantize_post_weight(weight, 4, 0, balanced=True)
    post_near = quantize_post_weight(weight, 4, 0)
    post_sums = [np.abs(np.sum(to_rows(q.dequantize(), 0) - to_rows(weight, 0), axis=1)).mean() for q in (post_near, post_bal)]
    assert post_sums[1] < post_sums[0] / 4


def _decoded_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    """Each Conv's weight in node order as the written model decodes it (run through onnxruntime as extra outputs)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    names = [n.input[1] for n in copy.graph.node if n.op_type == "Conv"]
    for name in names:
        copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32) for i in session.get_inputs()}
    return session.run(names, feeds)


def _row_sums(model: onnx.ModelProto, config: QuantizeConfig) -> list[np.ndarray]:
    """Per Conv of ``model`` quantized with ``config``, |sum of each row's weight errors| over its largest |weight|."""
    floats = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    decoded = _decoded_weights(quantize(model, config))
    out = []
    for node, values in zip(convs, decoded, strict=True):
        w = floats[node.input[1]].reshape(len(values), -1)
        out.append(np.abs(np.sum(values.reshape(len(w), -1) - w, axis=1)) / np.abs(w).max(axis=1))
    return out


def test_pipeline_balances_data_free_codes_below_eight_bits() -> None:
    """-b 4 without data: each row's errors sum to within half a step; 8 bits, --range absmax, --rounding nearest: nearest codes."""
    model = residual_block(seed=5, c=16)
    everything = {"first_last_bits": None}
    balanced = _row_sums(model, QuantizeConfig(bits=4, sqrt=SqrtMode.OFF, **everything))
    nearest = _row_sums(model, QuantizeConfig(bits=4, sqrt=SqrtMode.OFF, balanced_rounding=False, **everything))
    step = 1 / uniform.max_code(4)
    for b, n in zip(balanced, nearest, strict=True):
        assert np.all(b <= step / 2 + 1e-6)
        assert n.mean() > 2 * b.mean()
    for config in (QuantizeConfig(bits=8, **everything), QuantizeConfig(bits=4, range=RangeMethod.ABSMAX, sqrt=SqrtMode.OFF, **everything)):
        floats = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        for node, values in zip(convs, _decoded_weights(quantize(model, config)), strict=True):
            w = floats[node.input[1]].reshape(len(values), -1)
            top = uniform.max_code(config.bits)
            scale = np.abs(w).max(axis=1, keepdims=True) / top
            np.testing.assert_allclose(values.reshape(len(w), -1), np.clip(np.rint(w / scale), -top, top) * scale, rtol=1e-6, atol=1e-7)


def test_runs_with_data_round_the_layers_they_have_no_statistics_for_to_nearest() -> None:
    """With calibration data (here without output-aware weights, so no layer has statistics), codes are nearest ones."""
    model = residual_block(seed=6, c=16)
    data = [{"x": np.random.default_rng(7).standard_normal((4, 16, 6, 6)).astype(np.float32)}]
    config = QuantizeConfig(bits=4, sqrt=SqrtMode.OFF, first_last_bits=None, output_aware=False, fold_mean_shift=False)
    with_data = _decoded_weights(quantize(model, config, data))
    nearest = _decoded_weights(quantize(model, QuantizeConfig(bits=4, sqrt=SqrtMode.OFF, first_last_bits=None, balanced_rounding=False)))
    balanced = _decoded_weights(quantize(model, QuantizeConfig(bits=4, sqrt=SqrtMode.OFF, first_last_bits=None)))
    for got, near, bal in zip(with_data, nearest, balanced, strict=True):
        np.testing.assert_array_equal(got, near)
        assert not np.array_equal(got, bal)
