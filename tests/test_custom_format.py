"""--format int / post: Conv layers become onnxq's IntConv / PostConv ops; the rest stays QDQ."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import float_equivalent, random_feeds, run
from conv_ops import Case, clipped, post_decode, reference

import onnxq.rewrite.ops
from models import conv_bn_relu_gemm, depthwise_convtranspose
from onnxq import QuantizeConfig, WeightFormat, quantize, quantize_with_report
from onnxq.cli import main
from onnxq.config import ReduceRange
from onnxq.native.domain import DOMAIN
from onnxq.native.session import session
from onnxq.numerics.weights import QuantizedTensor
from onnxq.rewrite.ops import declare_domain, pack_rows, replace_convs


def _ops(model: onnx.ModelProto) -> dict[str, str]:
    return {n.name: n.op_type for n in model.graph.node if n.op_type not in ("DequantizeLinear", "Abs", "Mul")}


def test_pack_rows_layout():
    codes = np.array([[1, -1, 3], [-8, 7, 0]], dtype=np.int8)
    np.testing.assert_array_equal(pack_rows(codes, 4), np.array([[0xF1, 0x03], [0x78, 0x00]], dtype=np.uint8))
    np.testing.assert_array_equal(pack_rows(codes, 8), codes.view(np.uint8))


@pytest.mark.parametrize("fmt, op", [(WeightFormat.INT, "IntConv"), (WeightFormat.POST, "PostConv")])
def test_middle_conv_becomes_the_op_and_the_first_an_8_bit_intconv(fmt, op):
    """conv2 runs as the format's op at 4 bits; conv1, the first layer, at --first-last-bits 8 as IntConv (POST takes
    2-4 bits; 8-bit codes: --reduce-range off, as on a CPU with VNNI); the 16 -> 10 classifier is too small for the ops
    and stays a Gemm (its weight decoded at load)."""
    model = quantize(conv_bn_relu_gemm(c=16), QuantizeConfig(bits=4, format=fmt, reduce_range=ReduceRange.OFF))
    ops = _ops(model)
    assert (ops["conv1"], ops["conv2"], ops["fc"]) == ("IntConv", op, "Gemm")
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node if n.domain == DOMAIN}
    assert bits == {"conv1": 8, "conv2": 4}
    assert any(imp.domain == DOMAIN for imp in model.opset_import)
    assert "w2" not in {t.name for t in model.graph.initializer}


@pytest.mark.parametrize("fmt", [WeightFormat.INT, WeightFormat.POST])
def test_op_model_matches_float_model_with_dequantized_weights(fmt):
    # Same model, Conv in float with exactly the weights the codes stand for: the only difference
    # left is the op's uint8 activation rounding.
    float_model = conv_bn_relu_gemm(c=16, with_bn=False)
    config = QuantizeConfig(bits=4, format=fmt)  # conv1 and fc: 8-bit QDQ, conv2: the op
    result = quantize_with_report(float_model, config)
    reference = onnx.ModelProto()
    reference.CopyFrom(float_model)
    packed = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    conv2 = next(n for n in result.model.graph.node if n.name == "conv2")
    codes = _unpack(packed[conv2.input[1]], (16, 16 * 9)).reshape(16, 16, 3, 3)
    scale = packed[conv2.input[2]]
    if fmt is WeightFormat.POST:
        weight = post_decode(codes.reshape(16, -1), scale, 4).reshape(codes.shape)
    else:
        weight = codes.astype(np.float32) * scale[:, None, None, None]
    w2 = next(t for t in reference.graph.initializer if t.name == "w2")
    w2.CopyFrom(onnx.numpy_helper.from_array(weight.astype(np.float32), "w2"))
    feeds = random_feeds(float_model, batch=2)
    out = session(result.model.SerializeToString()).run(None, feeds)[0]
    conv1_only = quantize(reference, QuantizeConfig(bits=4, exclude=frozenset({"conv2"})))
    expected = run(conv1_only, feeds)
    # uint8 activation steps (range of relu1 / 255) limit agreement to a few percent of the output scale.
    assert np.abs(out - expected).max() <= 0.05 * np.abs(expected).max()


def _unpack(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)[:, : shape[1]].astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)


def test_depthwise_conv_runs_as_post():
    """The depthwise Conv (+ Relu) runs as PostConv, the ConvTranspose stays QDQ: the op's output is its definition on the
    codes and scales the model holds, bit for bit, and the model's output the ConvTranspose of it with decoded weights."""
    model = quantize(depthwise_convtranspose(), QuantizeConfig(bits=4, format=WeightFormat.POST, first_last_bits=None))
    assert _ops(model)["depthwise"] == "PostConv" and _ops(model)["up"] == "ConvTranspose"
    feeds = random_feeds(model)
    op = next(n for n in model.graph.node if n.op_type == "PostConv")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in op.attribute}
    assert {k: attributes[k] for k in ("bits", "group", "kernel_shape", "pads", "clip_min")} == dict(
        bits=4, group=4, kernel_shape=[3, 3], pads=[1, 1, 1, 1], clip_min=0.0  # the Relu folded into the op
    )
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(op.output[0], onnx.TensorProto.FLOAT, None))
    y, r = session(probe.SerializeToString()).run(None, feeds)
    assert y.shape == (2, 6, 12, 12)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    bias = inits[op.input[3]] if len(op.input) > 3 and op.input[3] else None
    case = Case("PostConv", 4, 2, 4, (6, 6), 4, (3, 3), pads=(1, 1, 1, 1), group=4, bias=bias is not None)
    unclipped = reference(case, feeds["x"], _unpack(inits[op.input[1]], (4, 9)), inits[op.input[2]], bias, None, None)
    np.testing.assert_array_equal(r, clipped(unclipped, dict(clip_min=0.0)))
    (want,) = session(float_equivalent(probe).SerializeToString()).run(None, feeds)[:1]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Declared shapes of the main graph's value_info, dims as ints or symbolic names."""
    return {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}


