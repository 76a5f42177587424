"""Malformed inputs to the op library's ops: each is an onnxruntime error with a clear message, or, where the ops' definition
gives one, an exact (empty or padding-only) result; never a crash.

tests/test_sanitizers.py runs this file (with test_int_conv.py, test_int_conv_u8.py and test_library.py) against the library built under
AddressSanitizer and UBSan, so that a read or write out of bounds or an integer overflow behind any of these fails loudly.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import ISA_KERNELS, KERNELS, skip_reason
from conv_ops import GOOD, Case, case_data, conv_model, error_model, pack, raises_at_run, reference
from onnx import TensorProto, helper

from onnxq.native.domain import DOMAIN
from onnxq.native.session import session

BIG = 2**62  # far past any real size: sums and products of such attributes overflow int64
F, U8 = TensorProto.FLOAT, TensorProto.UINT8


@pytest.fixture(params=ISA_KERNELS)
def kernel(request) -> int:
    """Every kernel, as the ops' `kernel` attribute; a kernel this CPU lacks skips the test, saying what is missing."""
    reason = skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return KERNELS[request.param]


def _w_input_model(case: Case, kernel: int) -> bytes:
    """The case's model with W a graph input, so a test can feed W of any shape."""
    _, codes, scale, bias, x_scale, x_zero_point = case_data(case, seed=3)
    return conv_model(case, pack(codes, case.bits), scale, bias, x_scale, x_zero_point, kernel=kernel, w_input=True)


def test_inputs_of_the_wrong_rank(kernel):
    x, model = error_model(GOOD, kernel=kernel)
    raises_at_run(model, x[..., None], r"PostConv: input X must have rank 4 \(N, C, H, W\), got shape \(1, 4, 6, 6, 1\)")
    raises_at_run(model, x[0, 0], r"input X must have rank 4 \(N, C, H, W\), got shape \(6, 6\)")
    raises_at_run(model, np.array(1, np.float32), r"input X must have rank 4 \(N, C, H, W\), got shape \(\)")
    sess = session(_w_input_model(GOOD, kernel))
    for w, shape in [(np.zeros(72, np.uint8), r"\(72,\)"), (np.zeros((4, 2, 9), np.uint8), r"\(4, 2, 9\)")]:
        with pytest.raises(Exception, match=rf"PostConv: input W must have rank 2 \(M, row_bytes\), got shape {shape}"):
            sess.run(None, {"X": x, "W": w})
    for scale, shape in [(np.array(1, np.float32), r"\(\)"), (np.ones((4, 1), np.float32), r"\(4, 1\)")]:
        x, model = error_model(GOOD, kernel=kernel, scale=scale)
        raises_at_run(model, x, rf"input scale must have shape \(M,\) = \(4,\) like W's rows, got {shape}")


def test_weights_of_the_wrong_size(kernel):
    """W's rows must hold exactly K codes: too short (the kernels would read past W) or too long."""
    x, codes, *_ = case_data(GOOD, seed=3)
    sess = session(_w_input_model(GOOD, kernel))
    for row_bytes in (0, 1, 17, 19, 36):
        with pytest.raises(Exception, match=rf"PostConv: W has {row_bytes} bytes per output channel, but .* = 36 codes at 4 bits take 18"):
            sess.run(None, {"X": x, "W": np.zeros((4, row_bytes), np.uint8)})
    with pytest.raises(Exception, match=r"input scale must have shape \(M,\) = \(8,\) like W's rows, got \(4,\)"):
        sess.run(None, {"X": x, "W": np.zeros((8, 18), np.uint8)})
    (y,) = sess.run(None, {"X": x, "W": pack(codes, 4)})  # the session still runs
    _, _, scale, bias, x_scale, x_zero_point = case_data(GOOD, seed=3)
    np.testing.assert_array_equal(y, reference(GOOD, x, codes, scale, bias, x_scale, x_zero_point))


