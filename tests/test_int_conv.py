"""PostConv and IntConv (csrc/kernels/int_conv.h): every kernel equals a numpy model of the ops bit for bit.

The numpy model (tests/conv_ops.py) is written from the definition in int_conv.h, independently of the C++ code.
Each kernel test runs once per kernel (scalar, avx2, avx512), forced with the ops' ``kernel`` attribute; a kernel the
CPU lacks is a skip that names what is missing (see conftest.kernel_params and ONNXQ_TEST_CPU_FLAGS).
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
from conftest import ISA_KERNELS, KERNELS, kernel_params, kernel_really_supported
from conv_ops import (
    GOOD,
    Case,
    case_data,
    clip_attributes,
    clipped,
    conv_model,
    error_model,
    pack,
    post_decode,
    quantize_input,
    raises_at_run,
    reference,
)
from onnx import TensorProto, helper, numpy_helper

from onnxq.native.domain import DOMAIN
from onnxq.native.session import session

CASES = [
    # PostConv: bits 2/3/4; 1x1 (no im2col), 3x3, 5x5, non-square; strides, pads, dilation, groups
    Case("PostConv", 4, 1, 3, (9, 11), 5, (3, 3), pads=(1, 1, 1, 1)),
    Case("PostConv", 4, 3, 8, (7, 7), 6, (5, 5), strides=(2, 2), pads=(2, 2, 2, 2), group=2, bias=False, calibrated=True),
    Case("PostConv", 3, 1, 16, (13, 10), 16, (1, 1)),
    Case("PostConv", 2, 1, 12, (12, 12), 9, (3, 3), pads=(1, 1, 1, 1), calibrated=True),
    Case("PostConv", 4, 1, 7, (10, 9), 7, (3, 3), pads=(1, 1, 1, 1), group=7, calibrated=True),  # depthwise
    Case("PostConv", 4, 1, 5, (11, 12), 9, (3, 5), strides=(2, 1), pads=(1, 2, 0, 1), dilations=(2, 2), bias=False),
    Case("PostConv", 3, 3, 7, (6, 13), 10, (3, 3), dilations=(2, 1), pads=(2, 1, 2, 1)),
    Case("PostConv", 4, 1, 32, (17, 15), 20, (3, 3), pads=(1, 1, 1, 1)),  # 255 pixels: 4 panels
    Case("PostConv", 4, 3, 9, (13, 14), 9, (3, 3), strides=(2, 2), pads=(1, 0, 2, 1), dilations=(1, 2), group=9),
    Case("PostConv", 3, 1, 4, (9, 10), 8, (5, 5), pads=(2, 2, 2, 2), group=4, bias=False),  # 2 outputs per input
    Case("PostConv", 4, 1, 40, (7, 7), 24, (3, 3), pads=(1, 1, 1, 1), calibrated=True),  # small image: lanes = channels
    Case("PostConv", 4, 2, 3, (5, 9), 16, (3, 3), pads=(1, 1, 1, 1)),
    # IntConv: bits 2/4/5/8 (5 and 8: one int8 per byte; AVX2 splits the weights)
    Case("IntConv", 4, 1, 3, (9, 11), 5, (3, 3), pads=(1, 1, 1, 1)),
    Case("IntConv", 4, 3, 16, (8, 9), 12, (1, 1), strides=(2, 2), calibrated=True),
    Case("IntConv", 4, 2, 16, (15, 14), 32, (1, 1), strides=(2, 3), calibrated=True),  # 1x1 strided: pixels picked
    Case("IntConv", 4, 1, 16, (9, 30), 16, (3, 3), pads=(1, 1, 1, 1), calibrated=True),  # GemmT, rows of 30: tiles 16 + 14
    Case("IntConv", 2, 1, 8, (7, 7), 6, (5, 5), pads=(2, 2, 2, 2), group=2, bias=False),
    Case("IntConv", 5, 1, 9, (10, 7), 7, (3, 3), strides=(2, 2), pads=(1, 0, 1, 0), calibrated=True),
    Case("IntConv", 8, 3, 12, (9, 9), 15, (3, 3), pads=(1, 1, 1, 1), group=3),
    Case("IntConv", 8, 1, 6, (13, 12), 6, (3, 3), pads=(1, 1, 1, 1), group=6, bias=False),  # depthwise
    Case("IntConv", 5, 1, 4, (12, 11), 8, (2, 4), dilations=(2, 2), pads=(0, 1, 2, 3)),
    Case("IntConv", 4, 1, 24, (11, 13), 17, (1, 1), pads=(1, 0, 0, 1)),
    Case("IntConv", 8, 1, 32, (16, 16), 8, (3, 3), pads=(1, 1, 1, 1), calibrated=True),
    Case("IntConv", 2, 3, 1, (9, 8), 4, (3, 3), strides=(1, 2)),  # one input channel, four outputs
    # one input channel, kernels wider than a column, from float X: quads of 4 kernel rows (int_conv_impl.h, UsesTapQuads)
    Case("IntConv", 8, 2, 1, (28, 28), 32, (3, 3), pads=(1, 1, 1, 1), calibrated=True),
    Case("IntConv", 4, 2, 1, (28, 28), 24, (4, 4), strides=(4, 4)),
    Case("PostConv", 4, 1, 1, (13, 11), 12, (5, 3), strides=(2, 1), pads=(2, 1, 1, 0), dilations=(2, 2)),
    Case("IntConv", 4, 2, 8, (15, 17), 12, (3, 5), strides=(2, 3), pads=(2, 1, 0, 3), dilations=(2, 1), calibrated=True),
    Case("IntConv", 8, 1, 6, (10, 11), 9, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=3),  # 2 channels per group
    Case("IntConv", 4, 1, 64, (9, 9), 64, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=64),  # depthwise, stride 2
    Case("IntConv", 8, 1, 32, (6, 6), 32, (3, 3), pads=(1, 1, 1, 1), bias=False),
    Case("IntConv", 4, 3, 3, (7, 7), 32, (3, 3), pads=(1, 1, 1, 1), calibrated=True),
    # 7 bits (|w| <= 64): AVX2 keeps them whole, its int16 sums widened after every one or two blocks of k
    Case("IntConv", 7, 1, 16, (9, 30), 16, (3, 3), pads=(1, 1, 1, 1), calibrated=True),  # GemmT
    Case("IntConv", 7, 2, 40, (20, 20), 8, (3, 3), pads=(1, 1, 1, 1)),  # Gemm, several panels
    Case("IntConv", 7, 1, 24, (7, 7), 48, (1, 1), bias=False),
    # AVX2: k in several cache chunks (many quads of channels), for Gemm and for GemmT
    Case("IntConv", 4, 1, 256, (20, 20), 8, (3, 3), pads=(1, 1, 1, 1)),
    Case("PostConv", 4, 2, 96, (7, 7), 16, (3, 3), pads=(1, 1, 1, 1), calibrated=True),
    # GemmT's AVX2 tiles of 6 pixels: 16, 15, 14 and 17 pixels leave 4, 3, 2 and 5
    Case("IntConv", 4, 1, 24, (4, 4), 32, (3, 3), pads=(1, 1, 1, 1)),
    Case("PostConv", 3, 1, 16, (3, 5), 8, (3, 3), pads=(1, 1, 1, 1)),
    Case("IntConv", 2, 2, 32, (2, 7), 16, (3, 3), pads=(1, 1, 1, 1), bias=False),
    Case("PostConv", 4, 1, 8, (1, 17), 16, (1, 3), pads=(0, 1, 0, 1)),
    # depthwise, blocks of 16 columns: rows wider than a block, exactly one block, no dropped
    # columns (1x1), int32 sums (sum |w| > 128: 7x7 taps), dilation
    Case("PostConv", 4, 2, 16, (20, 37), 16, (3, 3), pads=(1, 1, 1, 1), group=16),
    Case("IntConv", 4, 1, 8, (16, 16), 8, (3, 3), pads=(1, 1, 1, 1), group=8, calibrated=True),
    Case("PostConv", 4, 1, 6, (5, 16), 6, (1, 1), group=6),
    Case("IntConv", 4, 1, 5, (19, 18), 5, (7, 7), pads=(3, 3, 3, 3), group=5),
    Case("PostConv", 4, 1, 4, (18, 19), 8, (3, 3), dilations=(2, 3), group=4, bias=False),
    # depthwise with channels in vector lanes (rows < 16 pixels): 2 blocks of 16, the second with
    # 4 channels; images of fewer than 8 pixels; stride 2 with dilation
    Case("PostConv", 4, 2, 20, (2, 3), 20, (3, 3), pads=(1, 1, 1, 1), group=20, calibrated=True),
    Case("IntConv", 3, 1, 36, (11, 12), 36, (3, 3), strides=(2, 2), pads=(2, 1, 1, 2), dilations=(2, 1), group=36),
    # depthwise straight from the float input (DepthwiseFused: unit horizontal stride and dilation):
    # blocks of 64 (VNNI) / 32 (AVX2) columns over several rows, tails of the quantized channel,
    # asymmetric and missing padding, vertical stride and dilation, 1 to 8 taps per row (groups of
    # 4 or 2 taps with unused ones), 2 outputs per input channel, 8-bit weights (AVX2: not narrow,
    # not fused), rows of 1 to 3 pixels and rows wider than a block, many channels over tasks
    Case("IntConv", 4, 2, 19, (28, 28), 19, (3, 3), pads=(1, 1, 1, 1), group=19),
    Case("PostConv", 4, 1, 7, (7, 7), 7, (3, 3), pads=(1, 1, 1, 1), group=7, calibrated=True),
    Case("PostConv", 3, 1, 5, (13, 9), 5, (3, 3), pads=(0, 2, 1, 0), group=5, bias=False),
    Case("IntConv", 4, 1, 6, (17, 23), 6, (5, 5), pads=(2, 2, 2, 2), dilations=(2, 1), group=6),
    Case("IntConv", 4, 1, 4, (15, 70), 4, (3, 3), strides=(2, 1), pads=(1, 1, 1, 1), group=4, calibrated=True),
    Case("PostConv", 4, 1, 3, (9, 11), 3, (1, 8), pads=(0, 4, 0, 3), group=3),
    Case("IntConv", 2, 1, 3, (6, 5), 3, (2, 4), group=3, bias=False),
    Case("PostConv", 4, 1, 4, (10, 6), 8, (3, 1), pads=(1, 0, 1, 0), group=4),
    Case("IntConv", 8, 1, 5, (12, 13), 5, (3, 3), pads=(1, 1, 1, 1), group=5),
    Case("IntConv", 8, 1, 4, (9, 9), 8, (7, 7), pads=(3, 3, 3, 3), group=4, calibrated=True),
    Case("PostConv", 4, 3, 6, (1, 1), 6, (3, 3), pads=(1, 1, 1, 1), group=6),
    Case("IntConv", 4, 1, 5, (4, 3), 5, (3, 3), pads=(2, 1, 0, 1), group=5),
    Case("PostConv", 2, 1, 4, (3, 2), 4, (2, 2), pads=(1, 1, 1, 1), group=4),
    Case("IntConv", 4, 2, 80, (7, 7), 80, (3, 3), pads=(1, 1, 1, 1), group=80, calibrated=True),
    # depthwise with strides straight from the float input (DepthwiseFused, horizontal stride 1 or
    # 2: row phases, 2 bytes per column): MobileNetV2's stride-2 layers, padded widths rounded up to
    # the stride, asymmetric padding, 2 outputs per input and 5 taps per row, vertical stride 3
    # with dilation, 8-bit weights (AVX2: the old kernels), rows wider than a block, tiny images
    Case("PostConv", 4, 2, 24, (28, 28), 24, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=24),
    Case("IntConv", 4, 1, 16, (14, 14), 16, (3, 3), strides=(2, 2), pads=(0, 0, 1, 1), group=16, calibrated=True),
    Case("IntConv", 4, 1, 5, (9, 23), 10, (5, 5), strides=(1, 2), pads=(2, 2, 2, 2), group=5, bias=False),
    Case("PostConv", 3, 1, 6, (13, 11), 6, (3, 3), strides=(3, 2), pads=(1, 2, 0, 1), dilations=(2, 1), group=6),
    Case("IntConv", 8, 1, 4, (10, 70), 4, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=4),
    Case("PostConv", 4, 1, 3, (3, 4), 3, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=3, calibrated=True),
    Case("IntConv", 4, 3, 40, (7, 7), 40, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=40),
    # depthwise with 16 channels in the vector lanes (LanesFused, one output per input; VNNI:
    # images up to about 112x112, AVX2: inputs up to 16x16): blocks whose last one has 5, 1 or 8
    # channels, odd sizes, asymmetric and missing padding, horizontal stride 2 and vertical stride 2 or 3, vertical
    # dilation, 5 and 7 taps per row (2 groups of 4, generic kernel), whole blocks of 16 pixels
    # with tails of 9 or 0, 8-bit weights; then an image too large for it (DepthwiseFused)
    Case("IntConv", 4, 2, 37, (9, 11), 37, (3, 3), strides=(2, 1), pads=(1, 0, 2, 1), group=37),
    Case("PostConv", 4, 1, 17, (13, 6), 17, (5, 5), pads=(2, 2, 2, 2), dilations=(2, 1), group=17, calibrated=True),
    Case("IntConv", 8, 3, 33, (7, 7), 33, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=33),
    Case("PostConv", 3, 2, 16, (15, 15), 16, (3, 3), group=16, bias=False),
    Case("IntConv", 4, 1, 24, (8, 8), 24, (3, 3), pads=(1, 1, 1, 1), group=24, calibrated=True),
    Case("IntConv", 4, 1, 40, (14, 14), 40, (3, 3), strides=(3, 2), pads=(1, 1, 1, 1), group=40, calibrated=True),
    Case("PostConv", 4, 1, 24, (5, 31), 24, (1, 7), pads=(0, 3, 0, 3), group=24),
    Case("IntConv", 4, 1, 3, (150, 150), 3, (3, 3), pads=(1, 1, 1, 1), group=3),
    # 1x1 without padding: each channel plane interleaved in one run (tails of 9, 5 and 1 pixels after
    # blocks of 16; channels past the last whole quad); GemmT's epilogue with 1 to 3 blocks of 16
    # channels and partial blocks of 16 pixels
    Case("IntConv", 4, 2, 6, (5, 5), 10, (1, 1)),
    Case("PostConv", 4, 1, 13, (3, 7), 9, (1, 1), bias=False),
    Case("IntConv", 4, 1, 12, (7, 7), 6, (1, 1), group=2, calibrated=True),
    Case("PostConv", 4, 2, 24, (7, 7), 40, (1, 1)),
    Case("IntConv", 4, 1, 32, (14, 14), 36, (1, 1), bias=False),
]

# The clip after the epilogue, on each path: dense 3x3 (Gemm and GemmT's register epilogue), 1x1,
# depthwise stride 1 and 2 (DepthwiseFused, Depthwise, DepthwiseLanes for small images), IntConv and
# PostConv, with and without bias; bounds that clip most outputs, and Relu (clip_min = 0 alone).
CLIP_CASES = [
    Case("PostConv", 4, 1, 32, (17, 15), 20, (3, 3), pads=(1, 1, 1, 1), clip=(0.3, 0.6)),  # Gemm, 4 panels
    Case("IntConv", 8, 1, 256, (20, 20), 8, (3, 3), pads=(1, 1, 1, 1), clip="relu"),  # AVX2 split weights
    Case("IntConv", 4, 1, 24, (4, 4), 32, (3, 3), pads=(1, 1, 1, 1), clip=(0.1, 0.9)),  # GemmT
    Case("PostConv", 4, 2, 96, (7, 7), 16, (3, 3), pads=(1, 1, 1, 1), calibrated=True, clip="relu"),  # GemmT
    Case("IntConv", 4, 3, 3, (7, 7), 32, (3, 3), pads=(1, 1, 1, 1), bias=False, clip=(0.45, 0.55)),
    Case("IntConv", 4, 2, 6, (5, 5), 10, (1, 1), clip=(0.2, None)),  # 1x1
    Case("PostConv", 4, 2, 24, (7, 7), 40, (1, 1), clip=(None, 0.5)),
    Case("IntConv", 4, 1, 24, (11, 13), 17, (1, 1), pads=(1, 0, 0, 1), bias=False, clip="relu"),
    Case("IntConv", 4, 2, 19, (28, 28), 19, (3, 3), pads=(1, 1, 1, 1), group=19, clip=(0.25, 0.75)),  # DepthwiseFused
    Case("PostConv", 4, 2, 16, (20, 37), 16, (3, 3), pads=(1, 1, 1, 1), group=16, clip="relu"),
    Case("PostConv", 4, 2, 24, (28, 28), 24, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=24, clip=(0.4, 0.9)),  # stride 2
    Case("IntConv", 4, 1, 16, (14, 14), 16, (3, 3), strides=(2, 2), pads=(0, 0, 1, 1), group=16, calibrated=True, clip="relu"),
    Case("IntConv", 8, 1, 4, (10, 70), 4, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=4, clip=(0.3, 0.7)),  # AVX2: Depthwise
    Case("IntConv", 3, 1, 36, (11, 12), 36, (3, 3), strides=(2, 2), pads=(2, 1, 1, 2), dilations=(2, 1), group=36, clip=(0.2, 0.8)),
    Case("PostConv", 4, 1, 4, (18, 19), 8, (3, 3), dilations=(2, 3), group=4, bias=False, clip=(0.3, 0.6)),  # Depthwise
    Case("PostConv", 4, 2, 20, (2, 3), 20, (3, 3), pads=(1, 1, 1, 1), group=20, calibrated=True, clip=(0.3, 0.7)),  # lanes
    Case("IntConv", 4, 3, 40, (7, 7), 40, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=40, clip="relu"),
    # LanesFused, with and without bias, IntConv 8-bit and PostConv
    Case("IntConv", 4, 2, 37, (9, 11), 37, (3, 3), strides=(2, 1), pads=(1, 0, 2, 1), group=37, clip=(0.3, 0.7)),
    Case("IntConv", 8, 3, 33, (7, 7), 33, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=33, clip="relu"),
    Case("PostConv", 3, 2, 16, (15, 15), 16, (3, 3), group=16, bias=False, clip=(0.2, 0.6)),
]


@functools.lru_cache(maxsize=4)
def _expected(case: Case) -> tuple:
    """The case's inputs, clip attributes and reference outputs for two runs, computed once for all the kernels.

    Run 1 feeds another X to the same session: the weights prepared by run 0 are used again.
    """
    x, codes, scale, bias, x_scale, x_zero_point = case_data(case, seed=zlib.crc32(str(case).encode()))
    unclipped = reference(case, x, codes, scale, bias, x_scale, x_zero_point)
    clip = clip_attributes(case, unclipped)
    expected = clipped(unclipped, clip)
    if clip:  # the bounds clip a good share of the outputs, and leave some
        share = np.mean(expected != unclipped)
        assert 0.1 < share < 0.95, share
    x_again = x[::-1] * np.float32(0.7) - np.float32(0.3)
    expected_again = clipped(reference(case, x_again, codes, scale, bias, x_scale, x_zero_point), clip)
    model = functools.partial(conv_model, case, pack(codes, case.bits), scale, bias, x_scale, x_zero_point, **clip)
    return model, [(x, expected), (x_again, expected_again)]


# (kernel is the inner loop: the kernels of one case run one after another, on its cached reference)
@pytest.mark.parametrize("kernel", kernel_params())
@pytest.mark.parametrize("case", CASES + CLIP_CASES, ids=str)
def test_every_kernel_equals_numpy_bit_for_bit(case, kernel):
    attribute = KERNELS[kernel]
    model, runs = _expected(case)
    sess = session(model(kernel=attribute))
    for run, (x, want) in enumerate(runs):
        (y,) = sess.run(None, {"X": x})
        assert y.dtype == np.float32 and y.shape == want.shape, kernel
        np.testing.assert_array_equal(y, want, err_msg=f"kernel {kernel}, run {run}")


PER_SAMPLE_CASES = [
    replace(case, n=3, calibrated=True)
    for case in CASES
    if case.op == "IntConv" and case.bits in (4, 8) or case.op == "PostConv" and case.bits == 4
][::2] + [
    Case("IntConv", 8, 2, 16, (12, 12), 16, (3, 3), pads=(1, 1, 1, 1), group=16, calibrated=True),
    Case("PostConv", 4, 3, 16, (12, 12), 16, (3, 3), pads=(1, 1, 1, 1), group=16, calibrated=True),  # DepthwiseFused on AVX2 too
    Case("IntConv", 4, 3, 24, (5, 30), 24, (3, 3), pads=(1, 1, 1, 1), group=24, calibrated=True),
    # with the clip: Gemm, GemmT, DepthwiseFused at stride 2, DepthwiseLanes
    Case("IntConv", 4, 2, 32, (16, 16), 8, (3, 3), pads=(1, 1, 1, 1), calibrated=True, clip=(0.3, 0.7)),
    Case("PostConv", 4, 3, 24, (4, 4), 32, (3, 3), pads=(1, 1, 1, 1), calibrated=True, clip="relu"),
    Case("PostConv", 4, 2, 24, (14, 14), 24, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=24, calibrated=True, clip=(0.2, 0.6)),
    Case("IntConv", 4, 3, 20, (3, 3), 20, (3, 3), pads=(1, 1, 1, 1), group=20, calibrated=True, clip=(0.4, None)),
    # LanesFused: per-sample steps per block of 16 channels
    Case("IntConv", 8, 3, 37, (7, 7), 37, (3, 3), pads=(1, 1, 1, 1), group=37, calibrated=True),
    Case("PostConv", 4, 2, 40, (14, 14), 40, (3, 3), strides=(2, 2), pads=(0, 1, 1, 0), group=40, calibrated=True, clip=(0.3, None)),
]


def _per_sample_steps(case: Case, seed: int) -> np.ndarray:
    """One positive step per sample, as ASQ's adapter gives them: shape (N, 1), about 2x apart."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.008, 0.03, (case.n, 1)).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _per_sample_expected(case: Case) -> tuple:
    """X, the packed codes, scale, bias, steps, zero point and clip of a per-sample case, and its reference output."""
    seed = zlib.crc32(str(case).encode())
    x, codes, scale, bias, _, x_zero_point = case_data(case, seed=seed)
    steps = _per_sample_steps(case, seed)
    single = replace(case, n=1)
    unclipped = np.concatenate([reference(single, x[n : n + 1], codes, scale, bias, steps[n, 0], x_zero_point) for n in range(case.n)])
    clip = clip_attributes(case, unclipped)
    return x, pack(codes, case.bits), scale, bias, steps, x_zero_point, clip, clipped(unclipped, clip)


