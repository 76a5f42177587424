"""Depthwise convolutions keep --depthwise-bits (default 8) in the qdq format: a few KB of a model, and at 4 bits its
most fragile layers (a real layout detector: 73 % -> 86 % detection agreement with float, one-off run on 64 pages).
Grouped convolutions with several input channels per group, and the op formats, keep -b."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import weight_of
from onnx import TensorProto, helper, numpy_helper

from onnxq.cli import main
from onnxq.config import QuantizeConfig, WeightFormat
from onnxq.pipeline import quantize_with_report


def _model() -> onnx.ModelProto:
    """first (3x3) -> depthwise (group 8) -> grouped (group 2) -> pointwise -> last; the middle three are not first/last."""
    rng = np.random.default_rng(0)
    shapes = {"w1": (8, 3, 3, 3), "dw": (8, 1, 3, 3), "gw": (8, 4, 3, 3), "pw": (8, 8, 1, 1), "w5": (4, 8, 1, 1)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="first", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "dw"], ["b"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "gw"], ["c"], name="grouped", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c", "pw"], ["d"], name="pointwise"),
        helper.make_node("Conv", ["d", "w5"], ["y"], name="last"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _bits(config: QuantizeConfig) -> dict[str, int]:
    return {layer.nodes[0]: layer.bits for layer in quantize_with_report(_model(), config).layers}


def test_depthwise_keeps_8_bits_in_qdq():
    result = quantize_with_report(_model(), QuantizeConfig(bits=4))
    assert {layer.nodes[0]: layer.bits for layer in result.layers} == {"first": 8, "depthwise": 8, "grouped": 4, "pointwise": 4, "last": 8}
    assert next(layer.bits_rule for layer in result.layers if layer.nodes[0] == "depthwise") == "depthwise"


@pytest.mark.parametrize("config", [QuantizeConfig(bits=4, depthwise_bits=None), QuantizeConfig(bits=4, depthwise_bits=4),
                                    QuantizeConfig(bits=4, format=WeightFormat.INT)])
def test_depthwise_like_the_rest_when_asked_or_in_op_formats(config):
    assert _bits(config)["depthwise"] == 4


def test_depthwise_bits_never_lowers_bits():
    assert _bits(QuantizeConfig(bits=8, depthwise_bits=4))["depthwise"] == 8


def test_cli_option(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    for flag, want in ((["--depthwise-bits", "4"], 4), ([], 8)):
        out = tmp_path / f"q{want}.onnx"
        assert main(["quantize", str(path), "-b", "4", "-o", str(out), "-v", *flag]) == 0
        written = onnx.load(out)
        assert weight_of(written, "depthwise").codes_type == (TensorProto.INT4 if want == 4 else TensorProto.INT8)
    capsys.readouterr()
