"""A scale per block of inputs (--block-size): the codes, the compensated rounding and the written model, against numpy.

The references are written out here: per block the float32 step rounded to float16, codes rounded to nearest; GPTQ by
OBQ's explicit update of H^-1 with each code's own step; the coordinate descent by trying every code; the decoded
weight as codes times the block's scale, moved back to the weight's axes by numpy, compared with what onnxruntime
computes from the written file.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS, coordinate_descent_reference, decode_matmul_nbits, obq_reference
from onnx import TensorProto, helper, numpy_helper

import models
from onnxq.analysis.inventory import inspect_model
from onnxq.cli import main
from onnxq.config import ActivationConfig, QuantizeConfig, RangeMethod, SqrtMode, WeightFormat
from onnxq.native import stats
from onnxq.numerics import output_error
from onnxq.numerics.output_error import Grid, gptq, nearest_blocks, output_errors
from onnxq.numerics.weights import QuantizedTensor, quantize_for_output, quantize_weight
from onnxq.pipeline import quantize
from onnxq.rewrite.matmul_nbits import nbits_weight
from onnxq.rewrite.qdq import replace_weights


def correlated(rng: np.random.Generator, samples: int, k: int) -> np.ndarray:
    """Inputs of a few strong sources mixed into ``k`` features, plus noise, each feature at its own scale."""
    mixed = rng.standard_normal((samples, 4)) @ rng.standard_normal((4, k)) + 0.1 * rng.standard_normal((samples, k))
    return mixed * np.exp(rng.standard_normal(k) * 0.5)


def per_block(values: np.ndarray, block: int, k: int) -> np.ndarray:
    """(R, B) values as one per code (R, k), written out with a loop over the codes."""
    out = np.empty((values.shape[0], k), dtype=values.dtype)
    for j in range(k):
        out[:, j] = values[:, j // block]
    return out


@pytest.mark.parametrize("k", [96, 45])  # 45: the last block shorter
@pytest.mark.parametrize("bits", [4, 3])
def test_data_free_blocks_against_numpy(k, bits):
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((6, k)) * np.exp(rng.standard_normal(k))).astype(np.float32)
    rows[2, 32:64] = 0.0  # a block of zeros: scale 1
    q = quantize_weight(rows, bits, 0, SqrtMode.OFF, RangeMethod.ABSMAX, balanced=False, block_size=32)
    top = 2 ** (bits - 1) - 1
    blocks = -(-k // 32)
    scale = np.ones((6, blocks), dtype=np.float32)
    for r in range(6):
        for b in range(blocks):
            peak = float(np.abs(rows[r, 32 * b : 32 * b + 32]).max())
            if peak > 0:
                scale[r, b] = np.float32(peak / top).astype(np.float16).astype(np.float32)
    steps = per_block(scale, 32, k)
    codes = np.clip(np.rint(rows / steps), -top, top)
    assert q.block_size == 32 and q.scale.shape == (6, blocks)
    np.testing.assert_array_equal(q.scale, scale)
    np.testing.assert_array_equal(q.codes, codes)
    np.testing.assert_array_equal(q.dequantize(), (codes * steps).astype(np.float32))
    assert q.scale_bytes == 2


def test_data_free_blocks_follow_the_channel_axis():
    """A MatMul weight (K, N) has its channels on axis 1: blocks run along K within each column."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((70, 5)).astype(np.float32)
    by_columns = quantize_weight(weight, 4, 1, SqrtMode.OFF, RangeMethod.ABSMAX, block_size=32)
    by_rows = quantize_weight(weight.T.copy(), 4, 0, SqrtMode.OFF, RangeMethod.ABSMAX, block_size=32)
    np.testing.assert_array_equal(by_columns.codes, by_rows.codes.T)
    np.testing.assert_array_equal(by_columns.scale, by_rows.scale)
    np.testing.assert_array_equal(by_columns.dequantize(), by_rows.dequantize().T)


def test_blocks_need_longer_rows_than_a_block():
    weight = np.random.default_rng(2).standard_normal((8, 32)).astype(np.float32)
    assert quantize_weight(weight, 4, 0, block_size=32).block_size is None  # one block a row: a scale per channel


