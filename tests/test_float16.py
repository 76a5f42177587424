"""Float16 models: their weights are quantized with float16 scales, so every layer still computes in float16."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import CAST_FORM, decoded_weight_counts, decoded_weights, run
from onnx import TensorProto, helper, numpy_helper

from models import conv_bn_relu_gemm
from onnxq import QuantizeConfig, SqrtMode, quantize_with_report
from onnxq.cli import main
from onnxq.config import WeightFormat


def half(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model in float16: initializers cast, graph inputs and outputs retyped."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, tensor in enumerate(out.graph.initializer):
        if tensor.data_type == TensorProto.FLOAT:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in [*out.graph.input, *out.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(out)
    return out


def _attribute(node: onnx.NodeProto, name: str):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _x(batch: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(2).random((batch, 3, 8, 8)).astype(np.float16)}


def _with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, tensor in enumerate(out.graph.initializer):
        if tensor.name in weights:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
    return out


@pytest.mark.parametrize("bits, sqrt", [(4, SqrtMode.OFF), (8, SqrtMode.OFF), (4, SqrtMode.ON)])
def test_float16_weights_decode_in_float32_and_the_model_stays_float16(bits, sqrt):
    model = half(conv_bn_relu_gemm(with_bn=False))
    result = quantize_with_report(model, QuantizeConfig(bits=bits, first_last_bits=None, sqrt=sqrt))
    assert sorted(layer.tensor for layer in result.layers) == ["w1", "w2", "w3"]
    weights = decoded_weights(result.model)
    # Weight-only: decoded at load in float32 (onnxruntime folds no float16 Mul on CPU), then cast to float16.
    assert [(w.form, w.scale.dtype, w.sqrt) for w in weights] == [(CAST_FORM, np.float32, sqrt is SqrtMode.ON)] * 3
    assert all(_attribute(w.nodes[0], "to") == TensorProto.FLOAT and _attribute(w.nodes[-1], "to") == TensorProto.FLOAT16 for w in weights)
    decoded = {w.codes_name.removesuffix("_quantized"): w.values for w in weights}
    assert sorted(decoded) == ["w1", "w2", "w3"] and all(v.dtype == np.float16 for v in decoded.values())
    y = run(result.model, _x())
    assert y.dtype == np.float16
    # The float16 model run with the weights decoded here as the graph decodes them.
    reference = run(_with_weights(model, decoded), _x())
    np.testing.assert_allclose(y.astype(np.float32), reference.astype(np.float32), rtol=2e-3, atol=2e-3)
    float_y = run(model, _x()).astype(np.float32)
    assert np.linalg.norm(y.astype(np.float32) - float_y) / np.linalg.norm(float_y) < (0.2 if bits == 4 else 0.02)


def test_the_op_formats_keep_float16_layers_as_qdq_with_the_reason():
    result = quantize_with_report(half(conv_bn_relu_gemm(with_bn=False)), QuantizeConfig(bits=4, first_last_bits=None, format=WeightFormat.INT))
    assert {layer.qdq_reason for layer in result.layers} == {"a float16 layer; the ops take float32 inputs"}
    assert not any(n.domain for n in result.model.graph.node)


def test_activation_quantization_of_a_float16_model_is_refused_and_nothing_is_written(tmp_path, capsys):
    path, out = tmp_path / "half.onnx", tmp_path / "q.onnx"
    onnx.save(half(conv_bn_relu_gemm(with_bn=False)), path)
    np.save(tmp_path / "calib.npy", _x(8)["x"])
    assert main(["quantize", str(path), "--calibration", str(tmp_path / "calib.npy"), "-o", str(out)]) != 0
    assert "float16" in capsys.readouterr().err and not out.exists()


def test_mixed_precision_measures_a_float16_model(tmp_path, capsys):
    path, out = tmp_path / "half.onnx", tmp_path / "q.onnx"
    onnx.save(half(conv_bn_relu_gemm(with_bn=False)), path)
    np.save(tmp_path / "data.npy", _x(8)["x"])
    assert main(["quantize", str(path), "-b", "4", "--first-last-bits", "4", "--max-drop", "1", "--sensitivity-data", str(tmp_path / "data.npy"),
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model output SQNR" in printed and out.exists()
    assert run(onnx.load(out), _x()).dtype == np.float16


def test_a_float16_embedding_table_is_looked_up_with_float16_scales():
    v = helper.make_tensor_value_info
    table = (np.random.default_rng(0).standard_normal((30, 16)) * 0.1).astype(np.float16)
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["e"], name="embed")], "lookup",
                              [v("ids", TensorProto.INT64, [4])], [v("e", TensorProto.FLOAT16, [4, 16])], [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = quantize_with_report(model, QuantizeConfig(bits=8, first_last_bits=None))
    lookup = next(n for n in result.model.graph.node if n.op_type == "GatherBlockQuantized")
    scales = next(t for t in result.model.graph.initializer if t.name == lookup.input[2])
    assert scales.data_type == TensorProto.FLOAT16
    ids = np.array([0, 29, 3, 3])
    y = run(result.model, {"ids": ids})
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float32), table[ids].astype(np.float32), atol=float(np.abs(table).max()) / 127)


def test_weights_chosen_on_data_for_a_float16_model():
    """Weight-only with data on a float16 model: the calibration pass fetches float16 layer inputs as float16 (not float32, which failed)."""
    model = half(conv_bn_relu_gemm(with_bn=False))
    result = quantize_with_report(model, QuantizeConfig(bits=4), [_x(8)])
    assert all(layer.bits in (4, 8) for layer in result.layers)
    assert decoded_weight_counts(result.model) == {CAST_FORM: 3}