def test_activation_quantization_of_the_wrong_shape_or_value(kernel):
    calibrated = replace(GOOD, calibrated=True)
    for x_scale, x_zero_point, match in [
        (np.ones(2, np.float32), np.uint8(0), r"x_scale must have 1 element or N = 1 \(one step per sample\), got shape \(2,\)"),
        (np.ones((1, 0), np.float32), np.uint8(0), r"x_scale must have 1 element or N = 1 \(one step per sample\), got shape \(1, 0\)"),
        (np.float32(1), np.zeros(0, np.uint8), r"x_zero_point must be one uint8 value, got shape \(0,\)"),
        (np.float32(1), np.zeros((1, 2), np.uint8), r"x_zero_point must be one uint8 value, got shape \(1, 2\)"),
        (np.float32(np.nan), np.uint8(0), r"x_scale must be positive and finite, got nan"),
        (np.float32(np.inf), np.uint8(0), r"x_scale must be positive and finite, got inf"),
        (np.float32(-0.5), np.uint8(0), r"x_scale must be positive and finite, got -0.5"),
    ]:
        x, model = error_model(calibrated, kernel=kernel, x_scale=x_scale, x_zero_point=x_zero_point)
        raises_at_run(model, x, match)


def test_per_sample_steps_of_the_wrong_count_or_value(kernel):
    """x_scale with one step per sample: the count must be N (or 1), every step positive and finite."""
    batch = replace(GOOD, n=3, calibrated=True)
    good = np.array([[0.02], [0.01], [0.03]], np.float32)
    for x_scale, x_zero_point, match in [
        (np.ones(2, np.float32), np.uint8(3), r"PostConv: x_scale must have 1 element or N = 3 \(one step per sample\), got shape \(2,\)"),
        (np.ones((3, 2), np.float32), np.uint8(3), r"x_scale must have 1 element or N = 3 .*got shape \(3, 2\)"),
        (good, np.full(3, 3, np.uint8), r"x_zero_point must be one uint8 value, got shape \(3,\)"),
        (np.array([[0.02], [np.nan], [0.03]], np.float32), np.uint8(3), r"PostConv: x_scale\[1\] must be positive and finite, got nan"),
        (np.array([0.02, 0.01, -np.inf], np.float32), np.uint8(3), r"x_scale\[2\] must be positive and finite, got -inf"),
        (np.array([0.0, 0.01, 0.02], np.float32), np.uint8(3), r"x_scale\[0\] must be positive and finite, got 0"),
    ]:
        x, model = error_model(batch, kernel=kernel, x_scale=x_scale, x_zero_point=x_zero_point)
        raises_at_run(model, x, match)
    x, model = error_model(batch, kernel=kernel, x_scale=good, x_zero_point=np.uint8(3))
    raises_at_run(model, x[:2], r"x_scale must have 1 element or N = 2 .*got shape \(3, 1\)")  # a batch of another size
    (y,) = session(model).run(None, {"X": x})
    assert y.shape == (3, 4, 6, 6)
    _, codes, scale, bias, _, _ = case_data(batch, seed=3)  # (error_model's data)
    single = replace(batch, n=1)
    want = np.concatenate([reference(single, x[n : n + 1], codes, scale, bias, good[n, 0], np.uint8(3)) for n in range(3)])
    np.testing.assert_array_equal(y, want)  # the good steps give the definition's output


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(group=-1), r"PostConv: attribute group must be >= 1"),
        (dict(group=-(2**63)), r"attribute group must be >= 1"),
        (dict(kernel_shape=[0, 3]), r"attribute kernel_shape must be 2 positive ints"),
        (dict(kernel_shape=[3, 3, 3]), r"attribute kernel_shape must be 2 positive ints"),
        (dict(strides=[1, -(2**63)]), r"attribute strides must be 2 positive ints"),
        (dict(pads=[0, -1, 0, 0]), r"attribute pads must be 4 non-negative ints"),
        (dict(dilations=[0, 1]), r"attribute dilations must be 2 positive ints"),
        (dict(kernel=-1), r"attribute kernel must be 0 \(auto\), 1 \(scalar\), 2 \(AVX2\) or 3 \(AVX-512\), not -1"),
    ],
)
def test_negative_or_zero_attributes_are_session_errors(overrides, match):
    _, model = error_model(GOOD, **overrides)
    with pytest.raises(Exception, match=match):
        session(model)