@pytest.mark.parametrize("kernel", kernel_params("auto", *ISA_KERNELS))
@pytest.mark.parametrize("case", PER_SAMPLE_CASES, ids=str)
def test_per_sample_steps_equal_one_sample_at_a_time(case, kernel):
    """x_scale with N elements: sample n is quantized with step n and its factors use step n (int_conv.h).

    Each kernel's batch output equals, bit for bit, the numpy model of the definition (each sample quantized and
    convolved on its own) and the same kernel run sample by sample with the scalar step. The default kernel (auto)
    also takes the steps with shape (N,).
    """
    attribute = KERNELS[kernel]
    x, w, scale, bias, steps, x_zero_point, clip, want = _per_sample_expected(case)
    single = replace(case, n=1)
    (y,) = session(conv_model(case, w, scale, bias, steps, x_zero_point, kernel=attribute, **clip)).run(None, {"X": x})
    np.testing.assert_array_equal(y, want, err_msg=f"kernel {kernel}")
    for n in range(case.n):
        (y_n,) = session(conv_model(single, w, scale, bias, steps[n, 0], x_zero_point, kernel=attribute, **clip)).run(None, {"X": x[n : n + 1]})
        np.testing.assert_array_equal(y[n : n + 1], y_n, err_msg=f"kernel {kernel}, sample {n}")
    if kernel == "auto":  # steps of shape (N,): the same output
        (y,) = session(conv_model(case, w, scale, bias, steps.reshape(-1), x_zero_point, **clip)).run(None, {"X": x})
        np.testing.assert_array_equal(y, want)


