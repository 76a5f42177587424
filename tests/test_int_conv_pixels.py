"""IntConv's per-pixel steps (attribute x_steps="pixel", csrc/kernels/int_conv.h): every kernel equals numpy bit for bit.

Each input pixel (n, :, h, w) is quantized with its own DynamicQuantizeLinear step and zero point from its C values,
and its output pixel uses them: for a Gemm written as a 1x1 convolution (onnxq/rewrite/gemm.py) that is a per-token
dynamic quantization. The numpy model (tests/conv_ops.py, pixel_reference) is written from the definition,
independently of the C++ code. Each test runs once per kernel, forced with the ``kernel`` attribute; a kernel the CPU
lacks is a skip that names what is missing.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import KERNELS, kernel_params
from conv_ops import Case, conv_model, pack, pixel_reference, pixel_steps, raises_at_run
from onnx import TensorProto, helper, numpy_helper

from onnxq.native.domain import DOMAIN
from onnxq.native.session import session


def _data(n: int, c: int, hw: tuple[int, int], m: int, bits: int, seed: int, bias: bool = True):
    """X with rows of very different ranges (per-pixel steps differ), full-range codes, scales and bias."""
    rng = np.random.default_rng(seed)
    spread = np.exp(rng.uniform(-4, 3, (n, 1, *hw))).astype(np.float32)
    x = (rng.standard_normal((n, c, *hw)) * spread + rng.uniform(-1, 1, (n, 1, *hw)) * spread).astype(np.float32)
    limit = 2 ** (bits - 1) - 1
    codes = rng.integers(-limit - 1, limit + 1, (m, c)).astype(np.int8)
    scale = rng.uniform(0.01, 0.2, m).astype(np.float32)
    return x, codes, scale, rng.standard_normal(m).astype(np.float32) if bias else None


def _run(x, codes, scale, bias, bits: int, kernel: str, op: str = "IntConv", **extra) -> np.ndarray:
    case = Case(op, bits, x.shape[0], x.shape[1], x.shape[2:], codes.shape[0], (1, 1), bias=bias is not None)
    model = conv_model(case, pack(codes, bits), scale, bias, None, None, kernel=KERNELS[kernel], x_steps="pixel", **extra)
    (y,) = session(model).run(None, {"X": x})
    return y


SHAPES = [  # (rows, K, M): rows are the pixels of one image along H, as the Gemm rewrite lays them out
    (1, 64, 5),
    (3, 7, 384),
    (17, 300, 5),
    (64, 64, 384),
    (100, 300, 1),
    (100, 1, 5),
    (17, 64, 384),
    (64, 7, 1),
    (3, 1, 384),
]


@pytest.mark.parametrize("kernel", kernel_params())
@pytest.mark.parametrize(("rows", "k", "m"), SHAPES, ids=[f"rows{r}-k{k}-m{m}" for r, k, m in SHAPES])
def test_pixel_steps_equal_numpy_bit_for_bit(rows, k, m, kernel):
    bits = 4 if m != 384 else 8
    x, codes, scale, bias = _data(1, k, (rows, 1), m, bits, seed=rows * 1000 + k + m)
    want = pixel_reference(x, codes, scale, bias)
    np.testing.assert_array_equal(_run(x, codes, scale, bias, bits, kernel), want, err_msg=kernel)


@pytest.mark.parametrize("kernel", kernel_params())
@pytest.mark.parametrize(("n", "hw", "m"), [(2, (9, 11), 24), (3, (2, 3), 384)])
def test_pixel_steps_over_a_batch_of_images_without_bias(n, hw, m, kernel):
    """N images of H x W pixels, each pixel its own step, no B: 99 pixels (Gemm, more than one panel of 64) and 6
    (GemmT, each image's pixels from its own offset)."""
    x, codes, scale, _ = _data(n, 40, hw, m, 4, seed=5, bias=False)
    np.testing.assert_array_equal(_run(x, codes, scale, None, 4, kernel), pixel_reference(x, codes, scale, None), err_msg=kernel)


@pytest.mark.parametrize("kernel", kernel_params())
def test_zero_huge_and_nan_pixels(kernel):
    """A row of zeros (step 1, zero point 0), a row with one huge value (its other values quantize to z), a row of
    large negatives (zero point 255), NaN values (skipped by the range, quantized to 0) and an all-NaN row."""
    x, codes, scale, bias = _data(1, 64, (8, 1), 16, 4, seed=11)
    x[0, :, 0, 0] = 0
    x[0, 5, 1, 0] = 3e37
    x[0, :, 2, 0] = -np.abs(x[0, :, 2, 0]) - 1000
    x[0, 3, 3, 0] = x[0, 60, 3, 0] = np.nan
    x[0, :, 4, 0] = np.nan
    x[0, 7, 5, 0] = -0.0
    y = _run(x, codes, scale, bias, 4, kernel)
    np.testing.assert_array_equal(y, pixel_reference(x, codes, scale, bias), err_msg=kernel)
    assert np.isfinite(y).all()


@pytest.mark.parametrize("kernel", kernel_params())
@pytest.mark.parametrize(("pixels", "m"), [(70, 20), (9, 384), (5, 48)])
def test_pixel_steps_with_clip_and_uint8_y(pixels, m, kernel):
    """IntConvQ: the per-pixel y, clipped (a fused Relu), then quantized to uint8 as QuantizeLinear does (the output
    step after the SIMD kernels' per-pixel epilogue: Gemm's at 70 pixels, GemmT's at 9 and 5)."""
    x, codes, scale, bias = _data(1, 48, (pixels, 1), m, 4, seed=13)
    y_scale, y_zero_point = np.float32(0.05), np.uint8(20)
    case = Case("IntConvQ", 4, 1, 48, (pixels, 1), m, (1, 1))
    model = conv_model(case, pack(codes, 4), scale, bias, None, None, kernel=KERNELS[kernel], x_steps="pixel", clip_min=0.0)
    model = _with_y_quantization(model, y_scale, y_zero_point)
    (y,) = session(model).run(None, {"X": x})
    want = np.maximum(pixel_reference(x, codes, scale, bias), np.float32(0))
    want = np.clip(np.rint(want / y_scale) + int(y_zero_point), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(y, want, err_msg=kernel)


def _with_y_quantization(model: bytes, y_scale: np.float32, y_zero_point: np.uint8) -> bytes:
    """The model's op with inputs 6, 7 (y_scale, y_zero_point) and a uint8 Y."""
    proto = onnx.load_from_string(model)
    node = proto.graph.node[0]
    node.input.extend([""] * (6 - len(node.input)) + ["y_scale", "y_zero_point"])
    proto.graph.initializer.extend([numpy_helper.from_array(y_scale, "y_scale"), numpy_helper.from_array(y_zero_point, "y_zero_point")])
    proto.graph.output[0].type.tensor_type.elem_type = TensorProto.UINT8
    return proto.SerializeToString()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), r"x_steps=\"pixel\" needs a 1x1 kernel, strides 1, no pads and group 1"),
        (dict(strides=[2, 1]), r"needs a 1x1 kernel, strides 1"),
        (dict(pads=[0, 0, 1, 0]), r"needs a 1x1 kernel"),
        (dict(group=2), r"needs a 1x1 kernel"),
        (dict(op="PostConv"), r"x_steps=\"pixel\" is IntConv's and IntConvQ's only"),
        (dict(x_steps="row"), r"attribute x_steps must be \"tensor\" or \"pixel\", not \"row\""),
    ],
)
def test_bad_pixel_attributes_are_session_errors(extra, match):
    """Per-pixel steps need each output pixel to read one input pixel (1x1, strides 1, no pads, group 1), and IntConv."""
    extra = dict(extra)
    op = extra.pop("op", "IntConv")
    _, _, scale, bias = _data(1, 8, (5, 1), 4, 4, seed=1)
    case = Case(op, 4, 1, 8, (5, 1), 4, tuple(extra.pop("kernel_shape", [1, 1])), group=extra.get("group", 1), bias=True)
    attributes = {"x_steps": "pixel", **extra}
    codes = np.zeros((4, case.k), np.int8)
    model = conv_model(case, pack(codes, 4), scale, bias, None, None, **attributes)
    with pytest.raises(Exception, match=match):
        session(model)