@pytest.mark.parametrize("fmt", [WeightFormat.INT, WeightFormat.POST])
def test_op_outputs_carry_the_float_models_shapes(fmt, monkeypatch):
    """onnx cannot infer the custom ops' shapes; the rewrite declares them, so inference goes on after them."""
    float_model = depthwise_convtranspose()
    model = quantize(float_model, QuantizeConfig(bits=4, format=fmt, first_last_bits=None))
    assert _shapes(model)["r"] == ["N", 4, 6, 6] and "d" not in _shapes(model)  # the Relu folded: the op writes r
    # The rest with the Relu kept (no folding), so that a tensor after the op is in value_info.
    monkeypatch.setattr(onnxq.rewrite.ops, "fold_clipping_into_ops", lambda graph: 0)
    model = quantize(float_model, QuantizeConfig(bits=4, format=fmt, first_last_bits=None))
    assert _ops(model)["depthwise"] != "Conv"
    assert _shapes(model)["d"] == _shapes(onnx.shape_inference.infer_shapes(float_model))["d"] == ["N", 4, 6, 6]
    # Without the rewrite's entries onnx stops at the op: nothing after it gets a shape.
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.graph.value_info[:]
    assert "r" not in _shapes(onnx.shape_inference.infer_shapes(stripped))
    kept = onnx.ModelProto()
    kept.CopyFrom(model)
    del kept.graph.value_info[:]
    kept.graph.value_info.extend(v for v in model.graph.value_info if v.name == "d")
    assert _shapes(onnx.shape_inference.infer_shapes(kept))["r"] == ["N", 4, 6, 6]


def test_op_output_shapes_computed_when_the_float_model_has_none():
    """No inferred shape to copy (onnx's inference skipped): the rewrite computes it from X's shape and the attributes.

    x[batch,3,11,9] -> Conv(5, 3x2, pads 1,0,2,1, strides 2,1, dilations 1,2) -> y (no shape declared)
    """
    rng = np.random.default_rng(0)
    codes = rng.integers(-7, 8, (5, 3, 3, 2)).astype(np.int8)
    conv = onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2])
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3, 11, 9])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    weight = onnx.numpy_helper.from_array(codes.astype(np.float32), "w")
    model = onnx.helper.make_model(onnx.helper.make_graph([conv], "g", [x], [y], [weight]), opset_imports=[onnx.helper.make_opsetid("", 17)])
    q = QuantizedTensor(codes, np.full(5, 0.1, np.float32), 0, 4, False, np.ones(5, np.float32), 0.0, 0.0)
    replace_convs(model.graph, {"w": (q, "IntConv")})
    declare_domain(model)
    # OH = (11 + 1 + 2 - 3) // 2 + 1 = 6, OW = (9 + 0 + 1 - (2 * (2 - 1) + 1)) // 1 + 1 = 8
    declared = [d.dim_value or d.dim_param for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert declared == ["batch", 5, 6, 8]
    x = rng.random((2, 3, 11, 9), dtype=np.float32)
    out = session(model.SerializeToString()).run(None, {"x": x})[0]
    assert out.shape == (2, 5, 6, 8)
    case = Case("IntConv", 4, 2, 3, (11, 9), 5, (3, 2), strides=(2, 1), pads=(1, 0, 2, 1), dilations=(1, 2), bias=False)
    np.testing.assert_array_equal(out, reference(case, x, codes.reshape(5, -1), q.scale, None, None, None))  # the op's definition


def test_cli_post_summary_names_the_library(tmp_path, capsys):
    path = tmp_path / "net.onnx"
    onnx.save_model(conv_bn_relu_gemm(c=16), path)
    assert main(["quantize", str(path), "-b", "4", "--format", "post"]) == 0
    out = capsys.readouterr().out
    assert "1 PostConv" in out and "get_library_path" in out


def test_post_above_4_bits_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "net.onnx"
    onnx.save_model(conv_bn_relu_gemm(), path)
    assert main(["quantize", str(path), "-b", "6", "--format", "post"]) == 1
    assert "POST weights take 2-4 bits" in capsys.readouterr().err


def test_cli_says_weight_only_ops_quantize_their_inputs_per_run(tmp_path, capsys):
    """Weight-only --format int: the summary explains the uint8 inputs QDQ does not have; with calibration it does not."""
    path = tmp_path / "net.onnx"
    onnx.save_model(conv_bn_relu_gemm(c=16), path)
    assert main(["quantize", str(path), "-b", "4", "--format", "int"]) == 0
    assert "note: the ops quantize their inputs to uint8 on every run" in capsys.readouterr().out
    data = tmp_path / "cal.npy"
    np.save(data, np.random.default_rng(0).random((8, 3, 8, 8), dtype=np.float32))
    assert main(["quantize", str(path), "-b", "4", "--format", "int", "--calibration", str(data), "-o", str(tmp_path / "q.onnx")]) == 0
    assert "quantize their inputs to uint8 on every run" not in capsys.readouterr().out