def test_per_sample_steps_with_one_sample_and_equal_steps():
    """N steps that are all equal give the scalar step's output; one sample with a (1, 1) step is the scalar case."""
    case = replace(GOOD, n=4, calibrated=True)
    x, codes, scale, bias, x_scale, x_zero_point = case_data(case, seed=11)
    w = pack(codes, 4)
    (want,) = session(conv_model(case, w, scale, bias, x_scale, x_zero_point)).run(None, {"X": x})
    np.testing.assert_array_equal(want, reference(case, x, codes, scale, bias, x_scale, x_zero_point))
    (y,) = session(conv_model(case, w, scale, bias, np.full((4, 1), x_scale, np.float32), x_zero_point)).run(None, {"X": x})
    np.testing.assert_array_equal(y, want)
    (y1,) = session(conv_model(replace(case, n=1), w, scale, bias, np.full((1, 1), x_scale, np.float32), x_zero_point)).run(None, {"X": x[:1]})
    np.testing.assert_array_equal(y1, want[:1])


@pytest.mark.parametrize("kernel", kernel_params())
@pytest.mark.parametrize("op,code,density", [("IntConv", -8, 1.0), ("PostConv", 7, 1.0), ("PostConv", -6, 1.0), ("IntConv", -8, 0.03),
                                             ("IntConv", -64, 1.0), ("IntConv", 64, 0.03), ("IntConv", -65, 1.0)])