def test_pixel_steps_with_x_scale_or_uint8_x_are_errors():
    """Per-pixel steps are the op's own dynamic quantization: a given step, or X quantized already, contradicts them."""
    x, codes, scale, bias = _data(1, 8, (5, 1), 4, 4, seed=2)
    case = Case("IntConv", 4, 1, 8, (5, 1), 4, (1, 1))
    model = conv_model(case, pack(codes, 4), scale, bias, np.float32(0.1), np.uint8(3), x_steps="pixel")
    raises_at_run(model, x, r"x_steps=\"pixel\" computes each pixel's step itself: inputs x_scale and x_zero_point must be absent")
    node = helper.make_node("IntConv", ["X", "W", "scale", "", "s", "z"], ["Y"], domain=DOMAIN, bits=4, kernel_shape=[1, 1], x_steps="pixel")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.UINT8, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(pack(codes, 4), "W"), numpy_helper.from_array(scale, "scale"),
         numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(3), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    with pytest.raises(Exception, match=r"X is uint8, but x_steps=\"pixel\" quantizes a float X itself"):
        session(model.SerializeToString()).run(None, {"X": np.zeros((1, 8, 5, 1), np.uint8)})


def test_tensor_steps_are_the_default():
    """x_steps="tensor" gives what no attribute gives (one step over X)."""
    x, codes, scale, bias = _data(1, 32, (20, 1), 8, 4, seed=3)
    case = Case("IntConv", 4, 1, 32, (20, 1), 8, (1, 1))
    (a,) = session(conv_model(case, pack(codes, 4), scale, bias, None, None)).run(None, {"X": x})
    (b,) = session(conv_model(case, pack(codes, 4), scale, bias, None, None, x_steps="tensor")).run(None, {"X": x})
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, pixel_reference(x, codes, scale, bias))


