"""onnxq inspect: formats, bits, granularity and stored bytes of any model's weights, checked against the initializers."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from conftest import CAST_FORM, decoded_weight, decoded_weight_counts
from onnx import TensorProto, helper, numpy_helper

from models import conv_bn_relu_gemm, conv_then_if, depthwise_convtranspose, shared_weight_matmuls
from onnxq.analysis.inventory import inspect_model
from onnxq.cli import main
from onnxq.config import Granularity, NBitsMode, QuantizeConfig, SqrtMode, WeightFormat
from onnxq.model.save import save_model
from onnxq.pipeline import quantize

INT_TYPES = {TensorProto.INT4: ("int4", 4), TensorProto.INT8: ("int8", 8), TensorProto.UINT8: ("uint8", 8)}
BITS = {**{t: b for t, (_, b) in INT_TYPES.items()}, TensorProto.FLOAT: 32}


def _bytes(tensor: onnx.TensorProto) -> int:
    """Stored bytes of an initializer from its dims and type."""
    return (math.prod(tensor.dims) * BITS[tensor.data_type] + 7) // 8


def _by_node(inventory):
    return {n.node: n for n in inventory.nodes}


def _qdq_expectations(model: onnx.ModelProto) -> dict[str, dict]:
    """For each Conv/Gemm/MatMul, what its weight is, read off onnxq's rewrite by the tests' own decoder: DequantizeLinear,
    or Cast and Mul by a scale shaped along the channel axis [-> Abs, Mul]."""
    inits = {t.name: t for t in model.graph.initializer}
    expected = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        if node.input[1] in inits:
            t = inits[node.input[1]]
            expected[node.name] = {"format": "float32", "bits": 32, "weight_bytes": 4 * math.prod(t.dims), "sqrt": False, "granularity": None}
            continue
        decoded = decoded_weight(model, node.input[1])
        stored = inits[decoded.codes_name]  # int8, or 4-bit codes as uint8 halves (the decoder reads them as int4)
        fmt, bits = INT_TYPES[decoded.codes_type]
        count = decoded.codes.size
        assert len(stored.raw_data) == (count * bits + 7) // 8
        expected[node.name] = {
            "format": fmt,
            "bits": bits,
            "weight_bytes": (count * bits + 7) // 8,
            "sqrt": decoded.sqrt,
            "granularity": "channel" if decoded.axis is not None else "tensor",
            "axis": decoded.axis,
            "scale_bytes": decoded.scale.nbytes + (0 if decoded.zero_point is None else decoded.zero_point.nbytes),
        }
    return expected


def _describe(row, keys):
    return {k: getattr(row, k) for k in keys}


@pytest.mark.parametrize("sqrt", [SqrtMode.OFF, SqrtMode.ON])
@pytest.mark.parametrize("granularity", [Granularity.CHANNEL, Granularity.TENSOR])
@pytest.mark.parametrize("nbits", [NBitsMode.AUTO, NBitsMode.ON], ids=lambda mode: mode.value)
def test_onnxq_qdq_int4_int8(tmp_path, sqrt, granularity, nbits, capsys):
    """Weights decoded at load (Cast and Mul) are read as their codes, with the granularity of the scale's shape; with
    --matmul-nbits on the 8-bit classifier is onnxruntime's MatMulNBits (by default its 160 weights are decoded at load)."""
    path = tmp_path / "q.onnx"
    save_model(quantize(conv_bn_relu_gemm(c=16), QuantizeConfig(bits=4, sqrt=sqrt, granularity=granularity, matmul_nbits=nbits)), path)
    model = onnx.load(path)
    assert decoded_weight_counts(model) == {CAST_FORM: 2 if nbits is NBitsMode.ON else 3}
    inventory = inspect_model(path)
    expected = _qdq_expectations(model)
    (fc,) = [n for n in model.graph.node if n.name == "fc"]
    inits = {t.name: t for t in model.graph.initializer}
    if nbits is NBitsMode.ON:
        assert fc.op_type == "MatMulNBits"
        expected["fc"] = {"format": "uint8", "bits": 8, "weight_bytes": _bytes(inits[fc.input[1]]), "scale_bytes": _bytes(inits[fc.input[2]])}
        assert {k: v["format"] for k, v in expected.items()} == {"conv1": "int8", "conv2": "int4", "fc": "uint8"}
    else:
        assert {k: v["format"] for k, v in expected.items()} == {"conv1": "int8", "conv2": "int4", "fc": "int8"}
        assert {k: v["granularity"] for k, v in expected.items()} == dict.fromkeys(expected, granularity.value)
        assert {k: v["axis"] for k, v in expected.items()} == dict.fromkeys(expected, 0 if granularity is Granularity.CHANNEL else None)
    rows = _by_node(inventory)
    assert set(rows) == set(expected), "Cast/Mul of the decoding and Abs/Mul of sqrt mode must not be listed as weighted nodes"
    for name, want in expected.items():
        assert _describe(rows[name], want) == want, name
        assert rows[name].activations == "float"
    int8 = ("int8", "uint8") if nbits is NBitsMode.ON else ("int8",)
    assert inventory.weight_bytes_by_format == {"int4": expected["conv2"]["weight_bytes"],
                                                **{f: sum(v["weight_bytes"] for v in expected.values() if v["format"] == f) for f in int8}}
    assert inventory.file_bytes == path.stat().st_size
    assert inventory.opsets == ({"ai.onnx": 17, "com.microsoft": 1} if nbits is NBitsMode.ON else {"ai.onnx": 17})  # weight-only: kept
    assert not inventory.needs_onnxq_library
    initializers = onnx.load(path).graph.initializer
    assert inventory.initializer_bytes == sum(len(t.raw_data) for t in initializers)
    assert main(["inspect", str(path)]) == 0  # the CLI's table says the same
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["conv2", "Conv", "int4", "4"] in [line[:4] for line in table]
    assert (["fc", "MatMulNBits", "uint8", "8"] if nbits is NBitsMode.ON else ["fc", "Gemm", "int8", "8"]) in [line[:4] for line in table]


