"""PostConv and IntConv test models and their numpy reference (csrc/kernels/int_conv.h), shared by the op tests.

The reference is written from the definition in int_conv.h, independently of the C++ code:
activations quantized like DynamicQuantizeLinear (or with the given x_scale / x_zero_point),
the integer convolution as int64 sums of (x_q - z_x) * w over padded, strided windows, and the
float32 epilogue in the definition's order. Used by test_int_conv.py, test_op_errors.py and test_gemm_ops.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.native.domain import DOMAIN
from onnxq.native.session import session


@dataclass(frozen=True)
class Case:
    """One convolution: op, code width, shapes and attributes, and which optional inputs it has."""

    op: str
    bits: int
    n: int
    c: int
    hw: tuple[int, int]
    m: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    group: int = 1
    bias: bool = True
    calibrated: bool = False
    # The clip of the epilogue (attributes clip_min / clip_max): "relu" is clip_min = 0 alone, a pair
    # (lo, hi) the bounds at those quantiles of the unclipped output (None: that attribute absent).
    clip: str | tuple[float | None, float | None] | None = None

    @property
    def k(self) -> int:
        return self.c // self.group * self.kernel[0] * self.kernel[1]

    def __str__(self) -> str:
        return (
            f"{self.op}{self.bits}b-n{self.n}c{self.c}-{self.hw[0]}x{self.hw[1]}-m{self.m}-k{self.kernel[0]}x{self.kernel[1]}"
            f"-s{self.strides[0]}{self.strides[1]}-p{''.join(map(str, self.pads))}-d{self.dilations[0]}{self.dilations[1]}"
            f"-g{self.group}{'-bias' if self.bias else ''}{'-calibrated' if self.calibrated else ''}"
            f"{'' if self.clip is None else f'-clip{self.clip}'.replace(' ', '')}"
        )


def clip_attributes(case: Case, unclipped: np.ndarray) -> dict:
    """The case's clip_min / clip_max attributes, from the unclipped output for quantile bounds."""
    if case.clip is None:
        return {}
    if case.clip == "relu":
        return dict(clip_min=0.0)
    names = ("clip_min", "clip_max")
    return {name: float(np.quantile(unclipped, q)) for name, q in zip(names, case.clip) if q is not None}


def clipped(y: np.ndarray, attributes: dict) -> np.ndarray:
    """The op's clip in numpy: np.clip of the unclipped output (it equals y < lo ? lo : y, then y > hi ? hi : y)."""
    if not attributes:
        return y
    lo, hi = attributes.get("clip_min", -np.inf), attributes.get("clip_max", np.inf)
    out = np.clip(y, np.float32(lo), np.float32(hi))
    assert out.dtype == np.float32
    return out


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (M, K) as W's bytes: two 4-bit two's-complement nibbles per byte (low first) at <= 4 bits, else int8."""
    if bits >= 5:
        return codes.astype(np.int8).view(np.uint8)
    nibbles = (codes.astype(np.int64) & 15).astype(np.uint8)
    if nibbles.shape[1] % 2:
        nibbles = np.pad(nibbles, ((0, 0), (0, 1)))
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def quantize_input(x: np.ndarray, x_scale: np.float32 | None, x_zero_point: np.uint8 | None) -> tuple[np.ndarray, np.float32, int]:
    """X as uint8 codes: DynamicQuantizeLinear's scale and zero point, or the given ones."""
    if x_scale is None:
        lo = np.float32(min(0.0, x.min())) if x.size else np.float32(0)
        hi = np.float32(max(0.0, x.max())) if x.size else np.float32(0)
        x_scale = np.float32(1) if hi == lo else (hi - lo) / np.float32(255)
        x_zero_point = np.rint(np.clip(np.float32(0) - lo / x_scale, 0, 255))
    z = int(x_zero_point)
    return np.clip(np.rint(x / x_scale) + z, 0, 255).astype(np.int64), np.float32(x_scale), z


def pixel_steps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's DynamicQuantizeLinear step and zero point, (N, 1, H, W): its range over C, 0 included, NaN skipped."""
    finite_or_inf = np.where(np.isnan(x), np.float32(0), x)  # (a NaN never widens the range; 0 is in it anyway)
    lo = np.minimum(np.float32(0), finite_or_inf.min(axis=1, keepdims=True, initial=np.float32(0)))
    hi = np.maximum(np.float32(0), finite_or_inf.max(axis=1, keepdims=True, initial=np.float32(0)))
    with np.errstate(invalid="ignore", over="ignore"):
        scale = np.where(hi == lo, np.float32(1), (hi - lo) / np.float32(255)).astype(np.float32)
        zero_point = np.rint(np.clip(np.float32(0) - lo / scale, 0, 255)).astype(np.int64)
    return scale, zero_point


