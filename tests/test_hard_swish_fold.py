"""A hard swish after a Conv that becomes IntConv/PostConv goes into the op's epilogue (onnxq/rewrite/fusions.py).

HardSwish, and HardSigmoid with the Mul of its input by it (how PaddlePaddle and torch export MobileNetV3/PP-LCNet
blocks), become the op's hardswish attributes; with calibration the pair placed in front of the swish goes too and the
op links into a uint8 chain. The model computes what it computed with the float nodes (within the rounding of one
quantization where a pair went).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq.rewrite.ops
from onnxq import QuantizeConfig, WeightFormat, quantize
from onnxq.config import ActivationConfig
from onnxq.native.domain import DOMAIN
from onnxq.native.session import session


def _model() -> onnx.ModelProto:
    """x[N,4,10,10] -> Conv -> a -> HardSwish -> h1 -> Conv -> b -> HardSigmoid(0.25, 0.45) -> s, Mul(b, s) -> h2
    -> Conv -> c -> HardSwish -> h3 -> Conv -> y, and c -> Add(c, h3) -> z  (c has two readers: its swish stays)
    """
    rng = np.random.default_rng(3)
    shapes = {"w1": (8, 4, 3, 3), "w2": (8, 8, 3, 3), "w3": (8, 8, 1, 1), "w4": (6, 8, 3, 3)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n) for n, s in shapes.items()]
    inits += [numpy_helper.from_array((rng.standard_normal(8) * 0.5).astype(np.float32), f"b{i}") for i in (1, 2, 3)]
    pads = dict(pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", **pads),
        helper.make_node("HardSwish", ["a"], ["h1"], name="swish1"),
        helper.make_node("Conv", ["h1", "w2", "b2"], ["b"], name="conv2", **pads),
        helper.make_node("HardSigmoid", ["b"], ["s"], name="sigmoid2", alpha=0.25, beta=0.45),
        helper.make_node("Mul", ["s", "b"], ["h2"], name="mul2"),
        helper.make_node("Conv", ["h2", "w3", "b3"], ["c"], name="conv3"),
        helper.make_node("HardSwish", ["c"], ["h3"], name="swish3"),
        helper.make_node("Add", ["c", "h3"], ["z"], name="add3"),
        helper.make_node("Conv", ["h3", "w4"], ["y"], name="conv4", **pads),
    ]
    graph = helper.make_graph(
        nodes,
        "hard_swish",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 10, 10])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6, 10, 10]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 8, 10, 10]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _samples(n: int) -> np.ndarray:
    return np.random.default_rng(8).standard_normal((n, 4, 10, 10)).astype(np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return session(model.SerializeToString()).run(None, {"x": x})


def _quantize(config: QuantizeConfig, data, fold: bool, monkeypatch) -> onnx.ModelProto:
    with monkeypatch.context() as patch:
        if not fold:
            patch.setattr(onnxq.rewrite.ops, "fold_hard_swish_into_ops", lambda graph: 0)
        return quantize(_model(), config, data)


def _sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    reference, other = reference.astype(np.float64), other.astype(np.float64)
    with np.errstate(divide="ignore"):  # equal outputs: infinite
        return float(10 * np.log10(np.sum(reference**2) / np.sum((reference - other) ** 2)))


@pytest.mark.parametrize("fmt", [WeightFormat.INT, WeightFormat.POST])
def test_the_swishes_a_conv_alone_feeds_go_into_the_ops(fmt, monkeypatch):
    """Weight-only: conv1's HardSwish and conv2's HardSigmoid + Mul go (their alpha, beta on the op), conv3's stays
    (c is read by the Add too); the outputs are those of the same codes with the float nodes (each op quantizes its
    float input itself, so a last-bit difference in the swish can move a code: nearly equal, not equal)."""
    config = QuantizeConfig(bits=4, format=fmt, first_last_bits=4)
    fused, plain = _quantize(config, None, True, monkeypatch), _quantize(config, None, False, monkeypatch)
    ops = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in fused.graph.node if n.domain == DOMAIN}
    assert ops["conv1"]["hardswish"] == 1 and ops["conv1"]["hardswish_alpha"] == pytest.approx(1 / 6, rel=1e-7)
    assert ops["conv1"]["hardswish_beta"] == 0.5
    assert (ops["conv2"]["hardswish"], ops["conv2"]["hardswish_alpha"], ops["conv2"]["hardswish_beta"]) == (1, np.float32(0.25), np.float32(0.45))
    assert "hardswish" not in ops["conv3"] and "hardswish" not in ops["conv4"]
    counts = Counter(n.op_type for n in fused.graph.node)
    assert (counts["HardSwish"], counts["HardSigmoid"], counts["Mul"]) == (1, 0, 0)
    assert Counter(n.op_type for n in plain.graph.node)["HardSwish"] == 2
    x = _samples(4)
    for ours, theirs in zip(_run(fused, x), _run(plain, x), strict=True):
        assert _sqnr_db(theirs, ours) > 40


def test_with_calibration_the_pair_before_the_swish_goes_and_the_op_writes_uint8(monkeypatch):
    """W4A8 int: the pair at conv1's output (for onnxruntime's kernels) goes, conv1 applies the swish to its exact output
    and writes h1's codes for conv2 (IntConvQ); the model stays as close to the float one as the unfused model is."""
    config = QuantizeConfig(bits=4, format=WeightFormat.INT, first_last_bits=4, activations=ActivationConfig(samples=64))
    data = [{"x": _samples(64)}]
    fused, plain = _quantize(config, data, True, monkeypatch), _quantize(config, data, False, monkeypatch)
    conv1 = next(n for n in fused.graph.node if n.name == "conv1")
    assert conv1.op_type == "IntConvQ" and conv1.output[0].startswith("h1")
    assert any(a.name == "hardswish" for a in conv1.attribute)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0].startswith("a") for n in fused.graph.node)
    x = _samples(16)
    reference = _run(_model(), x)
    for want, ours, theirs in zip(reference, _run(fused, x), _run(plain, x), strict=True):
        assert _sqnr_db(want, ours) > _sqnr_db(want, theirs) - 1.0
        assert _sqnr_db(theirs, ours) > 20