def test_shared_weight_is_counted_once(tmp_path):
    path = tmp_path / "mm.onnx"
    save_model(quantize(shared_weight_matmuls(), QuantizeConfig(bits=4, first_last_bits=None)), path)
    inventory = inspect_model(path)
    assert [n.node for n in inventory.nodes] == ["mm1", "mm2", "mm3"]
    assert {n.weight for n in inventory.nodes} == {"w_quantized"}
    assert inventory.weight_bytes_by_format == {"int4": 16 * 16 // 2}
    assert inventory.scale_bytes == 4 * 16
    assert all(n.granularity == "channel" and n.axis == 1 for n in inventory.nodes)


@pytest.mark.parametrize(("fmt", "bits", "op", "label"), [(WeightFormat.INT, 4, "IntConv", "int4"), (WeightFormat.INT, 6, "IntConv", "int8"),
                                                          (WeightFormat.POST, 3, "PostConv", "POST")])
def test_onnxq_library_ops(tmp_path, fmt, bits, op, label):
    c = 16
    float_model = conv_bn_relu_gemm(c=c)
    path = tmp_path / "ops.onnx"
    save_model(quantize(float_model, QuantizeConfig(bits=bits, format=fmt, first_last_bits=None)), path)
    inventory = inspect_model(path)
    rows = _by_node(inventory)
    k = {"conv1": 3 * 3 * 3, "conv2": c * 3 * 3}  # codes per output channel, from the float model's weight shapes
    for name in ("conv1", "conv2"):
        row = rows[name]
        row_bytes = (k[name] + 1) // 2 if bits <= 4 else k[name]
        assert (row.op_type, row.format, row.bits, row.granularity, row.activations) == (op, label, bits, "channel", "uint8 dynamic")
        assert (row.weight_bytes, row.scale_bytes) == (c * row_bytes, 4 * c)
    assert rows["fc"].op_type == "Gemm" and rows["fc"].format == ("int4" if bits <= 4 else "int8")
    assert inventory.needs_onnxq_library and inventory.custom_domains == ["ai.onnxq"]


def test_float_model(tmp_path):
    model = depthwise_convtranspose()
    path = tmp_path / "f.onnx"
    onnx.save_model(model, path)
    inventory = inspect_model(path)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert [(n.node, n.op_type, n.format, n.bits, n.weight_bytes, n.granularity) for n in inventory.nodes] == [
        ("depthwise", "Conv", "float32", 32, arrays["dw"].nbytes, None),
        ("up", "ConvTranspose", "float32", 32, arrays["up"].nbytes, None),
    ]
    assert inventory.weight_bytes_by_format == {"float32": arrays["dw"].nbytes + arrays["up"].nbytes}
    assert inventory.custom_domains == [] and not inventory.needs_onnxq_library


def test_subgraph_weights_are_listed(tmp_path):
    """A body's Conv is listed under the name quantize gives it, float before and int4 after (its codes sit in the main graph)."""
    float_path, path = tmp_path / "float.onnx", tmp_path / "if.onnx"
    onnx.save(conv_then_if(), float_path)
    branch = _by_node(inspect_model(float_path))["branch/Conv_0"]
    assert (branch.format, branch.weight, branch.weight_bytes) == ("float32", "w2", 4 * 8 * 8 * 3 * 3)
    save_model(quantize(conv_then_if(), QuantizeConfig(bits=4, first_last_bits=None, sqrt=SqrtMode.ON)), path)
    rows = _by_node(inspect_model(path))
    assert set(rows) == {"conv", "branch/Conv_0"}  # not sqrt mode's Abs/Mul, which only compute the body's weight
    assert (rows["conv"].format, rows["branch/Conv_0"].format, rows["branch/Conv_0"].sqrt) == ("int4", "int4", True)
    assert rows["branch/Conv_0"].weight_bytes == 8 * 8 * 3 * 3 // 2


def test_unnamed_nodes_get_the_names_quantize_gives_them_even_where_a_name_is_taken(tmp_path):
    """An unnamed Conv at index 1 whose natural name Conv_1 another node already has: quantize calls it Conv_1_1 (its
    --exclude and report name), and inspect must list it under that name, not a second Conv_1."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), name) for name in ("w1", "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="Conv_1"), helper.make_node("Conv", ["a", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert [n.node for n in inspect_model(path).nodes] == ["Conv_1", "Conv_1_1"]
    assert [n.node for n in inspect_model(model).nodes] == ["Conv_1", "Conv_1_1"]
    assert not model.graph.node[1].name  # the caller's model is not modified
    quantized = quantize(path, QuantizeConfig(bits=8))
    assert [n.name for n in quantized.graph.node if n.op_type == "Conv"] == ["Conv_1", "Conv_1_1"]


def test_any_op_reading_a_dequantized_constant():
    """x + DQ(int8 constant) is listed; Reshape's shape constant and a plain float Add are not."""
    codes = numpy_helper.from_array(np.arange(-4, 4, dtype=np.int8), "codes")
    scale = numpy_helper.from_array(np.float32(0.5), "s")
    shape = numpy_helper.from_array(np.array([2, 4], dtype=np.int64), "shape")
    bias = numpy_helper.from_array(np.ones(8, np.float32), "bias")
    nodes = [
        helper.make_node("DequantizeLinear", ["codes", "s"], ["w"], name="dq"),
        helper.make_node("Add", ["x", "w"], ["a"], name="add_q"),
        helper.make_node("Add", ["a", "bias"], ["b"], name="add_f"),
        helper.make_node("Reshape", ["b", "shape"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [codes, scale, shape, bias])
    inventory = inspect_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [(n.node, n.op_type, n.format, n.granularity, n.weight_bytes, n.scale_bytes) for n in inventory.nodes] == [
        ("add_q", "Add", "int8", "tensor", 8, 4)]


def test_external_data_is_not_read(tmp_path):
    path = tmp_path / "ext.onnx"
    save_model(quantize(conv_bn_relu_gemm(c=32), QuantizeConfig(bits=4)), path, external_data=True)
    data = tmp_path / "ext.onnx.data"
    assert data.exists()
    header = onnx.load(path, load_external_data=False)
    external = {t.name for t in header.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert "w2_quantized" in external
    inline = tmp_path / "inline.onnx"
    onnx.save_model(onnx.load(path), inline)
    want = inspect_model(inline)
    got = inspect_model(path)
    assert got.nodes == want.nodes and got.initializer_bytes == want.initializer_bytes
    assert got.external_files == {"ext.onnx.data": data.stat().st_size}
    assert got.file_bytes == path.stat().st_size + data.stat().st_size
    data.unlink()  # sizes come from the tensor headers, so inspect still works and says the file is missing
    missing = inspect_model(path)
    assert missing.nodes == want.nodes and missing.external_files == {"ext.onnx.data": None}


def _ort_quantized(tmp_path, kind: str):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"x": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    source, target = tmp_path / "float.onnx", tmp_path / f"{kind}.onnx"
    onnx.save_model(conv_bn_relu_gemm(with_bn=False), source)
    if kind == "dynamic":
        quantize_dynamic(source, target)
    else:
        quantize_static(source, target, Reader(), quant_format=QuantFormat.QDQ if kind == "qdq" else QuantFormat.QOperator, per_channel=kind == "qdq")
    return onnx.load(target), target


@pytest.mark.parametrize("kind", ["qdq", "qoperator", "dynamic"])
def test_onnxruntime_quantized_models(tmp_path, kind):
    model, path = _ort_quantized(tmp_path, kind)
    float_model = conv_bn_relu_gemm(with_bn=False)
    sizes = {t.name: math.prod(t.dims) for t in float_model.graph.initializer}
    inits = {t.name: t for t in model.graph.initializer}
    inventory = inspect_model(path)
    ops = {"qdq": ["Conv", "Conv", "Gemm"], "qoperator": ["QLinearConv", "QLinearConv", "QGemm"],
           "dynamic": ["ConvInteger", "ConvInteger", "MatMulInteger"]}[kind]
    assert [n.op_type for n in inventory.nodes] == ops
    for row, weight in zip(inventory.nodes, ("w1", "w2", "w3")):
        codes = inits[row.weight]
        assert (row.format, row.bits) == INT_TYPES[codes.data_type]
        assert row.weight_bytes == sizes[weight] == len(codes.raw_data)
        assert not row.sqrt
    if kind == "dynamic":
        assert {n.activations for n in inventory.nodes} == {"uint8 dynamic"}
    else:
        x_zero_point = inits["x_zero_point"]
        assert inventory.nodes[0].activations == f"{INT_TYPES[x_zero_point.data_type][0]} static"
    assert {n.granularity for n in inventory.nodes} == {"channel" if kind == "qdq" else "tensor"}
    assert not inventory.needs_onnxq_library and inventory.custom_domains == []


def test_cli_table_and_json(tmp_path, capsys):
    path = tmp_path / "q.onnx"
    save_model(quantize(conv_bn_relu_gemm(c=16), QuantizeConfig(bits=4, format=WeightFormat.POST)), path)
    assert main(["inspect", str(path)]) == 0
    table = capsys.readouterr().out
    assert "onnxq's op library" in table
    assert any(line.split()[:4] == ["conv2", "PostConv", "POST", "4"] for line in table.splitlines())
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["needs_onnxq_library"] is True
    assert [n["node"] for n in data["nodes"]] == ["conv1", "conv2", "fc"]
    assert data["weight_bytes_by_format"] == inspect_model(path).weight_bytes_by_format


@pytest.mark.parametrize("content", [None, b"not a model \x00\xff" * 8])
def test_cli_bad_input_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    assert main(["inspect", str(path)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and captured.out == ""
