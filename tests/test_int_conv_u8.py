"""uint8 between consecutive convolutions (csrc/kernels/int_conv.h): uint8 X, the fused residual R and uint8 Y.

Every kernel equals an independent numpy model of the definition bit for bit on every form of the epilogue (uint8 X;
uint8 Y through IntConvQ/PostConvQ; a float or uint8 residual; all of them with clip bounds and per-sample steps), on
dense, grouped, depthwise (each of the SIMD depthwise paths, strides 1 and 2) and 1x1 shapes, with data on a grid
where many quotients y / y_scale are exact ties and many saturate at 0 and 255. A chain of ops linked by uint8 equals
onnxruntime's float Q -> DQ -> Conv -> Add -> Relu within one code per op; malformed uses are clear errors.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass, replace

import numpy as np
import pytest
from conftest import ISA_KERNELS, KERNELS, kernel_params, skip_reason
from conv_ops import Case, case_attributes, clipped, pack, quantize_input, reference_codes
from onnx import TensorProto, helper, numpy_helper

from onnxq.native.domain import DOMAIN
from onnxq.native.session import session

F, U8 = TensorProto.FLOAT, TensorProto.UINT8


@dataclass(frozen=True)
class Form:
    """Which of the new inputs a node has: uint8 X, uint8 Y, the residual R (None, "float" or "uint8"), the clip."""

    name: str
    x_u8: bool = False
    y_u8: bool = False
    residual: str | None = None
    clip: tuple[float | None, float | None] | None = None  # bounds at these quantiles of y (None: attribute absent)
    per_sample: bool = False
    hardswish: tuple[float, float] | None = None  # the hard swish's alpha and beta after the clip (None: attribute absent)
    affine: bool = False  # inputs post_scale and post_bias: a per-channel affine map after the clip and the hard swish
    asq: bool = False  # inputs asq_weight and asq_log: uint8 Y with ASQ's step per sample, which output 1 holds
    r_per_sample: bool = False  # uint8 R with a step per sample (an ASQ op's output as the residual)

    def __str__(self) -> str:
        return self.name


FORMS = [
    Form("u8x", x_u8=True),
    Form("u8y", y_u8=True),
    Form("float-r", residual="float"),
    Form("u8r", residual="uint8"),
    Form("u8x-u8y-u8r-relu", x_u8=True, y_u8=True, residual="uint8", clip=(0.0, None)),
    Form("u8x-u8y-float-r-clip", x_u8=True, y_u8=True, residual="float", clip=(0.01, 0.99)),
    Form("u8y-u8r-clip", y_u8=True, residual="uint8", clip=(0.05, 0.98)),
    Form("per-sample-u8x-u8y-u8r", x_u8=True, y_u8=True, residual="uint8", clip=(0.0, None), per_sample=True),
    # the hard swish: alone (float Y: the output step runs for it alone), after a clip, into uint8 Y; ONNX HardSwish's
    # alpha and beta, and a HardSigmoid's (0.2, 0.5 are its defaults) with a residual
    Form("hardswish", hardswish=(1 / 6, 0.5)),
    Form("u8x-u8y-clip-hardswish", x_u8=True, y_u8=True, clip=(0.02, 0.97), hardswish=(1 / 6, 0.5)),
    Form("u8y-u8r-hardsigmoid-mul", y_u8=True, residual="uint8", hardswish=(0.2, 0.5)),
    # the per-channel affine map (a Relu's BatchNormalization fused): alone into float Y, after a Relu between uint8
    # X and Y (CREPE's blocks), and after everything else, per-sample steps included
    Form("affine", affine=True),
    Form("u8x-u8y-relu-affine", x_u8=True, y_u8=True, clip=(0.0, None), affine=True),
    Form("per-sample-u8y-u8r-clip-hardswish-affine", y_u8=True, residual="uint8", clip=(0.02, 0.97), hardswish=(1 / 6, 0.5),
         per_sample=True, affine=True),
    # ASQ's step per sample for Y, computed from the op's own y (int_conv_asq.cc): alone, after a Relu, behind a residual
    # of uint8 R with steps per sample (another ASQ op's output), and with everything else
    Form("asq", y_u8=True, asq=True),
    Form("u8x-asq-relu", x_u8=True, y_u8=True, clip=(0.0, None), asq=True),
    Form("asq-u8r-per-sample", y_u8=True, residual="uint8", r_per_sample=True, asq=True),
    Form("per-sample-u8x-asq-u8r-per-sample-clip-hardswish-affine", x_u8=True, y_u8=True, residual="uint8", clip=(0.02, 0.97),
         hardswish=(1 / 6, 0.5), per_sample=True, affine=True, asq=True, r_per_sample=True),
]

# Shapes for every kernel path: dense (Gemm over large images, GemmT over small ones), grouped, 1x1, and depthwise:
# LanesFused (small images), DepthwiseFused (large ones; AVX2 above 16x16), strides 1 and 2, and with dilation the
# kernels over X quantized (Depthwise, DepthwiseLanes).
SHAPES = [
    Case("IntConv", 4, 2, 8, (12, 13), 12, (3, 3), pads=(1, 1, 1, 1)),
    Case("IntConv", 8, 2, 24, (4, 4), 20, (3, 3), pads=(1, 1, 1, 1)),
    Case("PostConv", 4, 2, 12, (9, 9), 8, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=2),
    Case("IntConv", 4, 2, 16, (7, 7), 24, (1, 1)),
    Case("IntConv", 4, 2, 20, (7, 7), 20, (3, 3), pads=(1, 1, 1, 1), group=20),
    Case("PostConv", 4, 2, 18, (11, 10), 18, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=18),
    Case("IntConv", 8, 1, 3, (130, 131), 3, (3, 3), pads=(1, 1, 1, 1), group=3),
    Case("IntConv", 4, 2, 5, (40, 36), 5, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=5),
    Case("PostConv", 3, 2, 17, (20, 20), 17, (3, 3), pads=(1, 1, 1, 1), group=17, bias=False),
    Case("IntConv", 4, 2, 16, (9, 9), 16, (3, 3), pads=(2, 2, 2, 2), dilations=(2, 2), group=16),
    Case("IntConv", 4, 1, 6, (21, 21), 6, (3, 3), pads=(2, 2, 2, 2), dilations=(2, 2), group=6),
    # 1x1 with strides and no padding: the strided pixels picked, then a stride-1 product (ResNet's shortcuts)
    Case("IntConv", 4, 2, 16, (14, 15), 32, (1, 1), strides=(2, 2)),
    # GemmT finished from its registers (VNNI): tiles of 16 pixels within a row and across rows, 8 left
    Case("IntConv", 4, 2, 24, (3, 40), 48, (1, 1)),
    # GemmT with one and two blocks of 16 rows (its widest tiles), rows of 29 and 23 pixels: tiles cut at row ends
    Case("IntConv", 4, 2, 16, (6, 29), 16, (3, 3), pads=(1, 1, 1, 1)),
    Case("PostConv", 4, 2, 8, (5, 23), 16, (3, 3), pads=(1, 1, 1, 1)),
    # GemmT into uint8 Y with the channels in the lanes (FinishTBytes), 16 pixels at a time: 35 pixels (the last 16
    # overlap the ones before) and 40 channels (the last block of lanes part full); panels under 16 pixels (15), whose
    # rows and R go through buffers, with 24 and 12 channels
    Case("IntConv", 4, 2, 16, (5, 7), 40, (3, 3), pads=(1, 1, 1, 1)),
    Case("IntConv", 4, 2, 8, (3, 5), 24, (3, 3), pads=(1, 1, 1, 1)),
    Case("PostConv", 4, 2, 8, (3, 5), 12, (3, 3), pads=(1, 1, 1, 1)),
    # AVX2's GemmT with k in two cache chunks (2 blocks of 16 rows, 144 blocks of k in chunks of 126) into uint8 Y, 28
    # channels (the last block of lanes part full), no bias
    Case("IntConv", 4, 2, 64, (6, 10), 28, (3, 3), pads=(1, 1, 1, 1), bias=False),
    # Gemm with a dropped column a row (stride 2, even padded width) and 40 channels: a panel's kept pixels span rows,
    # and its channels go through the output step 16 at a time (16, 16, 8)
    Case("IntConv", 4, 2, 8, (20, 20), 40, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1)),
    Case("PostConv", 4, 1, 6, (20, 22), 36, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1)),
    # LanesFused into uint8 Y (AVX-512: whole tiles of 16 pixels through the output step in registers, then the last 16
    # pixels again over the tiles before): 196 pixels (tail 4) with two full blocks of lanes, 143 pixels of rows of 11
    # (odd: cell pairs across rows) with a block of 4 lanes, and a stride-2 one, 160 pixels (no tail)
    Case("IntConv", 8, 2, 32, (14, 14), 32, (3, 3), pads=(1, 1, 1, 1), group=32),
    Case("PostConv", 4, 2, 20, (13, 11), 20, (3, 3), pads=(1, 1, 1, 1), group=20),
    Case("IntConv", 4, 2, 18, (32, 20), 18, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=18),
    # One input channel, a kernel one column wide (1-D convolutions over H, CREPE's first layer 512x1 stride 4): quads
    # of 4 kernel rows (int_conv_impl.h, UsesTapQuads), kh not a multiple of 4 (zero taps past it), padding above and
    # below, 8-bit codes (AVX2: split weights), dilation, columns with padding beside them, PostConv, kh 2, one row out
    Case("IntConv", 8, 2, 1, (70, 1), 24, (13, 1), strides=(4, 1), pads=(6, 0, 6, 0)),
    Case("IntConv", 4, 2, 1, (40, 3), 12, (6, 1), pads=(2, 1, 3, 1), dilations=(2, 1)),
    Case("PostConv", 4, 1, 1, (33, 2), 8, (9, 1), strides=(3, 2), pads=(4, 0, 4, 1)),
    Case("IntConv", 5, 2, 1, (17, 1), 4, (2, 1), strides=(2, 1)),
    Case("IntConv", 4, 2, 1, (9, 5), 24, (9, 1), strides=(3, 1)),
    # One input channel and a kernel wider than a column (image models' first layers: MobileNetV2's 3x3 at 28x28, 8-bit;
    # the ViT's 4x4 stride-4 patches): the same quads of 4 kernel rows, each row's kw taps beside each other; stride and
    # dilation both ways with uneven padding, PostConv, kh 2, a kernel taller than the image (rows all padding)
    Case("IntConv", 8, 2, 1, (28, 28), 32, (3, 3), pads=(1, 1, 1, 1)),
    Case("IntConv", 4, 2, 1, (28, 28), 24, (4, 4), strides=(4, 4)),
    Case("PostConv", 4, 2, 1, (13, 11), 12, (5, 3), strides=(2, 1), pads=(2, 1, 1, 0), dilations=(2, 2)),
    Case("IntConv", 5, 2, 1, (6, 9), 16, (2, 3), strides=(1, 2), pads=(0, 1, 1, 1)),
    Case("IntConv", 4, 2, 1, (5, 6), 16, (7, 2), pads=(3, 0, 3, 1)),
]


def _steps(case: Case, rng: np.random.Generator):
    """x_scale, x_zp, y_zp, r_scale, r_zp. IntConv: powers of two (with scale 1/2 and biases and R on the grid of 1/8,
    y lies on that grid and y / y_scale, y_scale = 1/4, is an exact tie for about half the outputs)."""
    if case.op == "IntConv":
        return np.float32(0.25), np.uint8(rng.integers(100, 156)), np.uint8(rng.integers(90, 166)), np.float32(0.5), 120
    x_scale = np.float32(rng.uniform(0.01, 0.03))
    return x_scale, np.uint8(rng.integers(60, 200)), np.uint8(rng.integers(90, 166)), np.float32(0.0123), 131


def quantize_y(y: np.ndarray, y_scale: np.float32, y_zp: int) -> np.ndarray:
    """ONNX QuantizeLinear in float32: clamp(round_half_even(y / y_scale) + y_zp, 0, 255), NaN -> 0."""
    q = np.rint(y / np.float32(y_scale)) + np.float32(y_zp)
    assert q.dtype == np.float32
    return np.where(np.isnan(q), 0, np.clip(q, 0, 255)).astype(np.uint8)


def residual_value(r: np.ndarray, r_scale, r_zp) -> np.ndarray:
    """R's float32 value: float R as it is, uint8 R as ((int32)R - r_zp) * r_scale (one float32 multiply; a step per
    sample: r_scale of N elements)."""
    if r.dtype == np.float32:
        return r
    r_scale = np.asarray(r_scale, np.float32)
    steps = r_scale.reshape(-1, 1, 1, 1) if r_scale.size > 1 else np.float32(r_scale.reshape(-1)[0])
    return (r.astype(np.int32) - np.int32(r_zp)).astype(np.float32) * steps


def asq_steps(y: np.ndarray, weight: np.ndarray, log: np.ndarray, y_scale: np.float32) -> np.ndarray:
    """ASQ's step per sample from y (N, M, OH, OW), as int_conv.h defines it: channel means (sums in double, pixel i into
    part i % 8 in order, the parts added ((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7))), t = b + f . w (in double, in
    order), clipped to [log_min, log_max], then float32(exp(t)) * y_scale (float32)."""
    n, m = y.shape[:2]
    planes = y.reshape(n, m, -1).astype(np.float64)
    pixels = planes.shape[2]
    parts = [np.cumsum(planes[:, :, j::8], axis=2)[:, :, -1] if j < pixels else np.zeros((n, m)) for j in range(8)]  # (sequential)
    sums = ((parts[0] + parts[4]) + (parts[2] + parts[6])) + ((parts[1] + parts[5]) + (parts[3] + parts[7]))
    means = sums / pixels if pixels else np.zeros((n, m))
    t = np.cumsum(np.concatenate([np.full((n, 1), float(log[0])), means * weight.astype(np.float64)], axis=1), axis=1)[:, -1]
    t = np.minimum(np.where(t >= float(log[1]), t, float(log[1])), float(log[2]))
    factors = np.array([math.exp(v) for v in t], dtype=np.float64).astype(np.float32)  # (the C library's exp)
    steps = factors * np.float32(y_scale)
    assert steps.dtype == np.float32
    return np.clip(steps, np.finfo(np.float32).tiny, np.finfo(np.float32).max)


def make_model(op: str, inputs: list[tuple[str, np.ndarray | int | None]], y_type: int, *, steps: bool = False, **attributes) -> bytes:
    """One node; each input an initializer (an array), a graph input (its element type) or absent (None):

    inputs... ─► op ─► Y [, Y_steps (``steps``: output 1, ASQ's steps per sample)]
    """
    names, graph_inputs, initializers = [], [], []
    for name, value in inputs:
        if value is None:
            names.append("")
        elif isinstance(value, int):
            names.append(name)
            graph_inputs.append(helper.make_tensor_value_info(name, value, None))
        else:
            names.append(name)
            initializers.append(numpy_helper.from_array(value, name))
    while names[-1] == "":
        names.pop()
    outputs = [helper.make_tensor_value_info("Y", y_type, None)]
    if steps:
        outputs.append(helper.make_tensor_value_info("Y_steps", F, None))
    node = helper.make_node(op, names, [o.name for o in outputs], domain=DOMAIN, **{k: v for k, v in attributes.items() if v is not None})
    graph = helper.make_graph([node], op, graph_inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)]).SerializeToString()


@functools.lru_cache(maxsize=4)
def _expected(case: Case, form: Form) -> tuple:
    """The node's model (a function of the kernel), its feeds and the expected outputs from the numpy model (Y, and
    with ASQ its steps)."""
    rng = np.random.default_rng(zlib.crc32(f"{case}{form}".encode()))
    x_scale, x_zp, y_zp, r_scale, r_zp = _steps(case, rng)
    if form.per_sample:
        x_scale = (x_scale * rng.choice([0.5, 1.0, 2.0], (case.n, 1))).astype(np.float32)
    limit = 2 ** (case.bits - 1) - 1
    codes = rng.integers(-limit, limit + 1, (case.m, case.k)).astype(np.int8)
    grid = case.op == "IntConv"
    scale = (np.full(case.m, 0.5) if grid else rng.uniform(0.01, 0.2, case.m)).astype(np.float32)
    bias = None
    if case.bias:
        bias = (rng.integers(-40, 41, case.m) / 8 if grid else rng.standard_normal(case.m)).astype(np.float32)
    steps = x_scale.reshape(-1) if form.per_sample else np.full(case.n, x_scale)
    # X's codes about z_x (sums of about 150 steps of y), a few at 0 and 255
    spread = int(np.clip(np.sqrt(3) * 150 / (np.sqrt(case.k) * max(1.0, float(np.std(codes)))), 2, 127))
    codes_x = np.clip(int(x_zp) + rng.integers(-spread, spread + 1, (case.n, case.c, *case.hw)), 0, 255)
    codes_x[rng.random(codes_x.shape) < 0.02] = 0
    codes_x[rng.random(codes_x.shape) < 0.02] = 255
    if form.x_u8:
        x = codes_x.astype(np.uint8)
        xq = x.astype(np.int64)
    else:  # float X: the codes' values, with noise under half a step
        noise = rng.uniform(-0.45, 0.45, codes_x.shape)
        x = ((codes_x - int(x_zp) + noise) * steps[:, None, None, None]).astype(np.float32)
        xq = np.concatenate([quantize_input(x[n : n + 1], steps[n], x_zp)[0] for n in range(case.n)])
    y = np.concatenate(
        [reference_codes(replace(case, n=1), xq[n : n + 1], np.float32(steps[n]), int(x_zp), codes, scale, bias) for n in range(case.n)]
    )
    feeds = {"X": x}
    r = None
    if form.residual == "float":
        r = (rng.integers(-80, 81, y.shape) / 8 * (1 if grid else float(np.std(y)) / 10)).astype(np.float32)
    elif form.residual == "uint8":
        r = rng.integers(0, 256, y.shape).astype(np.uint8)
    if form.r_per_sample:
        r_scale = (r_scale * rng.choice([0.5, 1.0, 2.0], case.n)).astype(np.float32)
    if r is not None:
        y = y + residual_value(r, r_scale, r_zp)
        feeds["R"] = r
    assert y.dtype == np.float32
    clip = {}
    if form.clip == (0.0, None):  # Relu
        clip = dict(clip_min=0.0)
    elif form.clip is not None:
        clip = {key: float(np.quantile(y, q)) for key, q in zip(("clip_min", "clip_max"), form.clip) if q is not None}
    y = clipped(y, clip)
    swish = {}
    if form.hardswish is not None:
        alpha, beta = np.float32(form.hardswish[0]), np.float32(form.hardswish[1])
        y = y * np.clip((y * alpha) + beta, np.float32(0), np.float32(1))  # float32 steps: multiply, add, clip, multiply
        assert y.dtype == np.float32
        swish = dict(hardswish=1, hardswish_alpha=float(alpha), hardswish_beta=float(beta))
    post_scale = post_bias = None
    if form.affine:  # IntConv: factors of 2 (either sign) and biases on the grid of 1/8, so that y stays on it
        post_scale = (rng.choice([0.5, 1.0, 2.0, -0.5], case.m) if grid else rng.uniform(-2, 2, case.m)).astype(np.float32)
        post_bias = (rng.integers(-40, 41, case.m) / 8 if grid else rng.standard_normal(case.m)).astype(np.float32)
        y = y * post_scale[None, :, None, None]
        y = y + post_bias[None, :, None, None]  # float32 steps: multiply, then add
        assert y.dtype == np.float32
    y_scale = np.float32(0.25 if grid else float(np.std(y)) / 100)
    asq_weight = asq_log = None
    if form.asq:  # factors about e^+-0.5 from the channel means, clipped for some samples
        asq_weight = (rng.uniform(-1, 1, case.m) / (np.sqrt(case.m) * (float(np.std(y)) + 1e-3))).astype(np.float32)
        y_scale = np.float32(float(np.std(y)) / 100)  # (no grid: the steps per sample are not powers of two)
        b = np.float32(rng.uniform(-0.2, 0.2))
        asq_log = np.array([b, b - 0.3, b + 0.3], np.float32)
        steps_y = asq_steps(y, asq_weight, asq_log, y_scale)
        want = np.concatenate([quantize_y(y[n : n + 1], steps_y[n], int(y_zp)) for n in range(case.n)])
        assert 0.005 < np.mean(want == 0) + np.mean(want == 255) < 0.995, "saturation at 0 or 255 is part of the test"
    elif form.y_u8:
        want = quantize_y(y, y_scale, int(y_zp))
        assert 0.005 < np.mean(want == 0) + np.mean(want == 255) < 0.995, "saturation at 0 or 255 is part of the test"
        if grid and form.hardswish is None:  # exact ties of y / y_scale, rounded half to even (the swish leaves the grid)
            assert np.mean(np.abs(np.remainder(y / y_scale, 1) - 0.5) == 0) > 0.1
    else:
        want = y
    uint8_r = form.residual == "uint8"
    inputs = [
        ("X", U8 if form.x_u8 else F),
        ("W", pack(codes, case.bits)),
        ("scale", scale),
        ("B", bias),
        ("x_scale", np.asarray(x_scale, np.float32)),
        ("x_zero_point", np.asarray(x_zp, np.uint8)),
        ("y_scale", np.asarray(y_scale, np.float32) if form.y_u8 else None),
        ("y_zero_point", np.asarray(y_zp, np.uint8) if form.y_u8 else None),
        ("R", None if r is None else U8 if uint8_r else F),
        ("r_scale", (r_scale.reshape(-1, 1) if form.r_per_sample else np.asarray(r_scale, np.float32)) if uint8_r else None),
        ("r_zero_point", np.asarray(r_zp, np.uint8) if uint8_r else None),
        ("post_scale", post_scale),
        ("post_bias", post_bias),
        ("asq_weight", asq_weight),
        ("asq_log", asq_log),
    ]
    attributes = dict(case_attributes(case), **clip, **swish)
    op = case.op + ("Q" if form.y_u8 else "")
    model = functools.partial(make_model, op, inputs, U8 if form.y_u8 else F, steps=form.asq, **attributes)
    return model, feeds, (want, steps_y) if form.asq else (want,)


@pytest.mark.parametrize("kernel", kernel_params())
@pytest.mark.parametrize("form", FORMS, ids=str)
@pytest.mark.parametrize("case", SHAPES, ids=str)
def test_every_epilogue_form_equals_numpy_bit_for_bit(case, form, kernel):
    model, feeds, wants = _expected(case, form)
    outputs = session(model(kernel=KERNELS[kernel])).run(None, feeds)
    assert len(outputs) == len(wants)
    for y, want in zip(outputs, wants, strict=True):
        assert y.dtype == want.dtype and y.shape == want.shape
        np.testing.assert_array_equal(y, want, err_msg=f"kernel {kernel}")


# A node keeps a plan of its call for X's shape (int_conv.cc, Plan): one session fed batches of other sizes in turn must
# give every batch its own result (dense by Gemm and GemmT, depthwise by LanesFused, the strided 1x1's picked pixels).
_ALTERNATING = [
    (replace(SHAPES[0], n=3), "u8y"),
    (replace(SHAPES[1], n=3), "u8x-u8y-u8r-relu"),
    (replace(SHAPES[4], n=3), "u8x-u8y-float-r-clip"),
    (replace(SHAPES[5], n=3), "u8y-u8r-clip"),
    (replace(SHAPES[11], n=3), "float-r"),
    (replace(SHAPES[3], n=3), "u8x-asq-relu"),
]


@pytest.mark.parametrize("kernel", kernel_params())
@pytest.mark.parametrize(("case", "form"), _ALTERNATING, ids=lambda v: str(v))
def test_one_session_fed_batches_of_alternating_sizes_equals_numpy(case, form, kernel):
    model, feeds, wants = _expected(case, next(f for f in FORMS if f.name == form))
    s = session(model(kernel=KERNELS[kernel]))
    for n in (1, 3, 2, 3, 1, 2):
        outputs = s.run(None, {name: value[:n] for name, value in feeds.items()})
        for y, want in zip(outputs, wants, strict=True):
            np.testing.assert_array_equal(y, want[:n], err_msg=f"kernel {kernel}, batch {n}")


# With one constant step a node keeps its kernels' per-channel tables from its first call (int_conv_impl.h,
# CallTables): later calls of one shape with other data must use them as the first call laid them out (GemmT's rows,
# the lane kernels' constants; Gemm and the strided 1x1 too). Each call feeds the batch in another order, whose
# outputs are the numpy model's in that order (one step per tensor: each sample's outputs are its own).
_REPEATED = [
    (replace(SHAPES[3], n=3), "u8x-u8y-u8r-relu"),
    (replace(SHAPES[14], n=3), "u8y"),
    (replace(SHAPES[17], n=3), "u8y-u8r-clip"),
    (replace(SHAPES[20], n=3), "u8x-u8y-clip-hardswish"),
    (replace(SHAPES[4], n=3), "u8x-u8y-relu-affine"),
    (replace(SHAPES[11], n=3), "float-r"),
]


@pytest.mark.parametrize("kernel", kernel_params())
@pytest.mark.parametrize(("case", "form"), _REPEATED, ids=lambda v: str(v))
def test_calls_of_one_shape_with_other_data_equal_numpy(case, form, kernel):
    model, feeds, wants = _expected(case, next(f for f in FORMS if f.name == form))
    s = session(model(kernel=KERNELS[kernel]))
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1, 0]):
        outputs = s.run(None, {name: value[order] for name, value in feeds.items()})
        for y, want in zip(outputs, wants, strict=True):
            np.testing.assert_array_equal(y, want[order], err_msg=f"kernel {kernel}, order {order}")


@pytest.mark.parametrize("kernel", kernel_params())
def test_nan_outputs_quantize_to_zero_and_infinite_residuals_saturate(kernel):
    """A NaN y (from a NaN residual) gives Y = 0, +-inf residuals 255 and 0, like ONNX QuantizeLinear."""
    case = Case("IntConv", 4, 1, 16, (6, 6), 16, (3, 3), pads=(1, 1, 1, 1), group=16)
    rng = np.random.default_rng(5)
    r = rng.standard_normal((1, 16, 6, 6)).astype(np.float32)
    r[0, :, 0, 0], r[0, :, 1, 1], r[0, :, 2, 2] = np.nan, np.inf, -np.inf
    codes = rng.integers(-7, 8, (16, 9)).astype(np.int8)
    inputs = [
        ("X", U8),
        ("W", pack(codes, 4)),
        ("scale", np.full(16, 0.1, np.float32)),
        ("B", None),
        ("x_scale", np.float32(0.5)),
        ("x_zero_point", np.uint8(128)),
        ("y_scale", np.float32(0.5)),
        ("y_zero_point", np.uint8(100)),
        ("R", F),
    ]
    model = make_model("IntConvQ", inputs, U8, bits=4, kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=16, kernel=KERNELS[kernel])
    x = rng.integers(0, 256, (1, 16, 6, 6)).astype(np.uint8)
    (y,) = session(model).run(None, {"X": x, "R": r})
    want = quantize_y(
        reference_codes(case, x.astype(np.int64), np.float32(0.5), 128, codes, np.full(16, 0.1, np.float32), None) + r, np.float32(0.5), 100
    )
    np.testing.assert_array_equal(y, want)
    assert (y[0, :, 0, 0] == 0).all() and (y[0, :, 1, 1] == 255).all() and (y[0, :, 2, 2] == 0).all()


def _chain_weights(rng: np.random.Generator, m: int, c: int, group: int = 1):
    """4-bit codes, per-channel scales and biases of one 3x3 layer."""
    codes = rng.integers(-7, 8, (m, c // group * 9)).astype(np.int8)
    return codes, rng.uniform(0.02, 0.06, m).astype(np.float32), (rng.standard_normal(m) * 0.1).astype(np.float32)


def _float_chain(x, layers, steps) -> list[np.ndarray]:
    """onnxruntime's float reference of the chain: Q -> DQ of each op's input, Conv with the dequantized weights,
    + the residual (the dequantized input of the op before), Relu, Q of each uint8 output."""
    nodes, initializers, outputs = [], [], []

    def constant(name, value):
        initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    current = "X"
    for i, ((codes, scale, bias, group), (s_in, z_in), out) in enumerate(zip(layers, steps[:-1], steps[1:])):
        q, dq = f"q{i}", f"dq{i}"
        nodes.append(helper.make_node("QuantizeLinear", [current, constant(f"s{i}", np.float32(s_in)), constant(f"z{i}", np.uint8(z_in))], [q]))
        nodes.append(helper.make_node("DequantizeLinear", [q, f"s{i}", f"z{i}"], [dq]))
        w = (codes.astype(np.float32) * scale[:, None]).reshape(len(scale), -1, 3, 3)
        y = f"y{i}"
        nodes.append(helper.make_node("Conv", [dq, constant(f"w{i}", w), constant(f"b{i}", bias)], [y], pads=[1, 1, 1, 1], group=group))
        if i == 1:  # the residual: op 1's input, dequantized
            nodes.append(helper.make_node("Add", [y, dq], [f"{y}r"]))
            y = f"{y}r"
        if out is not None:
            nodes.append(helper.make_node("Relu", [y], [f"{y}relu"]))
            current = f"{y}relu"
            outputs.append(current)
        else:
            outputs.append(y)
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("X", F, None)],
        [helper.make_tensor_value_info(name, F, None) for name in outputs],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return session(model.SerializeToString()).run(None, {"X": x})


@pytest.mark.parametrize("kernel", kernel_params())
def test_a_uint8_chain_with_a_residual_equals_float_q_dq_within_a_step_per_op(kernel):
    """IntConvQ (float X, Relu) -> IntConvQ depthwise (uint8 X, R = its own uint8 input, Relu) -> IntConv (uint8 X,
    float Y): each op's output is within one code (one step of the float output) of onnxruntime's float Q -> DQ ->
    Conv -> Add -> Relu -> Q fed the same input, and nearly always equal."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal((2, 8, 14, 14)).astype(np.float32)
    layers = [(*_chain_weights(rng, 16, 8), 1), (*_chain_weights(rng, 16, 16, 16), 16), (*_chain_weights(rng, 8, 16), 1)]
    steps = [(0.03, 128), (0.02, 0), (0.025, 0), None]  # each op's input step and zero point; None: float Y
    nodes, initializers = [], []

    def constant(name, value):
        initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    attributes = dict(bits=4, kernel_shape=[3, 3], pads=[1, 1, 1, 1], kernel=KERNELS[kernel])
    current = "X"
    for i, ((codes, scale, bias, group), (s_in, z_in), out) in enumerate(zip(layers, steps[:-1], steps[1:])):
        inputs = [
            current,
            constant(f"w{i}", pack(codes, 4)),
            constant(f"scale{i}", scale),
            constant(f"b{i}", bias),
            constant(f"s{i}", np.float32(s_in)),
            constant(f"z{i}", np.uint8(z_in)),
        ]
        extra = {}
        if out is not None:
            inputs += [constant(f"ys{i}", np.float32(out[0])), constant(f"yz{i}", np.uint8(out[1]))]
            extra = dict(clip_min=0.0)
        if i == 1:
            inputs += [current, f"s{i}", f"z{i}"]  # the residual: this op's own uint8 input
        nodes.append(
            helper.make_node("IntConvQ" if out is not None else "IntConv", inputs, [f"y{i}"], domain=DOMAIN, group=group, **attributes, **extra)
        )
        current = f"y{i}"
    outputs = [helper.make_tensor_value_info(f"y{i}", U8 if i < 2 else F, None) for i in range(3)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("X", F, None)], outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    ours = session(model.SerializeToString()).run(None, {"X": x})
    assert [y.dtype for y in ours] == [np.uint8, np.uint8, np.float32]
    # Each op against the float reference fed that op's actual input (the op before's uint8 output, dequantized).
    inputs = [x] + [((y.astype(np.float32) - np.float32(z)) * np.float32(s)) for y, (s, z) in zip(ours[:2], steps[1:3])]
    for i in range(3):
        reference = _float_chain(inputs[i], layers[i : i + 1], [steps[i], steps[i + 1]]) if i != 1 else None
        if i == 1:  # the residual op: its own reference with the Add
            reference = _float_chain_residual(inputs[1], layers[1], steps[1], steps[2])
        (want,) = reference[-1:]
        if steps[i + 1] is not None:
            s, z = steps[i + 1]
            want_q = quantize_y(want, np.float32(s), z)
            diff = np.abs(ours[i].astype(np.int32) - want_q.astype(np.int32))
            assert diff.max() <= 1 and np.mean(diff) < 0.01, (i, diff.max(), np.mean(diff))
            assert 0.1 < np.mean(ours[i] == 0) < 0.9  # (the Relu clips some)
        else:
            np.testing.assert_allclose(ours[i], want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def _float_chain_residual(x_float, layer, step_in, step_out) -> list[np.ndarray]:
    """The middle op's float reference: Q -> DQ -> depthwise Conv -> + DQ (its input) -> Relu."""
    codes, scale, bias, group = layer
    s_in, z_in = step_in
    q = np.clip(np.rint(x_float / np.float32(s_in)) + z_in, 0, 255)
    dq = ((q - z_in) * np.float32(s_in)).astype(np.float32)
    (y,) = _float_chain(dq, [(codes, scale, bias, group)], [(s_in, z_in), None])
    return [np.maximum(y + dq, np.float32(0))]


def test_float_models_are_unchanged_by_the_new_inputs():
    """A node with none of the new inputs (6 inputs, float X and Y) keeps its old output bits."""
    case = SHAPES[4]
    model, feeds, (want,) = _expected(case, Form("plain-float"))
    (y,) = session(model(kernel=0)).run(None, feeds)
    np.testing.assert_array_equal(y, want)


ERROR_CASE = Case("IntConv", 4, 1, 4, (6, 6), 4, (3, 3), pads=(1, 1, 1, 1))


def _error_inputs(**changes) -> list:
    rng = np.random.default_rng(3)
    inputs = dict(
        X=U8,
        W=pack(rng.integers(-7, 8, (4, 36)).astype(np.int8), 4),
        scale=np.full(4, 0.1, np.float32),
        B=None,
        x_scale=np.float32(0.1),
        x_zero_point=np.uint8(128),
        y_scale=None,
        y_zero_point=None,
        R=None,
        r_scale=None,
        r_zero_point=None,
        post_scale=None,
        post_bias=None,
        asq_weight=None,
        asq_log=None,
    )
    inputs.update(changes)
    return list(inputs.items())


@pytest.mark.parametrize(
    "op,changes,feeds,match",
    [
        (
            "IntConv",
            dict(x_scale=None, x_zero_point=None),
            {},
            r"IntConv: X is uint8 \(quantized already\): inputs x_scale and x_zero_point .* are required",
        ),
        (
            "IntConv",
            dict(R=F),
            dict(R=np.zeros((1, 4, 6, 5), np.float32)),
            r"input R \(the residual\) must have Y's shape \(N, M, OH, OW\) = \(1, 4, 6, 6\), got \(1, 4, 6, 5\)",
        ),
        ("IntConv", dict(R=U8), dict(R=np.zeros((1, 4, 6, 6), np.uint8)), r"R is uint8: inputs r_scale and r_zero_point .* are required"),
        (
            "IntConv",
            dict(R=F, r_scale=np.float32(1), r_zero_point=np.uint8(0)),
            dict(R=np.zeros((1, 4, 6, 6), np.float32)),
            r"dequantize a uint8 R; this R is float32",
        ),
        ("IntConv", dict(r_scale=np.float32(1), r_zero_point=np.uint8(0)), {}, r"r_scale and r_zero_point are given without R"),
        ("IntConvQ", dict(y_scale=np.float32(0.5)), {}, r"IntConvQ: y_scale and y_zero_point must be given together"),
        ("IntConvQ", dict(), {}, r"IntConvQ: Y is uint8: inputs y_scale and y_zero_point .* are required"),
        ("PostConvQ", dict(y_scale=np.float32(0), y_zero_point=np.uint8(3)), {}, r"PostConvQ: y_scale must be positive and finite, got 0"),
        ("IntConvQ", dict(y_scale=np.float32(-1), y_zero_point=np.uint8(3)), {}, r"y_scale must be positive and finite, got -1"),
        ("IntConvQ", dict(y_scale=np.float32(np.inf), y_zero_point=np.uint8(3)), {}, r"y_scale must be positive and finite, got inf"),
        ("IntConvQ", dict(y_scale=np.ones(2, np.float32), y_zero_point=np.uint8(3)), {}, r"y_scale must be one float32 value, got shape \(2,\)"),
        (
            "IntConv",
            dict(y_scale=np.float32(0.5), y_zero_point=np.uint8(3)),
            {},
            r"y_scale and y_zero_point quantize Y to uint8, which IntConvQ does",
        ),
        (
            "IntConv",
            dict(R=U8, r_scale=np.float32(-2), r_zero_point=np.uint8(0)),
            dict(R=np.zeros((1, 4, 6, 6), np.uint8)),
            r"r_scale must be positive",
        ),
        ("IntConv", dict(post_scale=np.ones(4, np.float32)), {}, r"IntConv: post_scale and post_bias must be given together"),
        (
            "IntConvQ",
            dict(y_scale=np.float32(0.5), y_zero_point=np.uint8(3), post_scale=np.ones(4, np.float32), post_bias=np.zeros(3, np.float32)),
            {},
            r"IntConvQ: input post_bias must have shape \(M,\) = \(4,\) like W's rows, got \(3,\)",
        ),
        # ASQ's steps per sample (inputs 13 and 14, output 1)
        ("IntConvQ", dict(y_scale=np.float32(0.5), y_zero_point=np.uint8(3), asq_weight=np.ones(4, np.float32)), {},
         r"IntConvQ: asq_weight and asq_log must be given together"),
        ("IntConv", dict(asq_weight=np.ones(4, np.float32), asq_log=np.zeros(3, np.float32)), {},
         r"asq_weight and asq_log give a uint8 Y a step per sample; IntConv's Y is float32"),
        ("IntConvQ", dict(y_scale=np.float32(0.5), y_zero_point=np.uint8(3), asq_weight=np.ones(4, np.float32), asq_log=np.zeros(3, np.float32)),
         {}, r"need output 1"),
        ("IntConvQ+steps", dict(y_scale=np.float32(0.5), y_zero_point=np.uint8(3), asq_weight=np.ones(5, np.float32),
                                asq_log=np.zeros(3, np.float32)), {}, r"input asq_weight must have shape \(M,\) = \(4,\), got \(5,\)"),
        ("IntConvQ+steps", dict(y_scale=np.float32(0.5), y_zero_point=np.uint8(3), asq_weight=np.ones(4, np.float32),
                                asq_log=np.zeros(2, np.float32)), {}, r"asq_log must hold 3 float32 values"),
        ("IntConvQ+steps", dict(y_scale=np.float32(0.5), y_zero_point=np.uint8(3), asq_weight=np.ones(4, np.float32),
                                asq_log=np.array([0, 1, -1], np.float32)), {}, r"must be finite with log_min <= log_max"),
        ("IntConv", dict(R=U8, r_scale=np.array([1, 0.5], np.float32), r_zero_point=np.uint8(0)), dict(R=np.zeros((1, 4, 6, 6), np.uint8)),
         r"r_scale must be one float32 value, got shape \(2,\)"),
    ],
)
@pytest.mark.parametrize("kernel", ISA_KERNELS)
def test_malformed_uses_are_clear_errors(op, changes, feeds, match, kernel):
    if skip_reason(kernel):
        pytest.skip(skip_reason(kernel))
    bits = dict(bits=4, kernel_shape=[3, 3], pads=[1, 1, 1, 1], kernel=KERNELS[kernel])
    op, steps = op.removesuffix("+steps"), op.endswith("+steps")  # (+steps: the node has output 1)
    model = make_model(
        op.replace("IntConv", "PostConv") if op.startswith("PostConv") else op, _error_inputs(**changes), U8 if op.endswith("Q") else F,
        steps=steps, **bits
    )
    x = np.random.default_rng(0).integers(0, 256, (1, 4, 6, 6)).astype(np.uint8)
    sess = session(model)
    with pytest.raises(Exception, match=match):
        sess.run(None, {"X": x, **feeds})


@pytest.mark.parametrize(
    "x_type,r_type,wrong", [(TensorProto.DOUBLE, None, "double"), (F, TensorProto.INT8, "int8"), (TensorProto.INT8, None, "int8")]
)
def test_x_and_r_of_other_types_are_session_errors(x_type, r_type, wrong):
    model = make_model(
        "IntConvQ", _error_inputs(X=x_type, R=r_type, y_scale=np.float32(1), y_zero_point=np.uint8(0)), U8, bits=4, kernel_shape=[3, 3]
    )
    with pytest.raises(Exception, match=rf"tensor\({wrong}\).*IntConvQ"):
        session(model)