@pytest.mark.parametrize("native", [False, True], ids=["numpy", "native"])
def test_gptq_with_a_step_per_code_equals_obq(native, monkeypatch):
    if native and not stats.gptq_available():
        pytest.skip("libonnxq_stats.so was not built with onnxq_gptq_block (pip install .)")
    monkeypatch.setattr(output_error, "NATIVE_GPTQ", native)
    rng = np.random.default_rng(3)
    x = correlated(rng, 500, 20)
    h = x.T @ x / len(x)
    rows = rng.standard_normal((5, 20))
    block_scale = (rng.random((5, 3)) * 0.3 + 0.1).astype(np.float32)
    scale = per_block(block_scale, 8, 20)
    codes = gptq(rows, h, Grid("plain", 4), scale, block=6)
    order = sorted(range(20), key=lambda j: -h[j, j])
    np.testing.assert_array_equal(codes, obq_reference(rows, output_error.damped(h), scale.astype(np.float64), 4, order))


@pytest.mark.parametrize("native", [True, False], ids=["c", "numpy"])
@pytest.mark.parametrize("mode", ["plain", "sqrt", "post"])
def test_refinement_with_blocks_equals_a_plain_descent(mode, native, monkeypatch):
    if native and not stats.descent_available():
        pytest.skip("libonnxq_stats.so with onnxq_descent_block is not built here (pip install .)")
    monkeypatch.setattr(output_error, "NATIVE_DESCENT", native)
    rng = np.random.default_rng(4)
    k, bits, block = 12, 3, 4
    x = correlated(rng, 300, k)
    h = x.T @ x / len(x)
    rows = rng.standard_normal((5, k)) * 0.2
    grid = Grid(mode, bits)
    block_scale = np.stack([grid.scales(rows[:, b * block : (b + 1) * block], np.full(5, 0.8)) for b in range(k // block)], axis=1)
    scale = per_block(block_scale, block, k)
    start = grid.round(rows, scale)[0]
    refined = output_error.refine_groups(rows[None], h[None], grid, block_scale[None], start[None], 2, block=8, block_size=block)[0]
    expected = coordinate_descent_reference(rows, h, scale, start, mode, bits, 2)
    assert not np.array_equal(expected, start)  # the descent moves codes here
    np.testing.assert_array_equal(refined, expected)


def test_blocks_leave_less_output_error_than_a_scale_per_channel():
    rng = np.random.default_rng(5)
    x = correlated(rng, 2000, 96)
    h = x.T @ x / len(x)
    weight = (rng.standard_normal((16, 96)) * np.exp(rng.standard_normal(96) * 0.7)).astype(np.float32)

    def error(q: QuantizedTensor) -> float:
        return float(output_errors(weight.astype(np.float64) - q.dequantize(), h).sum())

    channel = quantize_for_output(weight, 4, 0, ("plain", "sqrt"), h[None].copy())
    blocked = quantize_for_output(weight, 4, 0, ("plain", "sqrt"), h[None].copy(), block_size=32)
    nearest = nearest_blocks(weight.astype(np.float64), h, Grid("sqrt" if blocked.sqrt else "plain", 4), 32)
    assert blocked.block_size == 32 and blocked.scale.shape == (16, 3)
    assert error(blocked) < 0.8 * error(channel)
    assert error(blocked) <= nearest.error  # compensated and refined: never worse than each block rounded to nearest
    np.testing.assert_array_equal(blocked.scale, blocked.scale.astype(np.float16).astype(np.float32))  # float16 steps


def _decode_graph(weight_shape: tuple[int, ...], q: QuantizedTensor, dtype: type = np.float32) -> onnx.ModelProto:
    """A graph whose output is the weight W (Identity) of float type ``dtype``, W replaced by ``q``'s codes decoded at load."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph([helper.make_node("Identity", ["W"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", elem, list(weight_shape))],
                              [numpy_helper.from_array(np.zeros(weight_shape, dtype=dtype), "W")])
    replace_weights(graph, {"W": q}, at_load=True)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("shape", "axis"), [((16, 5, 3, 3), 0), ((200, 12), 1), ((12, 96), 0), ((1, 16, 40), 1), ((64, 12), 1), ((1, 64), 0)])
@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("sqrt", [False, True])
@pytest.mark.parametrize("half", [True, False])
def test_written_blocks_decode_to_the_weight(shape, axis, bits, sqrt, half):
    rng = np.random.default_rng(6)
    channels = shape[axis]
    k = int(np.prod(shape)) // channels
    blocks = -(-k // 32)
    top = 2 ** (bits - 1) - 1
    moved_codes = rng.integers(-top, top + 1, size=(channels, k)).astype(np.int8)
    scale = (rng.random((channels, blocks)) + 0.01).astype(np.float32)
    if half:
        scale = scale.astype(np.float16).astype(np.float32)
    moved_shape = (channels, *[d for i, d in enumerate(shape) if i != axis])
    codes = np.moveaxis(moved_codes.reshape(moved_shape), 0, axis)
    q = QuantizedTensor(codes=codes, scale=scale, axis=axis, bits=bits, sqrt=sqrt, alpha=np.ones((channels, blocks)), mse=0.0,
                        sqnr_db=0.0, block_size=32)
    model = _decode_graph(shape, q)
    onnx.checker.check_model(model, full_check=True)
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer) == half
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    values = moved_codes.astype(np.float32) * per_block(scale, 32, k)
    if sqrt:
        values = values * np.abs(values)
    want = np.moveaxis(values.reshape(moved_shape), 0, axis)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(q.dequantize(), want)


def test_blocks_of_a_float16_weight_decode_to_float16():
    rng = np.random.default_rng(9)
    codes = rng.integers(-7, 8, size=(8, 70)).astype(np.int8)
    scale = (rng.random((8, 3)) + 0.01).astype(np.float16).astype(np.float32)
    q = QuantizedTensor(codes=codes, scale=scale, axis=0, bits=4, sqrt=False, alpha=np.ones((8, 3)), mse=0.0, sqnr_db=0.0, block_size=32)
    got = ort.InferenceSession(_decode_graph((8, 70), q, np.float16).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, (codes.astype(np.float32) * per_block(scale, 32, 70)).astype(np.float16))


@pytest.mark.parametrize("k", [200, 64])
def test_matmul_nbits_keeps_the_blocks(k):
    rng = np.random.default_rng(7)
    n, blocks = 5, -(-k // 32)
    codes = rng.integers(-7, 8, size=(k, n)).astype(np.int8)  # x @ W: channels on axis 1
    scale = (rng.random((n, blocks)) + 0.5).astype(np.float32)
    q = QuantizedTensor(codes=codes, scale=scale, axis=1, bits=4, sqrt=False, alpha=np.ones(1), mse=0.0, sqnr_db=0.0, block_size=32)
    blob, scales, block = nbits_weight(q, factor=2.0)
    assert block == 32 and blob.shape == (n, blocks, 16)
    want = codes.T.astype(np.float32) * per_block(scale, 32, k) * np.float32(2.0)
    np.testing.assert_array_equal(decode_matmul_nbits(blob, scales, k, 4), want)


@pytest.mark.parametrize("kwargs", [dict(block_size=24), dict(block_size=8), dict(bits=8, block_size=32),
                                    dict(block_size=32, activations=ActivationConfig()), dict(block_size=32, format=WeightFormat.INT)])
def test_config_refuses_blocks_it_cannot_write(kwargs):
    with pytest.raises(ValueError, match="block"):
        QuantizeConfig(**kwargs)


def test_cli_blocks_with_data_write_a_model_that_inspect_reads(tmp_path, capsys):
    model = tmp_path / "r.onnx"
    model.write_bytes((MODELS / "fmnist_resnet20.onnx").read_bytes())
    rng = np.random.default_rng(8)
    np.save(tmp_path / "c.npy", rng.random((32, 1, 28, 28), dtype=np.float32))
    out = tmp_path / "r.b.onnx"
    assert main(["quantize", str(model), "-b", "4", "--block-size", "32", "--calibration", str(tmp_path / "c.npy"),
                 "--activations", "none", "-o", str(out), "--no-speed"]) == 0
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "block 32" in printed
    assert main(["quantize", str(model), "--block-size", "48", "-o", str(tmp_path / "bad.onnx")]) == 1
    assert not (tmp_path / "bad.onnx").exists()
    assert "block size must be a power of two" in capsys.readouterr().err


#: Test models (tests/models.py) with rows longer than 16 inputs, and the arguments that make them so.
BUILDERS = {"conv_bn_relu_gemm": {}, "conv_then_if": {}, "residual_block": {"c": 8}, "transformer_block": {"d": 32, "ff": 64},
            "streaming_lstm_in_if": {"hidden": 32}, "sliced_lstm_in_if": {"hidden": 32}, "network_in_if": {}}


def typed_feeds(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """Inputs of each graph input's own type: uniform [0, 1) floats, booleans true, integers 16000 (a sample rate); batch 2."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else 2 for d in value.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if dtype == np.bool_:
            feeds[value.name] = np.ones(dims, dtype=bool)
        elif np.issubdtype(dtype, np.integer):
            feeds[value.name] = np.full(dims, 16000, dtype=dtype)
        else:
            feeds[value.name] = rng.random(dims).astype(dtype)
    return feeds


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("data", [False, True], ids=["no-data", "data"])
def test_blocks_on_models_of_every_shape_write_models_that_run(builder, data):
    """Control flow, shared weights, LSTMs, attention: blocks of 16 wherever a row is longer, and a model that passes the
    checker, runs, and stays near the float model's output."""
    model = getattr(models, builder)(**BUILDERS[builder])
    feeds = typed_feeds(model, 0)
    calibration = [typed_feeds(model, s) for s in range(1, 9)] if data else None
    quantized = quantize(model, QuantizeConfig(bits=4, block_size=16, samples=8, first_last_bits=None), calibration)
    onnx.checker.check_model(quantized, full_check=True)
    blocked = [n for n in inspect_model(quantized).nodes if n.granularity == "block"]
    assert blocked, "no weight of this model got blocks"
    assert all(n.block_size == 16 for n in blocked)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.shape == want.shape and np.isfinite(got).all()
    assert np.linalg.norm(got - want) < 0.5 * np.linalg.norm(want)  # 4-bit weights: near, not exact


@pytest.mark.parametrize("sqrt", [False, True])
def test_short_rows_range_is_near_the_best_of_a_fine_scan(sqrt):
    """Blocks' data-free range (uniform.quantize_exact): per row within 2 % of the least weight MSE over 4000 ranges."""
    from onnxq.numerics.uniform import quantize_exact

    rng = np.random.default_rng(10)
    rows = (rng.standard_normal((40, 32)) * np.exp(rng.standard_normal((40, 1)))).astype(np.float32)
    q = quantize_exact(rows, 4, sqrt)
    got = np.sum((rows.astype(np.float64) - q.dequantize()) ** 2, axis=1)
    best = np.full(len(rows), np.inf)
    for alpha in np.linspace(0.05, 1.0, 4000):
        peak = np.abs(rows).max(axis=1).astype(np.float64)
        step = (alpha * (np.sqrt(peak) if sqrt else peak) / 7).astype(np.float32)[:, None]
        domain = np.sign(rows) * np.sqrt(np.abs(rows)) if sqrt else rows
        values = np.clip(np.rint(domain / step), -7, 7) * step
        values = values * np.abs(values) if sqrt else values
        best = np.minimum(best, np.sum((rows.astype(np.float64) - values) ** 2, axis=1))
    assert np.all(got <= best * 1.02 + 1e-12)
    assert np.all(got < np.sum((rows.astype(np.float64) - quantize_weight(rows, 4, 0, SqrtMode.ON if sqrt else SqrtMode.OFF,
                                                                           RangeMethod.ABSMAX, balanced=False).dequantize()) ** 2, axis=1) + 1e-12)
