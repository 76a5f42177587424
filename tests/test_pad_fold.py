"""Zero Pads folded into onnxq's ops (onnxq/rewrite/between.py, fold_pads).

A node ``x -> [DQ] -> Pad(0) -> IntConv(x_scale)`` rewritten must lose the Pad, carry its pads in the op's own, read
a dequantized tensor's uint8 codes, and give the numpy model of the op on the zero-padded input bit for bit; a CREPE-like
network (1-D convs over H, ReLU, BatchNorm, max-pool, torch's computed zero Pads) quantized W4A8 in the int format must
give the same outputs bit for bit with and without the fold. Pads the op cannot take (a value other than 0, reflect,
channel pads, a float reader beside the op, a dynamic step) stay.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conv_ops import Case, pack, quantize_input, reference_codes
from onnx import TensorProto, helper, numpy_helper

import onnxq.pipeline
from onnxq.config import ActivationConfig, QuantizeConfig, WeightFormat
from onnxq.model.graph import attribute
from onnxq.native.domain import DOMAIN
from onnxq.native.session import session
from onnxq.pipeline import quantize_with_report
from onnxq.rewrite.between import fold_pads

F = TensorProto.FLOAT
OPSET = 17
CASE = Case("IntConv", 4, 2, 6, (20, 3), 8, (5, 1), pads=(1, 0, 0, 0))  # the op's own pads before the fold
S_X, Z_X = np.float32(0.05), 117


def _pads_chain(pads: list[int], prefix: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Nodes computing ``pads`` as torch's export does for F.pad: ConstantOfShape, Concat, Reshape, Slice, Transpose, Reshape, Cast."""
    h_top, w_left, h_bottom, w_right = pads
    torch_order = np.array([w_left, w_right, h_top, h_bottom], np.int64)  # (last dim first, begin/end pairs)
    inits = [numpy_helper.from_array(v, f"{prefix}{name}") for name, v in [
        ("given", torch_order), ("fill", np.array([4], np.int64)), ("shape", np.array([-1, 2], np.int64)),
        ("start", np.array([-1], np.int64)), ("end", np.array([-9223372036854775807], np.int64)),
        ("axes", np.array([0], np.int64)), ("step", np.array([-1], np.int64)), ("flat", np.array([-1], np.int64))]]
    names = [f"{prefix}{i}" for i in range(7)]
    nodes = [
        helper.make_node("ConstantOfShape", [f"{prefix}fill"], [names[0]], value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Concat", [f"{prefix}given", names[0]], [names[1]], axis=0),
        helper.make_node("Reshape", [names[1], f"{prefix}shape"], [names[2]]),
        helper.make_node("Slice", [names[2], f"{prefix}start", f"{prefix}end", f"{prefix}axes", f"{prefix}step"], [names[3]]),
        helper.make_node("Transpose", [names[3]], [names[4]], perm=[1, 0]),
        helper.make_node("Reshape", [names[4], f"{prefix}flat"], [names[5]]),
        helper.make_node("Cast", [names[5]], [names[6]], to=TensorProto.INT64),
    ]
    return nodes, inits, names[6]


def _op_model(pads: list[int], *, value: float | None = None, mode: str = "constant", dequantized: bool = False,
              channel_pad: bool = False, float_reader: bool = False, calibrated: bool = True) -> onnx.ModelProto:
    """x [-> DQ(S_X, Z_X)] -> Pad(pads, computed) -> IntConv(x_scale S_X, Z_X) -> y; optionally a float Relu beside it."""
    rng = np.random.default_rng(3)
    codes = rng.integers(-7, 8, (CASE.m, CASE.k)).astype(np.int8)
    inits = [numpy_helper.from_array(pack(codes, 4), "w"), numpy_helper.from_array(np.full(CASE.m, 0.03, np.float32), "scale"),
             numpy_helper.from_array((rng.standard_normal(CASE.m) * 0.1).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(S_X, np.float32), "s"), numpy_helper.from_array(np.array(Z_X, np.uint8), "z")]
    nodes, chain_inits, pads_name = _pads_chain(pads, "p_")
    inits += chain_inits
    x_type = TensorProto.UINT8 if dequantized else F
    source = "x"
    if dequantized:
        nodes.append(helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xd"]))
        source = "xd"
    if channel_pad:
        inits.append(numpy_helper.from_array(np.array([0, 1, pads[0], pads[1], 0, 0, pads[2], pads[3]], np.int64), "cpads"))
        pads_name = "cpads"
    pad_inputs = [source, pads_name] + ([] if value is None else ["value"])
    if value is not None:
        inits.append(numpy_helper.from_array(np.array(value, np.float32), "value"))
    nodes.append(helper.make_node("Pad", pad_inputs, ["padded"], mode=mode))
    steps = ["s", "z"] if calibrated else []
    nodes.append(helper.make_node("IntConv", ["padded", "w", "scale", "b", *steps], ["y"], domain=DOMAIN, bits=4,
                                  kernel_shape=list(CASE.kernel), pads=list(CASE.pads)))
    outputs = [helper.make_tensor_value_info("y", F, None)]
    if float_reader:
        nodes.append(helper.make_node("Relu", ["padded"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", F, None))
    graph = helper.make_graph(nodes, "pad", [helper.make_tensor_value_info("x", x_type, None)], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])


def _inputs(dequantized: bool) -> np.ndarray:
    rng = np.random.default_rng(8)
    if dequantized:
        return rng.integers(0, 256, (CASE.n, CASE.c, *CASE.hw)).astype(np.uint8)
    return (rng.standard_normal((CASE.n, CASE.c, *CASE.hw)) * 3).astype(np.float32)


def _numpy_y(model: onnx.ModelProto, x: np.ndarray, pads: list[int]) -> np.ndarray:
    """The op's y from its definition in numpy, on X padded with zeros (codes: with z) by ``pads`` and the op's own pads."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    xq = x.astype(np.int64) if x.dtype == np.uint8 else quantize_input(x, S_X, np.uint8(Z_X))[0]
    top, left, bottom, right = (p + q for p, q in zip(pads, CASE.pads, strict=True))
    case = Case(CASE.op, CASE.bits, CASE.n, CASE.c, CASE.hw, CASE.m, CASE.kernel, pads=(top, left, bottom, right))
    codes = ((inits["w"][:, :, None] >> np.array([0, 4], np.uint8)) & 15).reshape(CASE.m, -1)[:, : CASE.k].astype(np.int64)
    codes = np.where(codes >= 8, codes - 16, codes)
    return reference_codes(case, xq, S_X, Z_X, codes, inits["scale"], inits["b"])


@pytest.mark.parametrize("dequantized", [False, True], ids=["float-x", "dequantized-x"])
@pytest.mark.parametrize("pads", [[3, 0, 2, 0], [0, 1, 4, 2]], ids=str)
def test_a_zero_pad_goes_into_the_op_and_gives_the_numpy_conv_of_the_padded_input(pads, dequantized):
    model = _op_model(pads, dequantized=dequantized)
    x = _inputs(dequantized)
    (before,) = session(model.SerializeToString()).run(None, {"x": x})
    assert fold_pads(model.graph, OPSET) == 1
    op = next(n for n in model.graph.node if n.domain == DOMAIN)
    assert [n.op_type for n in model.graph.node] == ["IntConv"]  # the Pad, its pads' chain and the DQ are gone
    assert attribute(op, "pads") == [p + q for p, q in zip(pads, CASE.pads, strict=True)]
    assert op.input[0] == "x"  # float X, or the DQ's uint8 codes as they are
    (after,) = session(model.SerializeToString()).run(None, {"x": x})
    want = _numpy_y(model, x, pads)
    np.testing.assert_array_equal(after, want)
    np.testing.assert_array_equal(before, want)


@pytest.mark.parametrize("variant", [dict(value=0.5), dict(mode="reflect"), dict(channel_pad=True), dict(float_reader=True),
                                     dict(calibrated=False)], ids=["value-0.5", "reflect", "channel-pad", "float-reader", "dynamic-step"])
def test_pads_the_op_cannot_take_stay(variant):
    model = _op_model([2, 0, 1, 0], **variant)
    assert fold_pads(model.graph, OPSET) == 0
    assert any(n.op_type == "Pad" for n in model.graph.node)
    op = next(n for n in model.graph.node if n.domain == DOMAIN)
    assert op.input[0] == "padded" and attribute(op, "pads") == list(CASE.pads)


def _crepe_like() -> onnx.ModelProto:
    """x[N,1,64,1] -> 3 blocks of (Pad by a computed chain, Conv kx1, Relu, BatchNorm, MaxPool 2x1) -> Flatten -> Gemm."""
    rng = np.random.default_rng(11)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    x, channels = "x", 1
    for i, (out, kernel, stride, pads) in enumerate([(16, 16, 2, [7, 0, 7, 0]), (8, 8, 1, [3, 0, 4, 0]), (8, 8, 1, [3, 0, 4, 0])]):
        chain, chain_inits, pads_name = _pads_chain(pads, f"b{i}_")
        nodes += chain
        inits += chain_inits
        inits += [numpy_helper.from_array((rng.standard_normal((out, channels, kernel, 1)) / np.sqrt(channels * kernel)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((rng.standard_normal(out) * 0.1).astype(np.float32), f"b{i}"),
                  numpy_helper.from_array(rng.uniform(0.5, 2, out).astype(np.float32), f"g{i}"),
                  numpy_helper.from_array((rng.standard_normal(out) * 0.2).astype(np.float32), f"beta{i}"),
                  numpy_helper.from_array((rng.standard_normal(out) * 0.2).astype(np.float32), f"mean{i}"),
                  numpy_helper.from_array(rng.uniform(0.5, 2, out).astype(np.float32), f"var{i}")]
        nodes += [helper.make_node("Pad", [x, pads_name], [f"p{i}"], mode="constant"),
                  helper.make_node("Conv", [f"p{i}", f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[kernel, 1], strides=[stride, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
                  helper.make_node("BatchNormalization", [f"r{i}", f"g{i}", f"beta{i}", f"mean{i}", f"var{i}"], [f"n{i}"], epsilon=1e-3),
                  helper.make_node("MaxPool", [f"n{i}"], [f"m{i}"], kernel_shape=[2, 1], strides=[2, 1])]
        x, channels = f"m{i}", out
    inits.append(numpy_helper.from_array((rng.standard_normal((10, 8 * 4)) * 0.2).astype(np.float32), "fc_w"))
    nodes += [helper.make_node("Flatten", [x], ["f"]), helper.make_node("Gemm", ["f", "fc_w"], ["logits"], transB=1),
              helper.make_node("Sigmoid", ["logits"], ["y"])]
    graph = helper.make_graph(nodes, "crepe", [helper.make_tensor_value_info("x", F, ["N", 1, 64, 1])],
                              [helper.make_tensor_value_info("y", F, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def test_a_crepe_like_network_gives_the_same_outputs_bit_for_bit_with_and_without_the_fold(monkeypatch):
    rng = np.random.default_rng(2)
    data = [{"x": rng.standard_normal((8, 1, 64, 1)).astype(np.float32)} for _ in range(4)]
    config = QuantizeConfig(bits=4, format=WeightFormat.INT, activations=ActivationConfig())
    folded = quantize_with_report(_crepe_like(), config, data).model
    with monkeypatch.context() as patch:
        patch.setattr(onnxq.pipeline, "fold_pads", lambda graph, opset: 0)
        plain = quantize_with_report(_crepe_like(), config, data).model
    ops = [n for n in folded.graph.node if n.domain == DOMAIN and n.op_type.startswith("IntConv")]
    assert len(ops) == 3 and not any(n.op_type == "Pad" for n in folded.graph.node)
    assert sum(n.op_type == "Pad" for n in plain.graph.node) == 3
    assert [attribute(op, "pads") for op in ops] == [[7, 0, 7, 0], [3, 0, 4, 0], [3, 0, 4, 0]]
    x = rng.standard_normal((5, 1, 64, 1)).astype(np.float32)
    (got,) = session(folded.SerializeToString()).run(None, {"x": x})
    (want,) = session(plain.SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(got, want)