def test_int16_sums_at_their_limit(op, code, density, kernel):
    """x_q = 255 everywhere and the largest weights: AVX2's int16 sums reach 255 * 128 = 32640 before each widening.

    |w| = 8 (4-bit codes), dense: every run of k is as short as it can be (8 blocks of 4 k); sparse: runs longer than a
    cache chunk. |w| = 64 (8-bit codes that fit 7 bits): one block alone fills the budget (runs of one block). |w| = 65:
    the weights come split into two parts.
    """
    attribute = KERNELS[kernel]
    bits = 4 if abs(code) <= 8 else 8
    case = Case(op, bits, 1, 64, (9, 10), 8, (3, 3), pads=(1, 1, 1, 1))
    rng = np.random.default_rng(3)
    codes = np.where(rng.random((case.m, case.k)) < density, code, 0).astype(np.int8)
    x = np.ones((case.n, case.c, *case.hw), np.float32)  # DynamicQuantizeLinear: s_x = 1/255, z_x = 0, x_q = 255
    scale = np.full(case.m, 0.01, np.float32)
    want = reference(case, x, codes, scale, None, None, None)
    (y,) = session(conv_model(case, pack(codes, bits), scale, None, None, None, kernel=attribute)).run(None, {"X": x})
    np.testing.assert_array_equal(y, want, err_msg=kernel)


