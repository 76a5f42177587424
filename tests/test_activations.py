"""Activation quantization end to end on tiny models: placement, fusion, ASQ graphs, data sources and errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import op_counts, step_tensor
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from models import causal_mask_from_shape, conv_bn_relu_gemm, conv_then_if, depthwise_convtranspose, residual_block
from onnxq import QuantizeConfig, WeightFormat, quantize, quantize_with_report
from onnxq.calibrate.asq import Adapter, LogLinear
from onnxq.calibrate.data import calibration_batches
from onnxq.calibrate.ranges import QuantParams
from onnxq.calibrate.result import ActivationQuant
from onnxq.calibrate.samples import input_specs
from onnxq.cli import main
from onnxq.config import ActivationConfig, BiasCorrection, CalibrationMethod, ReduceRange
from onnxq.errors import OnnxqError
from onnxq.rewrite.activations import insert_activation_qdq


def _batches(shape: tuple[int, ...], count: int = 4, batch: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, *shape)).astype(np.float32)} for _ in range(count)]


def _w8a8(**kwargs) -> QuantizeConfig:
    act = ActivationConfig(
        bits=8,
        method=kwargs.pop("method", CalibrationMethod.MINMAX),
        bias_correction=kwargs.pop("bias_correction", True),
    )
    return QuantizeConfig(bits=8, first_last_bits=8, activations=act, reduce_range=kwargs.pop("reduce_range", ReduceRange.OFF), **kwargs)


def _quantized_tensors(model: onnx.ModelProto) -> set[str]:
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


def _optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return op_counts(onnx.load(options.optimized_model_filepath))


def test_placement_quantizes_layer_inputs_after_relu_and_keeps_graph_output_float():
    q = quantize(residual_block(), _w8a8(), _batches((4, 6, 6)))
    quantized = _quantized_tensors(q)
    # conv1's input x (also the Add's), relu1's output (conv2's input), conv2's output (the Add's),
    # relu2's output (the pool's; the Add's own output only feeds the Relu), the pool's output, Flatten's output.
    # The Relus are folded into the quantization (its range starts at 0), so their inputs are what gets quantized.
    assert quantized == {"x", "c1", "c2", "s", "p", "f"}
    assert op_counts(q)["Relu"] == 0 and "y" not in quantized


def test_attention_mask_built_from_the_scores_shape_stays_float():
    """A causal mask computed from Shape(scores) holds -inf: it is not a layer's output, so its Add stays float."""
    model = causal_mask_from_shape()
    # (--reduce-range auto: full 8-bit weights saturate onnxruntime's pair sums on CPUs without VNNI, 11 % RMS error here
    # under tools/avx2_only.py, which is what auto avoids)
    q = quantize(model, _w8a8(reduce_range=ReduceRange.AUTO), _batches((6, 8)))
    quantized = _quantized_tensors(q)
    assert "mask" not in quantized and "s" not in quantized and {"x", "a"} <= quantized
    x = _batches((6, 8), count=1, seed=2)[0]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.sqrt(np.mean((got - ref) ** 2)) < 0.05 * np.sqrt(np.mean(ref**2))