def test_groups_that_do_not_divide_the_channels(kernel):
    x, model = error_model(GOOD, kernel=kernel, group=8)
    raises_at_run(model, x, r"X has 4 channels, not divisible by group=8")
    x, model = error_model(replace(GOOD, c=8, m=4), kernel=kernel, group=8)
    raises_at_run(model, x, r"W has 4 output channels, not divisible by group=8")


def test_kernel_larger_than_the_input(kernel):
    x, model = error_model(replace(GOOD, pads=(0, 0, 0, 0)), kernel=kernel, kernel_shape=[7, 3], w=np.zeros((4, 42), np.uint8))
    raises_at_run(model, x, r"PostConv: the padded input \(6 x 6\) is smaller than the dilated kernel \(7 x 3\)")
    x, model = error_model(GOOD, kernel=kernel)
    raises_at_run(model, x[:, :, :0], r"the padded input \(2 x 8\) is smaller than the dilated kernel \(3 x 3\)")
    raises_at_run(model, x[:, :, :, :0], r"the padded input \(8 x 2\) is smaller than the dilated kernel \(3 x 3\)")


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(pads=[BIG, 0, BIG, 0]), r"PostConv: the padded input \(>= 2\^63-1 x 6\) has more than 2\^40 pixels"),
        (dict(pads=[2**21] * 4), r"PostConv: the padded input \(4194310 x 4194310\) has more than 2\^40 pixels"),
        (dict(pads=[2**18] * 4), r"PostConv: the padded input \(1, 4, 524294, 524294\) has more than 2\^40 values"),
        (dict(dilations=[BIG, 1]), r"PostConv: the padded input \(8 x 8\) is smaller than the dilated kernel \(>= 2\^63-1 x 3\)"),
        (dict(dilations=[1, 2**62 - 1]), r"smaller than the dilated kernel \(3 x >= 2\^63-1\)"),  # exactly 2^63-1
        (dict(kernel_shape=[2**32, 2**32]), r"PostConv: C/group\*kh\*kw = 4\*4294967296\*4294967296 is more than 65536 codes"),
        (dict(kernel_shape=[BIG, 3]), r"C/group\*kh\*kw = 4\*4611686018427387904\*3 is more than 65536 codes"),
        (dict(kernel_shape=[129, 128]), r"C/group\*kh\*kw = 4\*129\*128 = 66048 is more than 65536 codes"),
    ],
    ids=["pads", "pads-2^21", "pads-2^18", "dilation", "dilation-2^62", "kernel-2^32", "kernel-2^62", "kernel-129x128"],
)
def test_huge_attributes_are_errors_not_overflows(kernel, overrides, match):
    x, model = error_model(GOOD, kernel=kernel, **overrides)
    raises_at_run(model, x, match)


@pytest.mark.parametrize("strides,hw", [((BIG, BIG), (1, 1)), ((2**63 - 1, 1), (1, 6)), ((3, 2**63 - 1), (2, 1)), ((6, 5), (1, 2))])
def test_strides_past_the_input_leave_one_window(kernel, strides, hw):
    """A stride longer than the rest of the padded input gives one output row (or column): the first window."""
    case = replace(GOOD, strides=strides)
    x, codes, scale, bias, x_scale, x_zero_point = case_data(case, seed=3)
    want = reference(case, x, codes, scale, bias, x_scale, x_zero_point)
    assert want.shape[2:] == hw
    (y,) = session(conv_model(case, pack(codes, 4), scale, bias, x_scale, x_zero_point, kernel=kernel)).run(None, {"X": x})
    np.testing.assert_array_equal(y, want)


