"""Einsum with a constant operand: its weight is quantized per channel along an axis the sum keeps."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import float_equivalent, run, weight_of
from onnx import TensorProto, helper, numpy_helper

from onnxq import QuantizeConfig, quantize_with_report
from onnxq.plan.handlers import einsum_channel_axis


@pytest.mark.parametrize("equation, index, rank, axis", [
    ("bld,de->ble", 1, 2, 1),  # a dense layer
    ("blhd,hdk->blhk", 1, 3, 2),  # per head: h and k are kept, the last of them
    ("ke,blhk->blhe", 0, 2, 1),  # the weight first
    ("bd , de -> be", 1, 2, 1),  # spaces
    ("bd,de", 1, 2, 1),  # implicit output: b and e, each once
    ("bd,d->b", 1, 1, None),  # the weight is summed away entirely
    ("...d,de->...e", 1, 2, None),  # ellipsis
    ("bd,dd->bd", 1, 2, None),  # a repeated letter (a diagonal)
    ("bd,de,ef->bf", 1, 2, None),  # three operands
    ("bd,def->be", 1, 2, None),  # the rank does not match the tensor's
])
def test_einsum_channel_axis(equation, index, rank, axis):
    assert einsum_channel_axis(equation, index, rank) == axis


def _einsum_model(equation: str, weight: np.ndarray, weight_first: bool, x_shape: list[int], y_shape: list[int]) -> onnx.ModelProto:
    v = helper.make_tensor_value_info
    inputs = ["w", "x"] if weight_first else ["x", "w"]
    graph = helper.make_graph([helper.make_node("Einsum", inputs, ["y"], name="dense", equation=equation)], "e",
                              [v("x", TensorProto.FLOAT, x_shape)], [v("y", TensorProto.FLOAT, y_shape)], [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("equation, shape, weight_first, axis", [("bld,de->ble", (12, 16), False, 1), ("ke,blk->ble", (16, 12), True, 1)])
def test_an_einsum_weight_is_quantized_along_its_kept_axis(equation, shape, weight_first, axis):
    weight = (np.random.default_rng(0).standard_normal(shape) * 0.3).astype(np.float32)
    model = _einsum_model(equation, weight, weight_first, [2, 5, 12 if not weight_first else 16], [2, 5, 16 if not weight_first else 12])
    result = quantize_with_report(model, QuantizeConfig(bits=8, first_last_bits=None))
    (layer,) = result.layers
    assert (layer.tensor, layer.per_channel, len(layer.alpha)) == ("w", True, shape[axis])
    decoded = weight_of(result.model, "dense", 0 if weight_first else 1)
    assert (decoded.axis, decoded.scale.shape, decoded.codes.shape) == (axis, (shape[axis],), shape)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 5, 12 if not weight_first else 16)).astype(np.float32)}
    np.testing.assert_allclose(run(result.model, feeds), run(float_equivalent(result.model), feeds), rtol=1e-5, atol=1e-6)
    reference = run(model, feeds)
    assert 0 < np.linalg.norm(run(result.model, feeds) - reference) / np.linalg.norm(reference) < 0.02


def test_an_einsum_without_a_kept_weight_axis_is_reported():
    model = _einsum_model("bd,d->b", np.ones(12, np.float32), False, [2, 12], [2])
    with pytest.raises(Exception, match="Einsum equation without a weight axis kept in the output"):
        quantize_with_report(model, QuantizeConfig(bits=8))


def test_asking_for_activations_where_none_can_be_quantized_says_so(tmp_path, capsys):
    from onnxq.cli import main

    weight = (np.random.default_rng(0).standard_normal((12, 16)) * 0.3).astype(np.float32)
    path, out = tmp_path / "e.onnx", tmp_path / "q.onnx"
    onnx.save(_einsum_model("bld,de->ble", weight, False, [2, 5, 12], [2, 5, 16]), path)
    np.save(tmp_path / "calib.npy", np.random.default_rng(1).standard_normal((8, 5, 12)).astype(np.float32))
    assert main(["quantize", str(path), "-b", "8", "--calibration", str(tmp_path / "calib.npy"), "-o", str(out)]) == 0
    assert "quantized 0 activation tensors" in capsys.readouterr().out
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node)


@pytest.mark.parametrize("equation, shape, weight_first, x_shape, out_axis", [
    ("bld,de->ble", (6, 4), False, (3, 5, 6), 2),  # x @ W
    ("ke,blk->ble", (6, 4), True, (3, 5, 6), 2),  # the weight first
    ("bdl,de->ble", (6, 4), False, (3, 6, 5), 2),  # the summed axis in the middle of x
    ("bld,ed->bel", (4, 6), False, (3, 5, 6), 1),  # the weight's rows first, the output's channels in the middle
])
def test_a_dense_einsum_gets_the_h_of_its_summed_axis(equation, shape, weight_first, x_shape, out_axis):
    """Each output channel's mean square from onnxruntime equals w H w^T (the H of x along the summed axis)."""
    from test_moments import _check

    weight = (np.random.default_rng(0).standard_normal(shape) * 0.3).astype(np.float32)
    y_shape = [None] * 3
    model = _einsum_model(equation, weight, weight_first, list(x_shape), y_shape)
    _check(model, {"x": np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)}, out_axis=out_axis, groups=1)


@pytest.mark.parametrize("equation", ["bld,de->be", "bd,def->bef", "...d,de->...e"])
def test_an_einsum_that_is_no_dense_layer_gets_no_h(equation):
    from onnxq.plan.handlers import einsum_input_axis

    assert einsum_input_axis(equation, 1, 2) is None