def test_w8a8_fuses_into_onnxruntime_integer_kernels(tmp_path):
    q = quantize(residual_block(), _w8a8(), _batches((4, 6, 6)))
    ops = _optimized_ops(q, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1 and ops["QGemm"] == 1, ops
    assert ops["Conv"] == 0 and ops["Gemm"] == 0


def test_w4a8_int4_weights_fuse_into_onnxruntime_integer_kernels_too(tmp_path):
    """int4 codes are widened to int8 by a Cast that onnxruntime folds before it fuses: the optimized graph has the same
    integer kernels as W8A8 and no weight decoding left, while the file stores int4 codes."""
    q = quantize(residual_block(c=16), QuantizeConfig(bits=4, first_last_bits=None, activations=ActivationConfig()), _batches((16, 6, 6)))
    inits = {t.name: t for t in q.graph.initializer}
    widened = [n.input[0] for n in q.graph.node if n.op_type == "Cast"]
    assert len(widened) == 3 and {inits[name].data_type for name in widened} == {onnx.TensorProto.INT4}  # the three weights' codes
    ops = _optimized_ops(q, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1 and ops["QGemm"] == 1, ops
    assert ops["Conv"] == ops["Gemm"] == ops["DequantizeLinear"] == ops["Cast"] == 0, ops
    x = _batches((16, 6, 6), count=1, seed=2)[0]
    ref = ort.InferenceSession(residual_block(c=16).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.sqrt(np.mean((got - ref) ** 2)) < 0.2 * np.sqrt(np.mean(ref**2))


def test_w8a8_output_is_close_to_float(tmp_path):
    model = conv_bn_relu_gemm()
    data = _batches((3, 8, 8), seed=1)
    q = quantize(model, _w8a8(method=CalibrationMethod.MSE), data)
    x = _batches((3, 8, 8), count=1, seed=2)[0]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.sqrt(np.mean((got - ref) ** 2)) < 0.05 * np.sqrt(np.mean(ref**2))


def test_biases_become_int32_with_the_product_scale():
    q = quantize(residual_block(), _w8a8(bias_correction=False), _batches((4, 6, 6)))
    inits = {t.name: t for t in q.graph.initializer}
    int32 = {name for name, t in inits.items() if t.data_type == onnx.TensorProto.INT32}
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int32]
    assert len(dq) == 3  # conv1, conv2, fc
    float_b1 = numpy_helper.to_array(next(t for t in residual_block().graph.initializer if t.name == "b1"))
    conv1_bias = next(n for n in dq if n.input[0].startswith("b1"))
    codes, scale = numpy_helper.to_array(inits[conv1_bias.input[0]]), numpy_helper.to_array(inits[conv1_bias.input[1]])
    np.testing.assert_array_less(np.abs(codes * scale - float_b1), scale / 2 + 1e-12)


def test_reduce_range_on_keeps_8_bit_weights_within_7_bits():
    q = quantize(residual_block(), _w8a8(reduce_range=ReduceRange.ON), _batches((4, 6, 6)))
    codes = [numpy_helper.to_array(t) for t in q.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.dims and np.prod(t.dims) > 4]
    assert codes and max(int(np.abs(c).max()) for c in codes) <= 63
    off = quantize(residual_block(), _w8a8(reduce_range=ReduceRange.OFF), _batches((4, 6, 6)))
    assert max(int(np.abs(numpy_helper.to_array(t)).max()) for t in off.graph.initializer if t.data_type == onnx.TensorProto.INT8) == 127


def test_w4a4_runs_with_uint4_activations():
    config = QuantizeConfig(bits=4, first_last_bits=None, activations=ActivationConfig(bits=4, method=CalibrationMethod.MSE))
    q = quantize(conv_bn_relu_gemm(), config, _batches((3, 8, 8)))
    inits = {t.name: t for t in q.graph.initializer}
    zp_types = {inits[n.input[2]].data_type for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert onnx.TensorProto.UINT4 in zp_types
    x = _batches((3, 8, 8), count=1)[0]
    out = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.isfinite(out).all()
    ref = ort.InferenceSession(conv_bn_relu_gemm().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.15  # (measured 0.048)


def test_w4a4_gives_an_int8_weight_layer_8_bit_inputs_so_onnxruntime_loads_it():
    """The depthwise conv keeps 8-bit weights (depthwise_bits): onnxruntime fuses its input pair with the int8 weight's
    into QLinearConv, which takes no uint4, so that input is uint8; the 4-bit ConvTranspose still reads uint4 codes."""
    config = QuantizeConfig(bits=4, first_last_bits=None, activations=ActivationConfig(bits=4, method=CalibrationMethod.MINMAX))
    q = quantize(depthwise_convtranspose(), config, _batches((4, 6, 6)))
    inits = {t.name: t for t in q.graph.initializer}
    zero_point_type = {n.input[0]: inits[n.input[2]].data_type for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert zero_point_type == {"x": onnx.TensorProto.UINT8, "d": onnx.TensorProto.UINT4}  # the Relu folded into the pair
    x = _batches((4, 6, 6), count=1)[0]
    # loaded with onnxruntime's graph optimizations, which refused the model with a uint4 input there
    out = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    ref = ort.InferenceSession(depthwise_convtranspose().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.15


def _asq_model(quant: ActivationQuant, opset: int) -> onnx.ModelProto:
    """x -> [ASQ quantize-dequantize] -> Identity -> y, with the per-sample, per-channel steps as a second output."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "asq",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    insert_activation_qdq(model, {"x": quant}, opset)
    steps = step_tensor(model)
    model.graph.output.append(helper.make_tensor_value_info(steps, onnx.TensorProto.FLOAT, ["N", 3]))
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("bits,opset", [(8, 17), (4, 21)])
def test_asq_graph_equals_numpy_fake_quantization_with_per_sample_per_channel_steps(bits, opset):
    rng = np.random.default_rng(10)
    adapter = Adapter(LogLinear(rng.standard_normal(3) * 0.3, 0.0 if bits == 8 else 2.0), np.array([0.05, 0.1, 0.2]))
    zero_points = np.array([0, 3, 7])
    quant = ActivationQuant("x", QuantParams(0.1, 0, bits), adapter, (2, 3), zero_points, 1, 4)
    model = _asq_model(quant, opset)
    x = (rng.standard_normal((5, 3, 4, 4)) * np.array([0.5, 1, 2, 4, 8])[:, None, None, None]).astype(np.float32)
    y, steps = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    features = x.mean(axis=(2, 3), dtype=np.float64)
    np.testing.assert_allclose(steps, adapter.predict(features), rtol=1e-5)
    r = steps.astype(np.float32)[:, :, None, None]
    z = zero_points[None, :, None, None]
    expected = ((np.clip(np.rint(x / r) + z, 0, (1 << bits) - 1) - z) * r).astype(np.float32)
    np.testing.assert_array_equal(y, expected)
    assert len(set(steps[:, 0].tolist())) == 5  # one step per sample


def test_asq_steps_stay_finite_and_positive_far_outside_the_calibration_data():
    """The adapter's log factor is clipped to its bias +- LOG_STEP_MARGIN, in the graph as in numpy."""
    adapter = Adapter(LogLinear(np.full(3, 50.0), 0.0), np.array([0.05, 0.1, 0.2]))
    quant = ActivationQuant("x", QuantParams(0.1, 0, 8), adapter, (2, 3), np.array([0, 3, 7]), 1, 4)
    model = _asq_model(quant, 17)
    x = np.stack([np.full((3, 4, 4), v, np.float32) for v in (1e6, -1e6, 0.0)])
    y, steps = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    lo, hi = adapter.log_factor_bounds()
    assert np.isfinite(steps).all() and (steps > 0).all() and np.isfinite(y).all()
    np.testing.assert_allclose(steps[0], np.exp(np.float32(hi)) * adapter.channel_steps, rtol=1e-5)  # e^(50 * 3e6) clipped from above
    np.testing.assert_allclose(steps[1], np.exp(np.float32(lo)) * adapter.channel_steps, rtol=1e-5)  # and from below
    np.testing.assert_allclose(steps, adapter.predict(x.mean(axis=(2, 3), dtype=np.float64)), rtol=1e-5)


def _gained_batches(count: int = 8, batch: int = 8) -> list[dict[str, np.ndarray]]:
    """Positive inputs whose scale varies 100-fold between samples (their channel means tell it): what ASQ's per-sample factor is for."""
    rng = np.random.default_rng(3)
    gains = np.geomspace(0.1, 10.0, count * batch).astype(np.float32)
    rng.shuffle(gains)
    x = np.abs(rng.standard_normal((count * batch, 3, 8, 8))).astype(np.float32) * gains[:, None, None, None]
    return [{"x": x[i * batch : (i + 1) * batch]} for i in range(count)]


def test_asq_model_from_quantize_runs_at_any_batch_size():
    config = QuantizeConfig(bits=4, activations=ActivationConfig(bits=4, method=CalibrationMethod.ASQ))
    q = quantize(conv_bn_relu_gemm(c=32), config, _gained_batches())
    assert op_counts(q)["Exp"] >= 1  # at least one adapter computes its steps in the graph
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        assert sess.run(None, {"x": np.ones((n, 3, 8, 8), np.float32)})[0].shape == (n, 10)
    # Each sample gets its own steps: a batch of samples 100x apart in scale gives what each gives alone (up to float
    # summation order; measured 2e-7 of the largest output).
    x = _gained_batches(count=1, batch=3)[0]["x"]
    batched = sess.run(None, {"x": x})[0]
    alone = np.concatenate([sess.run(None, {"x": x[i : i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_asq_adds_weights_linear_in_the_channels():
    """An adapter is a one-output Gemm and C channel steps (it was a dense C x C Gemm: 5.6x MobileNetV2's size)."""
    config = QuantizeConfig(bits=4, activations=ActivationConfig(bits=4, method=CalibrationMethod.ASQ))
    q = quantize(conv_bn_relu_gemm(c=32), config, _gained_batches())
    sizes = [int(np.prod(t.dims)) for t in q.graph.initializer if "_asq_" in t.name]
    assert op_counts(q)["Exp"] >= 1 and sizes and max(sizes) <= 32


def test_a_weight_first_matmul_quantizes_its_second_input():
    """W @ x (x: [N, 32, 5]): the activation site is input 1, and W8A8 stays close to float."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in (("w", (64, 32)), ("w2", (8, 64)))]
    nodes = [
        helper.make_node("MatMul", ["w", "x"], ["h"], name="w_first"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["w2", "r"], ["y"], name="w2_first"),
    ]
    value = helper.make_tensor_value_info
    io = ([value("x", onnx.TensorProto.FLOAT, ["N", 32, 5])], [value("y", onnx.TensorProto.FLOAT, ["N", 8, 5])])
    graph = helper.make_graph(nodes, "g", *io, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = [{"x": rng.standard_normal((8, 32, 5)).astype(np.float32)} for _ in range(4)]
    result = quantize_with_report(model, _w8a8(), data)
    assert [a.tensor for a in result.activations] == ["x", "r"]
    (y,) = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data[0])
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data[0])
    assert np.linalg.norm(y - want) / np.linalg.norm(want) < 0.03


def test_collecting_no_tensors_runs_nothing_and_passes_the_batches_through():
    from onnxq.calibrate.collect import collect

    seen = []
    batches = ({"x": np.zeros((2, 3, 8, 8), np.float32)} for _ in range(3))
    assert collect(conv_bn_relu_gemm(), [], (seen.append(b) or b for b in batches)) == {}
    assert len(seen) == 3


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.items = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def test_an_onnxruntime_calibration_data_reader_gives_the_same_model_as_a_list():
    data = _batches((3, 8, 8), count=3)
    from_list = quantize(conv_bn_relu_gemm(), _w8a8(), data)
    from_reader = quantize(conv_bn_relu_gemm(), _w8a8(), _Reader(data))
    assert from_list.SerializeToString() == from_reader.SerializeToString()


@pytest.mark.parametrize("method", [CalibrationMethod.MSE, CalibrationMethod.ASQ])
def test_a_rank_0_input_goes_whole_with_every_batch(method):
    """An If's condition (rank 0) has no sample axis: batches are counted, cut and kept by the batched inputs alone."""
    rng = np.random.default_rng(2)
    data = [{"x": rng.standard_normal((3, 3, 8, 8)).astype(np.float32), "cond": np.array(i % 2 == 0)} for i in range(4)]
    act = ActivationConfig(bits=8, method=method, samples=7, bias_correction=BiasCorrection.MEASURED)
    q = quantize(conv_then_if(), QuantizeConfig(bits=4, first_last_bits=4, activations=act), data)
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    for cond in (True, False):
        (y,) = sess.run(None, {"x": data[0]["x"][:1], "cond": np.array(cond)})
        assert y.shape == (1, 8, 8, 8) and np.isfinite(y).all()
    assert "QuantizeLinear" in op_counts(q)


def test_calibration_size_caps_the_samples_used():
    data = _batches((3, 8, 8), count=4, batch=8)
    capped = ActivationConfig(bits=8, method=CalibrationMethod.MINMAX, samples=8)
    first_only = quantize(conv_bn_relu_gemm(), QuantizeConfig(bits=8, activations=capped), data)
    same = quantize(conv_bn_relu_gemm(), QuantizeConfig(bits=8, activations=capped), data[:1])
    assert first_only.SerializeToString() == same.SerializeToString()


def test_npy_npz_and_image_folder_sources(tmp_path):
    """The same images as an .npy, an .npz, a Python list and a folder of PNG files: the same quantized model.

    A PNG holds 8-bit pixels and the folder reader scales them to [0, 1] (pixel / 255 in float32), so the arrays hold
    exactly those values; the PNGs are written at the model's 8x8, which the reader takes as they are (no resize).
    """
    from PIL import Image as pil

    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
    pixels[0, :, 0, 0], pixels[1, :, 0, 0] = 0, 255  # both ends of the range
    images = pixels.astype(np.float32) / np.float32(255)
    np.save(tmp_path / "c.npy", images)
    np.savez(tmp_path / "c.npz", x=images)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(pixels):
        pil.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:02d}.png")  # file-name order = array order
    (batch,) = calibration_batches(folder, input_specs(conv_bn_relu_gemm()), None)
    np.testing.assert_array_equal(batch["x"], images)  # RGB as channels 0, 1, 2; rows and columns kept
    models = [quantize(conv_bn_relu_gemm(), _w8a8(), source).SerializeToString() for source in (tmp_path / "c.npy", tmp_path / "c.npz", folder)]
    assert models[0] == models[1] == models[2] == quantize(conv_bn_relu_gemm(), _w8a8(), [{"x": images}]).SerializeToString()


def test_image_folder_resizes_to_the_model_input(tmp_path):
    """Images of other sizes are resized (bilinear) to the model's 8x8: a one-colour image stays that colour exactly,
    so a folder of one-colour 16x16 and 5x7 PNGs calibrates like an .npy of the same colours at 8x8. (Images with
    detail would not: shrinking blurs neighbouring pixels together, which no array written here could restate.)"""
    from PIL import Image as pil

    rng = np.random.default_rng(12)
    colours = rng.integers(0, 256, (6, 3), dtype=np.uint8)
    colours[0], colours[1] = 0, 255
    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate(colours):
        size = (16, 16) if i % 2 else (7, 5)  # (width, height): shrunk, or enlarged and not square
        pil.new("RGB", size, tuple(int(c) for c in colour)).save(folder / f"{i:02d}.png")
    images = np.broadcast_to((colours.astype(np.float32) / np.float32(255))[:, :, None, None], (6, 3, 8, 8)).copy()
    np.save(tmp_path / "c.npy", images)
    (batch,) = calibration_batches(folder, input_specs(conv_bn_relu_gemm()), None)
    np.testing.assert_array_equal(batch["x"], images)
    from_folder, from_npy = (quantize(conv_bn_relu_gemm(), _w8a8(), source).SerializeToString() for source in (folder, tmp_path / "c.npy"))
    assert from_folder == from_npy


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: np.save(p / "bad.npy", np.zeros((4, 3, 9, 9), np.float32)) or p / "bad.npy", "has shape"),
        (lambda p: np.save(p / "bad.npy", np.zeros((4, 3, 8, 8), np.int32)) or p / "bad.npy", "is int32"),
        (lambda p: np.savez(p / "bad.npz", a=np.zeros((4, 3, 8, 8), np.float32), b=np.zeros(1)) or p / "bad.npz", "no array for model input"),
        (lambda p: (p / "bad.txt").write_text("1 2 3") and p / "bad.txt", ".npy or .npz"),
        (lambda p: p / "missing.npy", "no such file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no images"),
    ],
)
def test_bad_calibration_data_is_one_clear_line_and_writes_nothing(tmp_path, capsys, make, message):
    model_path = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_gemm(), model_path)
    before = model_path.read_bytes()
    data = make(tmp_path)
    listing = sorted(p.name for p in tmp_path.iterdir())
    assert main(["quantize", str(model_path), "-b", "8", "--calibration", str(data)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxq: error:") and message in err[0] and Path(data).name in err[0]
    assert model_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


@pytest.mark.parametrize("option", [["--calibrate", "asq"], ["--bias-correction", "measured"], ["--percentile", "99.9"]])
def test_activation_options_without_calibration_are_refused(tmp_path, capsys, option):
    model_path = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_gemm(), model_path)
    assert main(["quantize", str(model_path), *option]) == 1
    assert f"{option[0]} needs --calibration" in capsys.readouterr().err
    assert not (tmp_path / "m.q4.onnx").exists()


def test_cli_bias_correction_option_reaches_the_config(tmp_path):
    """--bias-correction off gives the model of ActivationConfig(bias_correction=OFF), analytic that of ANALYTIC."""
    model_path = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_gemm(), model_path)
    data = tmp_path / "calib.npy"
    np.save(data, np.concatenate([b["x"] for b in _batches((3, 8, 8), count=2)]))
    for mode in (BiasCorrection.OFF, BiasCorrection.ANALYTIC):
        out = tmp_path / f"{mode.value}.onnx"
        args = ["quantize", str(model_path), "-b", "8", "--calibration", str(data), "--calibrate", "minmax", "--reduce-range", "off"]
        assert main([*args, "--bias-correction", mode.value, "-o", str(out)]) == 0
        act = ActivationConfig(method=CalibrationMethod.MINMAX, bias_correction=mode)
        want = quantize(model_path, QuantizeConfig(bits=8, activations=act, reduce_range=ReduceRange.OFF), data)
        got = onnx.load(str(out))
        assert {t.name: t.SerializeToString() for t in got.graph.initializer} == {t.name: t.SerializeToString() for t in want.graph.initializer}


def test_cli_writes_a_w8a8_model_that_runs(tmp_path, capsys):
    model_path = tmp_path / "m.onnx"
    onnx.save(residual_block(), model_path)
    np.save(tmp_path / "c.npy", np.random.default_rng(12).standard_normal((16, 4, 6, 6)).astype(np.float32))
    assert main(["quantize", str(model_path), "-b", "8", "--calibration", str(tmp_path / "c.npy")]) == 0
    out = tmp_path / "m.w8a8.onnx"
    assert "activation tensors" in capsys.readouterr().out
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones((2, 4, 6, 6), np.float32)})[0].shape == (2, 5)
    # the file holds the model the API gives for -b 8 with that data (the other options at their defaults)
    want = quantize(model_path, QuantizeConfig(bits=8, activations=ActivationConfig()), tmp_path / "c.npy")
    assert onnx.load(out).SerializeToString() == want.SerializeToString()


def test_api_without_calibration_data_says_so():
    with pytest.raises(OnnxqError, match="needs calibration data"):
        quantize(conv_bn_relu_gemm(), _w8a8())


def _conv_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """8-bit IntConv nodes with x_scale/x_zero_point replaced by QuantizeLinear -> DequantizeLinear -> Conv on the decoded weights."""
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    inits = {t.name: numpy_helper.to_array(t) for t in ref.graph.initializer}
    nodes = []
    for node in ref.graph.node:
        if node.op_type != "IntConv":
            nodes.append(node)
            continue
        x, packed, scale, bias, x_scale, x_zero = node.input
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in ("strides", "pads", "dilations", "group")}
        kh, kw = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "kernel_shape")
        codes = inits[packed].view(np.int8).astype(np.float32)
        weight = (codes * inits[scale][:, None]).reshape(len(codes), -1, kh, kw)
        ref.graph.initializer.append(numpy_helper.from_array(weight, f"{node.name}_w"))
        nodes += [
            helper.make_node("QuantizeLinear", [x, x_scale, x_zero], [f"{node.name}_xq"]),
            helper.make_node("DequantizeLinear", [f"{node.name}_xq", x_scale, x_zero], [f"{node.name}_xdq"]),
            helper.make_node("Conv", [f"{node.name}_xdq", f"{node.name}_w", bias], list(node.output), **attrs),
        ]
    del ref.graph.node[:]
    ref.graph.node.extend(nodes)
    return ref


@pytest.mark.parametrize("fmt", [WeightFormat.INT, WeightFormat.POST])
def test_integer_ops_take_the_calibrated_input_scale(fmt):
    """IntConv/PostConv quantize their input with the pair's fixed scale instead of a DequantizeLinear'd float copy."""
    act = ActivationConfig(bits=8, method=CalibrationMethod.MSE)
    q = quantize(conv_bn_relu_gemm(c=16), QuantizeConfig(bits=4, format=fmt, first_last_bits=None, activations=act), _batches((3, 8, 8)))
    custom = [n for n in q.graph.node if n.domain == "ai.onnxq"]
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    assert len(custom) == 2 and all(len(n.input) >= 6 and n.input[4] and producers.get(n.input[0]) != "DequantizeLinear" for n in custom)
    assert custom[1].input[0] == custom[0].output[0]  # the first writes the second's uint8 input (onnxq/rewrite/chains.py)


def test_an_8_bit_intconv_with_input_scale_equals_quantize_dequantize_then_conv(monkeypatch):
    """Each IntConv quantizes its float input with the given step (the uint8 chains are left out here; tests/test_chains.py)."""
    import onnxq.pipeline
    from onnxq.native.session import session

    monkeypatch.setattr(onnxq.pipeline, "link_chains", lambda graph: None)
    act = ActivationConfig(bits=8, method=CalibrationMethod.MSE)
    config = QuantizeConfig(bits=8, format=WeightFormat.INT, first_last_bits=None, activations=act, reduce_range=ReduceRange.OFF)
    q = quantize(conv_bn_relu_gemm(c=16), config, _batches((3, 8, 8)))
    assert op_counts(q)["IntConv"] == 2
    x = _batches((3, 8, 8), count=1, seed=4)[0]
    got = session(q.SerializeToString()).run(None, x)[0]
    literal = ort.SessionOptions()  # onnxruntime's optimizer may drop a Q/DQ pair before a float Conv; the reference must not
    literal.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected = ort.InferenceSession(_conv_reference(q).SerializeToString(), literal, providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_asq_keeps_the_per_sample_factor_only_where_held_out_error_drops():
    """Samples are one pattern times a known gain: an adapter that follows the gain must win over fixed steps,
    and one that moves the wrong way must lose."""
    from onnxq.calibrate.activations import asq_error, choose_adapters

    rng = np.random.default_rng(13)
    pattern = np.abs(rng.standard_normal((1, 3, 4, 4)))
    gains = np.geomspace(0.2, 5.0, 16)
    held = [{"x": (gains[:, None, None, None] * pattern).astype(np.float32)}]
    means = pattern.mean(axis=(2, 3))[0]  # channel means of the pattern; a sample's are gain * these
    base = pattern.reshape(3, -1).max(axis=1) / 15
    # log gain is not linear in the channel means, but increasing in them: a linear fit in log-space on these samples
    features = gains[:, None] * means[None]
    slope, intercept = np.polyfit(features[:, 0], np.log(gains), 1)
    follows = Adapter(LogLinear(np.array([slope, 0.0, 0.0]), intercept), base)
    wrong = Adapter(LogLinear(-follows.per_sample.weight, 0.0), base)
    fixed = Adapter(LogLinear(np.zeros(3), 0.0), base)
    zeros = np.zeros(3, dtype=np.int64)
    make = lambda a: ActivationQuant("x", QuantParams(1.0, 0, 4), a, (2, 3), zeros, 1, 4)  # noqa: E731
    model = helper.make_model(
        helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    assert asq_error(held[0]["x"], make(follows)) < asq_error(held[0]["x"], make(fixed))
    assert choose_adapters(model, {"x": (make(follows), make(fixed))}, held)["x"].adapter is follows
    assert choose_adapters(model, {"x": (make(wrong), make(fixed))}, held)["x"].adapter is fixed