@pytest.mark.parametrize("kernel", kernel_params())
@pytest.mark.parametrize("hw,m", [((9, 10), 8), ((4, 4), 16)], ids=["gemm", "gemm-t"])
@pytest.mark.parametrize("negative,lit", [(-7, 0), (-8, 1)], ids=["positive-sums", "negative-sums"])
def test_int16_sums_at_their_limit_with_both_signs(hw, m, negative, lit, kernel):
    """w = 7 on even input channels and `negative` on odd ones, x_q = 255 on the channels of one parity (`lit`) and 0
    on the others: each lane's sum of |w| is about twice what it takes of either sign, and its sum reaches 255 * 126 =
    32130 (runs of 18 blocks of 4 k) or -255 * 128 = -32640 (runs of 16) at the end of each of AVX2's int16 runs
    (Int16Runs bounds the sums of positive w and of negative |w| each by 128), by Gemm (9x10) and GemmT (4x4)."""
    case = Case("IntConv", 4, 1, 64, hw, m, (3, 3), pads=(1, 1, 1, 1))
    per_channel = np.where(np.arange(case.c) % 2 == 0, 7, negative).astype(np.int8)
    codes = np.ascontiguousarray(np.broadcast_to(per_channel[None, :, None], (case.m, case.c, 9)).reshape(case.m, case.k))
    x = np.zeros((case.n, case.c, *case.hw), np.float32)
    x[:, lit::2] = 1.0  # DynamicQuantizeLinear: s_x = 1/255, z_x = 0, x_q = 255 or 0
    scale = np.full(case.m, 0.01, np.float32)
    want = reference(case, x, codes, scale, None, None, None)
    (y,) = session(conv_model(case, pack(codes, 4), scale, None, None, None, kernel=KERNELS[kernel])).run(None, {"X": x})
    np.testing.assert_array_equal(y, want, err_msg=kernel)