@pytest.mark.parametrize("kernel", kernel_params())
def test_values_at_and_near_ties_and_extreme_steps(kernel):
    """The SIMD kernels quantize X with x * (1/s_x) on a fixed-point grid and divide only near ties (and where 1/s_x
    is out of range): values at k + 1/2 steps and one float either side in every pixel, pixels of tiny (step below
    2^-100) and huge (above 2^100) ranges, and a -0: every kernel gives QuantizeOne's codes."""
    rng = np.random.default_rng(21)
    pixels, c = 48, 64
    x = np.empty((1, c, pixels, 1), np.float32)
    for p in range(pixels):
        lo, hi = np.float32(-rng.uniform(0.1, 3)), np.float32(rng.uniform(0.1, 3))
        row = np.concatenate([[lo, hi], rng.uniform(lo, hi, c - 2)]).astype(np.float32)
        s, _ = pixel_steps(row[None, :, None, None])
        ties = ((rng.integers(-100, 100, c - 2) + np.float32(0.5)) * s.reshape(())).astype(np.float32)
        ties = np.clip(ties, lo, hi)
        row[2:] = np.where(rng.random(c - 2) < 0.5, ties, row[2:])
        row[2::3] = np.nextafter(row[2::3], np.float32(np.inf * (1 if p % 2 else -1)))
        x[0, :, p, 0] = row
    x[0, :, 5, 0] *= np.float32(1e-34)  # step ~ 1e-36 (no inverse: divide)
    x[0, :, 6, 0] *= np.float32(1e35)  # step ~ 1e33
    x[0, 9, 7, 0] = -0.0
    codes = rng.integers(-8, 8, (12, c)).astype(np.int8)
    scale = rng.uniform(0.01, 0.2, 12).astype(np.float32)
    np.testing.assert_array_equal(_run(x, codes, scale, None, 4, kernel), pixel_reference(x, codes, scale, None), err_msg=kernel)


@pytest.mark.parametrize("kernel", kernel_params())
def test_steps_without_an_inverse_divide(kernel):
    """Pixels whose step is 2^110 or 2^-110 (1/s_x out of the fixed-point grid's range: the kernels divide), values
    whole multiples of it (no ties, which would divide anyway), in whole vectors of such pixels."""
    rng = np.random.default_rng(5)
    pixels, c = 32, 40
    multiples = rng.integers(-128, 128, (1, c, pixels, 1)).astype(np.float32)
    multiples[0, 0], multiples[0, 1] = -128, 127  # the range: step (127 + 128) * 2^e / 255 = 2^e, zero point 128
    exponent = np.where(np.arange(pixels) < pixels // 2, 110, -110).astype(np.float32)[None, None, :, None]
    x = (multiples * np.exp2(exponent)).astype(np.float32)
    np.testing.assert_array_equal(pixel_steps(x)[0].reshape(-1), np.exp2(exponent).reshape(-1))
    codes = rng.integers(-8, 8, (6, c)).astype(np.int8)
    scale = rng.uniform(0.01, 0.2, 6).astype(np.float32)
    np.testing.assert_array_equal(_run(x, codes, scale, None, 4, kernel), pixel_reference(x, codes, scale, None), err_msg=kernel)