EMPTY = [
    replace(GOOD, n=0),  # no images
    replace(GOOD, m=0),  # no output channels
    replace(GOOD, c=0, m=4),  # no input channels: K = 0, Y = B
    replace(GOOD, hw=(0, 6), kernel=(1, 3), pads=(1, 1, 2, 1)),  # no rows: Y is padding only
    replace(GOOD, hw=(0, 0), kernel=(1, 1), pads=(1, 0, 0, 2), calibrated=True),
    replace(GOOD, op="IntConv", bits=8, hw=(3, 0), pads=(0, 2, 0, 2), group=4),  # depthwise, no columns
    replace(GOOD, op="IntConv", bits=2, n=0, c=0, m=0),
]


@pytest.mark.parametrize("case", EMPTY, ids=str)
def test_empty_tensors_give_the_defined_result(kernel, case):
    x, codes, scale, bias, x_scale, x_zero_point = case_data(case, seed=3)
    want = reference(case, x, codes, scale, bias, x_scale, x_zero_point)
    (y,) = session(conv_model(case, pack(codes, case.bits), scale, bias, x_scale, x_zero_point, kernel=kernel)).run(None, {"X": x})
    assert y.shape == want.shape
    np.testing.assert_array_equal(y, want)


def _typed_model(op: str, inputs: dict[str, int], **attributes) -> bytes:
    """One node whose inputs are all graph inputs of the given element types:

    inputs... ─► op ─► outputs
    """
    outputs = dict(Y=U8, scale=F, zero_point=U8) if op == "QuantizeDynamicU8" else dict(Y=F)
    node = helper.make_node(op, list(inputs), list(outputs), domain=DOMAIN, **attributes)
    graph = helper.make_graph(
        [node],
        op,
        [helper.make_tensor_value_info(name, elem, None) for name, elem in inputs.items()],
        [helper.make_tensor_value_info(name, elem, None) for name, elem in outputs.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)]).SerializeToString()


@pytest.mark.parametrize(
    "op,inputs,wrong",
    [
        ("PostConv", dict(X=TensorProto.DOUBLE, W=U8, scale=F), "double"),
        ("PostConv", dict(X=F, W=U8, scale=TensorProto.FLOAT16), "float16"),
        ("IntConv", dict(X=F, W=TensorProto.INT4, scale=F), "int4"),
        ("IntConv", dict(X=F, W=U8, scale=F, B=F, x_scale=F, x_zero_point=TensorProto.INT8), "int8"),
        ("IntConv", dict(X=F, W=U8, scale=F, B=TensorProto.INT32), "int32"),
        ("QuantizeDynamicU8", dict(X=TensorProto.DOUBLE), "double"),
        ("QuantizeDynamicU8", dict(X=TensorProto.UINT8), "uint8"),
    ],
)
def test_inputs_of_the_wrong_type_are_session_errors(op, inputs, wrong):
    with pytest.raises(Exception, match=rf"tensor\({wrong}\).*{op}"):
        session(_typed_model(op, inputs, **({} if op == "QuantizeDynamicU8" else dict(bits=4, kernel_shape=[1, 1]))))


def test_quantize_dynamic_u8_on_empty_and_odd_shapes():
    """Any rank >= 1, empty included: scale 1 and zero point 0 when X is empty (onnxruntime's choice)."""
    sess = session(_typed_model("QuantizeDynamicU8", dict(X=F)))
    for shape in [(0,), (3, 0, 2), (1,) * 8, (0,) * 6]:
        y, scale, zero_point = sess.run(None, {"X": np.zeros(shape, np.float32)})
        assert y.shape == shape and y.dtype == np.uint8 and scale == 1 and zero_point == 0
    with pytest.raises(Exception, match=r"QuantizeDynamicU8: input X must have rank >= 1, got a scalar"):
        sess.run(None, {"X": np.array(2, np.float32)})