@pytest.mark.parametrize("kernel", kernel_params())
@pytest.mark.parametrize("op,bits", [("PostConv", 4), ("IntConv", 8)])
def test_weights_fed_at_run_time(op, bits, kernel):
    """W as a graph input (not a constant initializer): prepared on every run, including a changed W."""
    attribute = KERNELS[kernel]
    case = Case(op, bits, 2, 6, (8, 7), 4, (3, 3), pads=(1, 1, 1, 1))
    x, codes, scale, bias, x_scale, x_zero_point = case_data(case, seed=5)
    sess = session(conv_model(case, pack(codes, bits), scale, bias, x_scale, x_zero_point, kernel=attribute, w_input=True))
    for flip in (codes, -codes):
        (y,) = sess.run(None, {"X": x, "W": pack(flip, bits)})
        np.testing.assert_array_equal(y, reference(case, x, flip, scale, bias, x_scale, x_zero_point))


@pytest.mark.parametrize("hw", [(20, 20), (48, 48)])  # GemmT, then Gemm (see SimdConv)
def test_auto_kernel_on_a_larger_layer_with_one_and_two_threads(hw):
    """Kernel 0 (what users get) on 64 -> 64 channels, 3x3: many panels and row blocks, split over threads or not."""
    case = Case("PostConv", 4, 2, 64, hw, 64, (3, 3), pads=(1, 1, 1, 1))
    x, codes, scale, bias, _, _ = case_data(case, seed=7)
    model = conv_model(case, pack(codes, 4), scale, bias, None, None, kernel=0)
    want = reference(case, x, codes, scale, bias, None, None)
    for threads in (1, 2):
        (y,) = session(model, threads=threads).run(None, {"X": x})
        np.testing.assert_array_equal(y, want, err_msg=f"{threads} threads")


