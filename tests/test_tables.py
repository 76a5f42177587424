"""Embedding tables: Gather from a float table is quantized and looked up by onnxruntime's GatherBlockQuantized."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import decode_int_tensor, float_equivalent, run
from onnx import TensorProto, helper, numpy_helper

from onnxq import QuantizeConfig, SqrtMode, quantize_with_report
from onnxq.analysis.inventory import inspect_model
from onnxq.cli import main

V = 40


def _table(columns: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((V, columns)) * 0.1).astype(np.float32)


def lookup_then_matmul(columns: int = 24, tie: bool = False) -> onnx.ModelProto:
    """ids[2, 5] -> Gather(table) -> e -> MatMul(w) -> y; with ``tie`` the output layer reads the table too (Gemm, transB)."""
    rng = np.random.default_rng(1)
    v = helper.make_tensor_value_info
    inits = [numpy_helper.from_array(_table(columns), "table"), numpy_helper.from_array(rng.standard_normal((columns, 8)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"), helper.make_node("MatMul", ["e", "w"], ["y"], name="mm")]
    outputs = [v("y", TensorProto.FLOAT, [2, 5, 8])]
    if tie:  # logits of the first token against every row of the table, as a tied language-model head
        nodes += [
            helper.make_node("Gather", ["e", "zero"], ["first"], name="first_token", axis=1),
            helper.make_node("Gemm", ["first", "table"], ["logits"], name="head", transB=1),
        ]
        inits.append(numpy_helper.from_array(np.array(0, np.int64), "zero"))
        outputs.append(v("logits", TensorProto.FLOAT, [2, V]))
    graph = helper.make_graph(nodes, "lookup", [v("ids", TensorProto.INT64, [2, 5])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


IDS = np.array([[0, 3, 39, 3, 7], [12, 1, 0, 38, 20]], dtype=np.int64)


def _decoded(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """The table the lookup op reads, decoded in numpy from the stored codes and scales (the op's documented layout)."""
    inits = {t.name: t for t in model.graph.initializer}
    data, scales = inits[node.input[0]], numpy_helper.to_array(inits[node.input[2]])
    bits = next(a.i for a in node.attribute if a.name == "bits")
    if data.data_type == TensorProto.INT4:
        codes = decode_int_tensor(data).astype(np.float32)
    elif bits == 8:
        codes = numpy_helper.to_array(data).astype(np.float32) - 128
    else:
        packed = numpy_helper.to_array(data)
        codes = np.empty((packed.shape[0], 2 * packed.shape[1]), np.float32)
        codes[:, 0::2], codes[:, 1::2] = packed & 15, packed >> 4
        codes -= 8
    return codes * scales


def _lookup(result) -> onnx.NodeProto:
    return next(n for n in result.model.graph.node if n.op_type == "GatherBlockQuantized")


@pytest.mark.parametrize("bits, columns", [(4, 24), (8, 24), (4, 25), (3, 24)])
def test_a_table_only_looked_up_runs_as_gather_block_quantized(bits, columns):
    model = lookup_then_matmul(columns)
    result = quantize_with_report(model, QuantizeConfig(bits=bits, first_last_bits=None, sqrt=SqrtMode.OFF))
    lookup = _lookup(result)
    assert (lookup.domain, lookup.input[1]) == ("com.microsoft", "ids")
    assert any(imp.domain == "com.microsoft" for imp in result.model.opset_import)
    assert "table" not in {t.name for t in result.model.graph.initializer}
    assert [layer.op for layer in result.layers if layer.tensor == "table"] == ["GatherBlockQuantized"]
    stored = next(t for t in result.model.graph.initializer if t.name == lookup.input[0])
    assert stored.data_type == (TensorProto.INT4 if columns % 2 and bits <= 4 else TensorProto.UINT8)  # odd rows cannot be paired
    table = _decoded(result.model, lookup)
    float_table = _table(columns)
    levels = 2 ** (bits - 1) - 1
    scales = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == lookup.input[2]))
    assert np.all(np.abs(np.rint(table / scales)) <= levels)  # codes within the b-bit range of their row
    sqnr = 10 * np.log10(np.sum(float_table**2) / np.sum((float_table - table) ** 2))
    assert sqnr > {3: 9, 4: 15, 8: 38}[bits]
    only_lookup = onnx.ModelProto()
    only_lookup.CopyFrom(result.model)
    del only_lookup.graph.output[:]
    only_lookup.graph.output.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 5, columns]))
    np.testing.assert_allclose(run(only_lookup, {"ids": IDS}), table[IDS], rtol=1e-6, atol=1e-7)