def quantize_pixels(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """x_q = clamp(round_half_even(x / s_x) + z_x, 0, 255) per pixel, int64; a NaN quotient gives 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        quotient = (x / scale).astype(np.float32)
        codes = np.clip(np.rint(np.clip(quotient, -zero_point, 255 - zero_point)) + zero_point, 0, 255)
    return np.where(np.isnan(quotient), 0, codes).astype(np.int64)


def pixel_reference(x: np.ndarray, codes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """IntConv 1x1 with per-pixel steps: (sum_c x_q q - z_x sum q) as float32 times (s_x * scale[m]), plus B[m]."""
    s_x, z_x = pixel_steps(x)
    xq = quantize_pixels(x, s_x, z_x)
    q = codes.astype(np.int64)
    acc = np.einsum("nchw,mc->nmhw", xq, q) - z_x * q.sum(axis=1)[None, :, None, None]
    assert np.abs(acc).max(initial=0) < 2**31
    c = s_x * scale[None, :, None, None]  # (N, M, H, W) float32
    y = acc.astype(np.float32) * c
    if bias is not None:
        y = y + bias[None, :, None, None]
    assert y.dtype == np.float32
    return y


def integer_conv(xq: np.ndarray, z: int, w: np.ndarray, case: Case) -> np.ndarray:
    """sum over the receptive field of (x_q - z) * w, in int64; padding holds z (so contributes 0)."""
    top, left, bottom, right = case.pads
    xp = np.pad(xq - z, ((0, 0), (0, 0), (top, bottom), (left, right)))
    kh, kw = case.kernel
    (sh, sw), (dh, dw) = case.strides, case.dilations
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cg, mg = case.c // case.group, case.m // case.group
    acc = np.zeros((case.n, case.m, oh, ow), np.int64)
    for ky in range(kh):
        for kx in range(kw):
            window = xp[:, :, ky * dh : ky * dh + sh * (oh - 1) + 1 : sh, kx * dw : kx * dw + sw * (ow - 1) + 1 : sw]
            for g in range(case.group):
                acc[:, g * mg : (g + 1) * mg] += np.einsum("ncyx,mc->nmyx", window[:, g * cg : (g + 1) * cg], w[g * mg : (g + 1) * mg, :, ky, kx])
    return acc


def post_weights(codes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, int]:
    """POST codes as (w_even, w_odd, K2): sign * 2^(K2 - e/2) for even e = M - |q|, sign * 2^(K2 - (e-1)/2) for odd."""
    big_m = 2 ** (bits - 1) - 1
    k2 = math.ceil((big_m - 1) / 2)
    index, sign = np.abs(codes).astype(np.int64), np.sign(codes).astype(np.int64)
    e = big_m - index
    power = np.where(e % 2 == 0, k2 - e // 2, k2 - (e - 1) // 2)
    magnitude = np.where(index > 0, 2 ** np.maximum(power, 0), 0)
    w_even = np.where(e % 2 == 0, sign * magnitude, 0)
    w_odd = np.where(e % 2 == 1, sign * magnitude, 0)
    return w_even, w_odd, k2


def post_decode(codes: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """POST codes (M, K) as the float32 weights they stand for, from the format's definition (onnxq/numerics/post.py's
    docstring), not its code: sign(q) * scale * 2^(-(M - |q|) / 2), and 0 for q = 0."""
    big_m = 2 ** (bits - 1) - 1
    index = np.abs(codes).astype(np.int64)
    magnitude = np.where(index > 0, 2.0 ** (-(big_m - index) / 2), 0.0)
    return (np.sign(codes) * magnitude * np.asarray(scale, np.float64)[:, None]).astype(np.float32)


def reference(case: Case, x, codes, scale, bias, x_scale, x_zero_point) -> np.ndarray:
    """The op's output from its definition, in numpy."""
    xq, s_x, z = quantize_input(x, x_scale, x_zero_point)
    return reference_codes(case, xq, s_x, z, codes, scale, bias)