def _quantize_exact(x: np.ndarray, s: np.float32, z: int) -> np.ndarray:
    """QuantizeOne (int_conv.h) elementwise, with a NaN giving 0: clamp(round_half_even(x / s) + z, 0, 255)."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        v = np.clip(x / s, np.float32(-z), np.float32(255 - z))
    return np.where(np.isnan(v), 0, np.rint(np.nan_to_num(v)) + z).astype(np.int64)


@pytest.mark.parametrize("kernel", kernel_params())
@pytest.mark.parametrize("x_scale,z", [(0.1, 100), (1 / 255, 0), (3.0, 255), (1e-39, 7), (2.0**101, 128), (2.0**-100, 40)])
def test_fused_quantization_near_ties_and_special_values(x_scale, z, kernel):
    """Depthwise ops quantize X with x * (1/s) on a fixed-point grid, and divide only near ties: every kernel
    still gives QuantizeOne's codes, for values at, next to and between half-integer multiples of s, NaN,
    infinities and huge values, and for scales whose inverse the fast path cannot use (1e-39, 2^101)."""
    attribute = KERNELS[kernel]
    s = np.float32(x_scale)
    k = np.arange(-300, 300, dtype=np.float32)
    ties = (k + np.float32(0.5)) * s
    values = np.concatenate(
        [ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf)), k * s, (k + np.float32(0.25)) * s]
    )
    values = np.concatenate([values, np.array([np.nan, np.inf, -np.inf, 3e38, -3e38, 0.0, -0.0, 1e-45], np.float32)])
    c = 4
    x = np.resize(values, (1, c, 31, 37)).astype(np.float32)
    x[0, 1] = x[0, 1, ::-1, ::-1]
    case = Case("IntConv", 8, 1, c, (31, 37), c, (1, 1), group=c, bias=False)
    codes = np.ones((c, 1), np.int8)
    scale = np.ones(c, np.float32)
    want = ((_quantize_exact(x, s, z) - z).astype(np.float32) * s).astype(np.float32)
    (y,) = session(conv_model(case, pack(codes, 8), scale, None, s, np.uint8(z), kernel=attribute)).run(None, {"X": x})
    np.testing.assert_array_equal(y, want, err_msg=kernel)


@pytest.mark.parametrize("kernel", kernel_params())
def test_post_conv_by_hand(kernel):
    """1x1, x = (3, 1), s_x = 1, z_x = 0, codes (7, -6) at 4 bits, scale 2: levels 2 * (1, -2^-0.5).

    c_e = 1 * 2 * 2^-3 = 0.25; code 7: w_even = 8, acc_e = 24; code -6: w_odd = -8, acc_o = -8;
    y = 24 * 0.25 + (-8) * (0.25 * 0.70710678f) = 6 - sqrt(2).
    """
    attribute = KERNELS[kernel]
    case = Case("PostConv", 4, 1, 2, (1, 1), 1, (1, 1), bias=False, calibrated=True)
    w = pack(np.array([[7, -6]], np.int8), 4)
    scale = np.array([2.0], np.float32)
    expected = np.float32(24) * np.float32(0.25) + np.float32(-8) * (np.float32(0.25) * np.float32(0.70710678118654752))
    assert abs(float(expected) - (6 - math.sqrt(2))) < 1e-6
    x = np.array([3.0, 1.0], np.float32).reshape(1, 2, 1, 1)
    (y,) = session(conv_model(case, w, scale, None, np.float32(1), np.uint8(0), kernel=attribute)).run(None, {"X": x})
    assert y.reshape(()) == expected


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_post_conv_is_close_to_float_conv_with_dequantized_weights(bits):
    """Only the activations' rounding differs: |y - conv(x, W)| <= s_x / 2 * sum|W[m]|, plus float rounding."""
    case = Case("PostConv", bits, 2, 10, (9, 9), 8, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=2)
    x, codes, scale, bias, _, _ = case_data(case, seed=bits)
    (y,) = session(conv_model(case, pack(codes, bits), scale, bias, None, None)).run(None, {"X": x})
    weights = post_decode(codes, scale, bits)
    assert np.abs(weights).max() > 0
    conv = helper.make_node("Conv", ["X", "W", "B"], ["Y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], group=2)
    graph = helper.make_graph(
        [conv],
        "conv",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(weights.reshape(8, 5, 3, 3), "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})
    _, s_x, _ = quantize_input(x, None, None)
    bound = s_x / 2 * np.abs(weights).sum(axis=1)[:, None, None] + 1e-5 * (np.abs(want) + 1)
    assert np.all(np.abs(y - want) <= bound)
    assert np.abs(y - want).max() > 0  # (the quantization is real)


@pytest.mark.parametrize("kernel", kernel_params())
def test_malformed_inputs_are_onnxruntime_errors(kernel):
    k = KERNELS[kernel]
    x, model = error_model(GOOD, kernel=k)
    raises_at_run(model, x[0], r"PostConv: input X must have rank 4 \(N, C, H, W\), got shape \(4, 6, 6\)")
    raises_at_run(model, x[:, :3], r"PostConv: W has 18 bytes per output channel, but C/group\*kh\*kw = 3\*3\*3 = 27 codes")
    x, model = error_model(GOOD, kernel=k, group=3)
    raises_at_run(model, x, r"X has 4 channels, not divisible by group=3")
    x, model = error_model(replace(GOOD, c=6, m=4), kernel=k, group=3)
    raises_at_run(model, x, r"W has 4 output channels, not divisible by group=3")
    x, model = error_model(GOOD, kernel=k, scale=np.ones(3, np.float32))
    raises_at_run(model, x, r"input scale must have shape \(M,\) = \(4,\) like W's rows, got \(3,\)")
    x, model = error_model(GOOD, kernel=k, bias=np.ones(5, np.float32))
    raises_at_run(model, x, r"input B must have shape \(M,\) = \(4,\) like W's rows, got \(5,\)")
    x, model = error_model(GOOD, kernel=k, w=np.zeros((4, 17), np.uint8))
    raises_at_run(model, x, r"W has 17 bytes per output channel, but .* = 36 codes at 4 bits take 18")
    x, model = error_model(GOOD, kernel=k, x_scale=np.float32(0), x_zero_point=np.uint8(0))
    raises_at_run(model, x, r"x_scale must be positive and finite")
    x, model = error_model(GOOD, kernel=k, pads=[0, 0, 0, 0], dilations=[1, 2])
    raises_at_run(model, x[:, :, :2], r"padded input \(2 x 6\) is smaller than the dilated kernel \(3 x 5\)")
    x, model = error_model(replace(GOOD, op="IntConv", bits=8), kernel=k, w=np.zeros((4, 18), np.uint8))
    raises_at_run(model, x, r"IntConv: W has 18 bytes per output channel, .* 36 codes at 8 bits take 36")


@pytest.mark.parametrize("kernel", kernel_params())
@pytest.mark.parametrize("bits,code", [(4, -8), (3, 4), (3, -5), (2, 2), (2, -2)])
def test_post_codes_out_of_range_are_onnxruntime_errors(bits, code, kernel):
    attribute = KERNELS[kernel]
    case = replace(GOOD, bits=bits)
    codes = np.zeros((case.m, case.k), np.int8)
    codes[2, 5] = code
    x, model = error_model(case, kernel=attribute, w=pack(codes, bits))
    raises_at_run(model, x, rf"PostConv: code {code} at W\[2, code 5\] is out of range for {bits}-bit POST codes")


@pytest.mark.parametrize(
    "op,overrides,match",
    [
        ("PostConv", dict(bits=5), r"PostConv: attribute bits must be 2, 3 or 4 \(POST codes\), not 5"),
        ("PostConv", dict(bits=1), r"attribute bits must be 2, 3 or 4"),
        ("IntConv", dict(bits=9), r"IntConv: attribute bits must be in 2..8, not 9"),
        ("IntConv", dict(kernel_shape=None), r"IntConv: attribute kernel_shape \(2 ints\) is required"),
        ("IntConv", dict(kernel_shape=[3]), r"attribute kernel_shape must be 2 positive ints"),
        ("IntConv", dict(strides=[0, 1]), r"attribute strides must be 2 positive ints"),
        ("IntConv", dict(pads=[1, 1]), r"attribute pads must be 4 non-negative ints"),
        ("IntConv", dict(dilations=[1, -1]), r"attribute dilations must be 2 positive ints"),
        ("IntConv", dict(group=0), r"attribute group must be >= 1"),
        ("IntConv", dict(kernel=7), r"attribute kernel must be 0 \(auto\), 1 \(scalar\), 2 \(AVX2\) or 3 \(AVX-512\), not 7"),
        ("IntConv", dict(clip_min=6.0, clip_max=0.0), r"IntConv: attribute clip_min \(6\.0+\) must be <= clip_max \(0\.0+\)"),
        ("PostConv", dict(clip_min=0.5), None),  # (one bound alone is fine)
        ("PostConv", dict(clip_min=float("nan")), r"PostConv: attributes clip_min and clip_max must not be NaN"),
        ("IntConv", dict(clip_min=0.0, clip_max=float("nan")), r"IntConv: attributes clip_min and clip_max must not be NaN"),
        ("PostConv", dict(clip_min=1.0, clip_max=0.5), r"PostConv: attribute clip_min \(1\.0+\) must be <= clip_max \(0\.50+\)"),

        ("IntConv", dict(hardswish=2), r"IntConv: attribute hardswish must be 0 or 1, not 2"),
        ("PostConv", dict(hardswish=1, hardswish_alpha=float("inf")), r"PostConv: attributes hardswish_alpha and hardswish_beta must be finite"),
        ("IntConv", dict(hardswish=1, hardswish_beta=float("nan")), r"IntConv: attributes hardswish_alpha and hardswish_beta must be finite"),
    ],
)
def test_bad_attributes_are_session_errors(op, overrides, match):
    case = replace(GOOD, op=op, bits=4)
    _, model = error_model(case, **overrides)
    if match is None:
        session(model)
        return
    with pytest.raises(Exception, match=match):
        session(model)


def test_int8_weights_are_a_type_error():
    """W must be the uint8 tensor of packed codes; onnxruntime checks the declared input types."""
    _, codes, scale, bias, _, _ = case_data(GOOD, seed=1)
    with pytest.raises(Exception, match=r"tensor\(int8\).*PostConv"):
        session(conv_model(GOOD, pack(codes, 4).view(np.int8), scale, bias, None, None))


def test_x_scale_without_zero_point_is_an_error():
    x, codes, scale, bias, _, _ = case_data(GOOD, seed=1)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("PostConv", ["X", "W", "scale", "", "x_scale"], ["Y"], domain=DOMAIN, bits=4, kernel_shape=[3, 3])],
            "g",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
            initializer=[
                numpy_helper.from_array(pack(codes, 4), "W"),
                numpy_helper.from_array(scale, "scale"),
                numpy_helper.from_array(np.float32(0.1), "x_scale"),
            ],
        ),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)],
    )
    raises_at_run(model.SerializeToString(), x, r"PostConv: x_scale and x_zero_point must be given together")


@pytest.mark.parametrize("kernel", ["avx2", "avx512"])
def test_kernel_the_cpu_lacks_is_an_error(kernel):
    """The op library checks the real CPU (ONNXQ_TEST_CPU_FLAGS does not reach it): only a CPU without the kernel can test this."""
    if kernel_really_supported(kernel):
        pytest.skip(f"this CPU has {kernel}: the op library runs it, so there is no refusal to see")
    x, model = error_model(GOOD, kernel=KERNELS[kernel])
    with pytest.raises(Exception, match="which this CPU does not support"):
        session(model).run(None, {"X": x})


def test_process_survives_errors():
    """After all the errors above, a good model still runs and is right."""
    x, codes, scale, bias, x_scale, x_zero_point = case_data(GOOD, seed=3)
    (y,) = session(conv_model(GOOD, pack(codes, 4), scale, bias, x_scale, x_zero_point)).run(None, {"X": x})
    np.testing.assert_array_equal(y, reference(GOOD, x, codes, scale, bias, x_scale, x_zero_point))