def test_sqrt_mode_squares_the_rows_looked_up():
    model = lookup_then_matmul()
    result = quantize_with_report(model, QuantizeConfig(bits=4, first_last_bits=None, sqrt=SqrtMode.ON))
    lookup = _lookup(result)
    readers = [n for n in result.model.graph.node if lookup.output[0] in n.input]
    assert sorted(n.op_type for n in readers) == ["Abs", "Mul"]
    rooted = _decoded(result.model, lookup)
    float_table = _table(24)
    squared = rooted * np.abs(rooted)
    assert 10 * np.log10(np.sum(float_table**2) / np.sum((float_table - squared) ** 2)) > 15
    y = run(result.model, {"ids": IDS})
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
    reference = squared[IDS] @ float_equivalent_weight(result.model, w)
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-5)


def float_equivalent_weight(model: onnx.ModelProto, w: np.ndarray) -> np.ndarray:
    """The MatMul's weight as the quantized model computes with it (it is the last layer: 8-bit QDQ or float)."""
    dequantized = float_equivalent(model)
    reader = next(n for n in dequantized.graph.node if n.op_type == "MatMul")
    init = next((t for t in dequantized.graph.initializer if t.name == reader.input[1]), None)
    return numpy_helper.to_array(init) if init is not None else w


def test_a_table_shared_with_a_gemm_stays_dequantized_for_both():
    """A tied output layer needs the whole table anyway: one DequantizeLinear feeds the Gather and the Gemm."""
    model = lookup_then_matmul(tie=True)
    result = quantize_with_report(model, QuantizeConfig(bits=8, first_last_bits=None))
    assert not any(n.op_type == "GatherBlockQuantized" for n in result.model.graph.node)
    (layer,) = [layer for layer in result.layers if layer.tensor == "table"]
    assert (layer.op, sorted(layer.op_types)) == ("DequantizeLinear", ["Gather", "Gemm"])
    feeds = {"ids": IDS}
    np.testing.assert_allclose(run(result.model, feeds), run(float_equivalent(result.model), feeds), rtol=1e-5, atol=1e-6)


def test_gathers_that_are_not_embeddings_are_neither_quantized_nor_reported():
    """Gather from an activation, an int64 shape table or a 1-D float table is an ordinary op."""
    v = helper.make_tensor_value_info
    nodes = [
        helper.make_node("Gather", ["x", "i"], ["a"], name="pick", axis=1),
        helper.make_node("Gather", ["dims", "i"], ["d"], name="dim"),
        helper.make_node("Gather", ["gains", "i"], ["g"], name="gain"),
        helper.make_node("Mul", ["a", "g"], ["ag"]),
        helper.make_node("MatMul", ["ag", "w"], ["y"], name="mm"),
    ]
    inits = [
        numpy_helper.from_array(np.array(1, np.int64), "i"),
        numpy_helper.from_array(np.array([2, 3, 4], np.int64), "dims"),
        numpy_helper.from_array(np.ones(3, np.float32), "gains"),
        numpy_helper.from_array(np.ones((4, 4), np.float32), "w"),
    ]
    outputs = [v("y", TensorProto.FLOAT, [2, 4]), v("d", TensorProto.INT64, [])]
    graph = helper.make_graph(nodes, "g", [v("x", TensorProto.FLOAT, [2, 3, 4])], outputs, inits)
    result = quantize_with_report(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), QuantizeConfig(bits=8))
    assert [layer.tensor for layer in result.layers] == ["w"] and result.skipped == []


def test_cli_says_how_the_table_is_looked_up_and_inspect_lists_it(tmp_path, capsys):
    path, out = tmp_path / "lm.onnx", tmp_path / "q.onnx"
    onnx.save(lookup_then_matmul(), path)
    assert main(["quantize", str(path), "-b", "4", "--first-last-bits", "4", "-o", str(out)]) == 0
    assert "embedding tables: 1 looked up by onnxruntime's GatherBlockQuantized" in capsys.readouterr().out
    rows = {n.node: n for n in inspect_model(out).nodes}
    assert (rows["embed"].op_type, rows["embed"].format, rows["embed"].bits) == ("GatherBlockQuantized", "uint4", 4)
    assert rows["embed"].weight_bytes == V * 24 // 2


def test_a_table_keeps_8_bits_when_reduce_range_cuts_the_products_weights():
    """Reduce range exists for onnxruntime's integer products; a lookup has none, so its table keeps all 8 bits."""
    from onnxq.config import ActivationConfig, ReduceRange

    config = QuantizeConfig(bits=8, first_last_bits=None, activations=ActivationConfig(), reduce_range=ReduceRange.ON)
    result = quantize_with_report(lookup_then_matmul(), config, [{"ids": IDS}])
    assert {layer.tensor: layer.bits for layer in result.layers} == {"table": 8, "w": 7}
    assert [a.tensor for a in result.activations] == ["e"]
    assert np.abs(run(result.model, {"ids": IDS}) - run(lookup_then_matmul(), {"ids": IDS})).max() > 0