def reference_codes(case: Case, xq: np.ndarray, s_x: np.float32, z: int, codes, scale, bias) -> np.ndarray:
    """The op's float32 y (bias added, before the clip) from X's codes x_q (int64), step s_x and zero point z."""
    shape = (case.m, case.c // case.group, *case.kernel)
    if case.op == "IntConv":
        acc = integer_conv(xq, z, codes.reshape(shape).astype(np.int64), case)
        c = (s_x * scale)[:, None, None]
        y = acc.astype(np.float32) * c
    else:
        w_even, w_odd, k2 = post_weights(codes, case.bits)
        acc_e = integer_conv(xq, z, w_even.reshape(shape), case)
        acc_o = integer_conv(xq, z, w_odd.reshape(shape), case)
        c_e = s_x * scale * np.float32(2.0**-k2)
        c_o = c_e * np.float32(0.70710678118654752)
        y = acc_e.astype(np.float32) * c_e[:, None, None] + acc_o.astype(np.float32) * c_o[:, None, None]
    if bias is not None:
        y = y + bias[:, None, None]
    assert y.dtype == np.float32
    return y


def case_attributes(case: Case) -> dict[str, object]:
    """The op attributes a case's shape and bits give (bits, kernel_shape, strides, pads, dilations, group)."""
    return dict(bits=case.bits, kernel_shape=list(case.kernel), strides=list(case.strides), pads=list(case.pads),
                dilations=list(case.dilations), group=case.group)


def conv_model(case: Case, w: np.ndarray, scale: np.ndarray, bias, x_scale, x_zero_point, kernel: int = 0, w_input: bool = False, **extra) -> bytes:
    """One node; W, scale, B and the activation quantization as initializers (W optionally a graph input):

    X, W, scale[, B][, x_scale, x_zero_point] ─► PostConv/IntConv ─► Y
    """
    attributes = dict(case_attributes(case), kernel=kernel)
    attributes.update(extra)
    attributes = {key: value for key, value in attributes.items() if value is not None}
    initializers = [numpy_helper.from_array(scale, "scale")]
    inputs = ["X", "W", "scale", "B" if bias is not None else ""]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)]
    if w_input:
        graph_inputs.append(helper.make_tensor_value_info("W", TensorProto.UINT8, None))
    else:
        initializers.append(numpy_helper.from_array(w, "W"))
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias, "B"))
    if x_scale is not None:
        inputs += ["x_scale", "x_zero_point"]
        initializers += [numpy_helper.from_array(np.asarray(x_scale, np.float32), "x_scale")]
        initializers += [numpy_helper.from_array(np.asarray(x_zero_point, np.uint8), "x_zero_point")]
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node(case.op, inputs, ["Y"], domain=DOMAIN, **attributes)
    graph = helper.make_graph([node], case.op, graph_inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=initializers)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def case_data(case: Case, seed: int):
    """Random X, codes (full range of the code width), per-channel scales and bias, and x_scale/x_zero_point."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((case.n, case.c, *case.hw)) * 2 + rng.uniform(-1, 1)).astype(np.float32)
    limit = 2 ** (case.bits - 1) - 1
    codes = rng.integers(-limit, limit + 1, (case.m, case.k)).astype(np.int8)
    if case.op == "IntConv" and case.bits in (4, 8):  # the packed type's whole range, -8 / -128 included
        codes[rng.random(codes.shape) < 0.05] = -(limit + 1)
    scale = rng.uniform(0.01, 0.2, case.m).astype(np.float32)
    bias = rng.standard_normal(case.m).astype(np.float32) if case.bias else None
    x_scale = x_zero_point = None
    if case.calibrated:  # a range that clips some of X
        x_scale, x_zero_point = np.float32(rng.uniform(0.01, 0.03)), np.uint8(rng.integers(60, 200))
    return x, codes, scale, bias, x_scale, x_zero_point


def error_model(case: Case, **overrides):
    """A model for the case with some inputs replaced (w, scale, bias, x_scale, x_zero_point) or attributes overridden."""
    x, codes, scale, bias, x_scale, x_zero_point = case_data(case, seed=3)
    parts = dict(w=pack(codes, case.bits), scale=scale, bias=bias, x_scale=x_scale, x_zero_point=x_zero_point)
    attributes = {key: overrides.pop(key) for key in list(overrides) if key not in parts}
    parts.update(overrides)
    return x, conv_model(case, parts["w"], parts["scale"], parts["bias"], parts["x_scale"], parts["x_zero_point"], **attributes)


GOOD = Case("PostConv", 4, 1, 4, (6, 6), 4, (3, 3), pads=(1, 1, 1, 1))


def raises_at_run(model: bytes, x: np.ndarray, match: str) -> None:
    sess = session(model)
    with pytest.raises(Exception, match=match):
        sess.run(None, {"X": x})
