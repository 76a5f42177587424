"""Graph preparation: BatchNorm folding, Constant lifting, constant weight paths, node naming."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from conftest import CAST_FORM, assert_op_counts, decoded_weights, float_equivalent, random_feeds, run
from onnx import TensorProto, helper, numpy_helper

from models import conv_bn_relu_gemm, sliced_lstm_in_if
from onnxq.config import QuantizeConfig
from onnxq.model.graph import all_graphs
from onnxq.model.prepare import fold_batch_norms, fold_constant_paths, lift_constants, name_nodes, prepare
from onnxq.pipeline import quantize_with_report


def test_bn_folding_keeps_outputs():
    model = conv_bn_relu_gemm(with_bn=True)
    feeds = random_feeds(model, batch=3)
    expected = run(model, feeds)
    prepared = prepare(_copy(model))
    assert_op_counts(prepared, BatchNormalization=0, Conv=2)
    np.testing.assert_allclose(run(prepared, feeds), expected, rtol=1e-4, atol=1e-5)


def test_nothing_to_fold_needs_no_reference_evaluator(monkeypatch):
    """onnx.reference (6-10 MB of modules, in every run's peak) is imported only when a node is folded."""
    monkeypatch.setitem(sys.modules, "onnx.reference", None)  # importing it now raises ImportError
    prepared = prepare(_copy(conv_bn_relu_gemm(with_bn=True)))
    assert_op_counts(prepared, BatchNormalization=0, Conv=2)


def test_fresh_copy_only_where_a_pass_replaced_tensors():
    """prepare(fresh=True) returns a new model where tensors were replaced (their memory goes with the old one), else the same."""
    model = conv_bn_relu_gemm(with_bn=True)
    feeds = random_feeds(model)
    expected = run(model, feeds)
    prepared = prepare(_copy(model), fresh=True)
    np.testing.assert_allclose(run(prepared, feeds), expected, rtol=1e-4, atol=1e-5)
    untouched = prepare(prepared)  # nothing left to fold
    assert prepare(untouched, fresh=True) is untouched
    source = _copy(model)
    assert prepare(source, fresh=True) is not source


def test_bn_folding_adds_bias_when_conv_has_none():
    model = conv_bn_relu_gemm(with_bn=True)
    conv = model.graph.node[0]
    del conv.input[2:]  # conv1 without bias
    feeds = random_feeds(model)
    expected = run(model, feeds)
    assert fold_batch_norms(model.graph) == 1
    assert len(model.graph.node[0].input) == 3
    np.testing.assert_allclose(run(model, feeds), expected, rtol=1e-4, atol=1e-5)


def test_bn_not_folded_when_conv_output_has_other_readers():
    model = conv_bn_relu_gemm(with_bn=True)
    from onnx import helper

    # A second reader of the Conv output must keep seeing the un-normalised values.
    model.graph.node.append(helper.make_node("Identity", ["c1"], ["c1_copy"], name="tap"))
    model.graph.output.append(helper.make_tensor_value_info("c1_copy", 1, None))
    assert fold_batch_norms(model.graph) == 0
    assert_op_counts(model, BatchNormalization=1)


def test_constant_nodes_become_initializers():
    model = conv_bn_relu_gemm(as_constants=True)
    feeds = random_feeds(model)
    expected = run(model, feeds)
    assert lift_constants(model.graph) == 9
    assert_op_counts(model, Constant=0)
    assert {t.name for t in model.graph.initializer} >= {"w1", "w2", "w3"}
    np.testing.assert_allclose(run(model, feeds), expected, rtol=1e-6)


def test_unnamed_nodes_get_unique_names():
    model = conv_bn_relu_gemm()
    for node in model.graph.node[:3]:
        node.name = ""
    model.graph.node[3].name = "Conv_0"  # a clash the generated names must avoid
    assert name_nodes(model.graph) == 3
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)


def _copy(model):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def test_identity_of_initializer_is_bypassed():
    from onnx import helper

    from onnxq.model.prepare import bypass_constant_identities

    model = conv_bn_relu_gemm(with_bn=False)
    # Some exporters read weights through Identity nodes: conv2 reads Identity(w2).
    model.graph.node.insert(0, helper.make_node("Identity", ["w2"], ["w2_alias"], name="alias"))
    next(n for n in model.graph.node if n.name == "conv2").input[1] = "w2_alias"
    feeds = random_feeds(model)
    expected = run(model, feeds)
    assert bypass_constant_identities(model.graph) == 1
    assert_op_counts(model, Identity=0)
    assert next(n for n in model.graph.node if n.name == "conv2").input[1] == "w2"
    np.testing.assert_array_equal(run(model, feeds), expected)


def _weight_path_model(
    path: list[onnx.NodeProto], weight: np.ndarray, reader: onnx.NodeProto, shapes: tuple[list, list], extra: dict[str, np.ndarray] | None = None
) -> onnx.ModelProto:
    """x -> reader(x, <weight after ``path``>) -> y, with ``weight`` (and ``extra``) as initializers; ``shapes`` of x and y."""
    inits = [numpy_helper.from_array(weight, "w")] + [numpy_helper.from_array(v, k) for k, v in (extra or {}).items()]
    graph = helper.make_graph(
        [*path, reader],
        "weight_path",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shapes[0])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shapes[1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_transposed_weight_is_computed_ahead_and_then_quantized():
    """The TorchScript exporter without constant folding writes MatMul(x, Transpose(W)); the weight must still count."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 24)).astype(np.float32)
    transpose, matmul = helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])
    model = _weight_path_model([transpose], w, matmul, (["N", 24], ["N", 16]))
    feeds = {"x": rng.standard_normal((3, 24)).astype(np.float32)}
    expected = run(model, feeds)
    prepared = prepare(_copy(model))
    assert_op_counts(prepared, Transpose=0, MatMul=1)
    np.testing.assert_array_equal(run(prepared, feeds), expected)
    result = quantize_with_report(model, QuantizeConfig(bits=8))
    assert [layer.nodes for layer in result.layers] == [(prepared.graph.node[0].name,)]


def test_a_weight_reshaped_by_a_value_ints_constant_is_quantized():
    """torch's dynamo exporter writes integer constants as Constant(value_ints); the Reshape they feed is computed ahead."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(24 * 16).astype(np.float32)
    shape = helper.make_node("Constant", [], ["shape"], value_ints=[24, 16])
    reshape, matmul = helper.make_node("Reshape", ["w", "shape"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])
    model = _weight_path_model([shape, reshape], w, matmul, (["N", 24], ["N", 16]))
    feeds = {"x": rng.standard_normal((3, 24)).astype(np.float32)}
    prepared = prepare(_copy(model))
    assert_op_counts(prepared, Constant=0, Reshape=0, MatMul=1)
    np.testing.assert_array_equal(run(prepared, feeds), run(model, feeds))
    result = quantize_with_report(model, QuantizeConfig(bits=8))
    assert len(result.layers) == 1 and not result.skipped


def _gru_sliced_by_shape(hidden: int = 5, inputs: int = 4, batch: int = 2) -> tuple[onnx.ModelProto, np.ndarray]:
    """x[T,2,4] -> GRU(W, R, initial_h=h0) -> y, the form torch's dynamo exporter writes without its optimizer:
    h0 = Expand(0, [1,2,H]); H = Shape(h0)[2]; W = Unsqueeze(Concat(w[H:2H], w[0:H], w[2H:3H])) (torch's gates reordered).
    Returns the model and W in ONNX's gate order.
    """
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3 * hidden, inputs)).astype(np.float32)
    r = rng.standard_normal((1, 3 * hidden, hidden)).astype(np.float32) * 0.3
    consts = {"w": w, "r": r, "zero": np.zeros((), np.float32), "h0_shape": np.array([1, batch, hidden], np.int64),
              "two": np.array(2, np.int64), "three": np.array(3, np.int64), "begin": np.array([0], np.int64), "axis": np.array([0], np.int64)}
    nodes = [
        helper.make_node("Expand", ["zero", "h0_shape"], ["h0"]),
        helper.make_node("Shape", ["h0"], ["h"], start=2, end=3),
        helper.make_node("Mul", ["h", "two"], ["h2"]),
        helper.make_node("Mul", ["h", "three"], ["h3"]),
        helper.make_node("Slice", ["w", "begin", "h", "axis"], ["w_z"]),
        helper.make_node("Slice", ["w", "h", "h2", "axis"], ["w_r"]),
        helper.make_node("Slice", ["w", "h2", "h3", "axis"], ["w_n"]),
        helper.make_node("Concat", ["w_r", "w_z", "w_n"], ["w_onnx"], axis=0),
        helper.make_node("Unsqueeze", ["w_onnx", "axis"], ["W"]),
        helper.make_node("GRU", ["x", "W", "r", "", "", "h0"], ["y"], name="gru", hidden_size=hidden, linear_before_reset=1),
    ]
    graph = helper.make_graph(nodes, "gru_sliced", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", batch, inputs])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 1, batch, hidden])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    z, rr, n = np.split(w, 3)
    return model, np.concatenate([rr, z, n])[None]


def test_recurrent_weights_sliced_at_a_shape_are_computed_ahead_and_quantized():
    """Shape(h0)[2] is known (h0's shape is a constant): folded, the slices of W are a constant path to the weight."""
    model, w_onnx = _gru_sliced_by_shape()
    x = np.random.default_rng(4).standard_normal((6, 2, 4)).astype(np.float32)
    expected = run(model, {"x": x})
    prepared = prepare(_copy(model))
    assert_op_counts(prepared, Shape=0, Slice=0, Concat=0, GRU=1)
    gru = next(n for n in prepared.graph.node if n.op_type == "GRU")
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in prepared.graph.initializer if t.name == gru.input[1])), w_onnx)
    np.testing.assert_array_equal(run(prepared, {"x": x}), expected)
    result = quantize_with_report(model, QuantizeConfig(bits=8, first_last_bits=None))
    assert sorted(layer.tensor for layer in result.layers) == sorted([gru.input[1], "r"]) and not result.skipped
    assert 0 < np.linalg.norm(run(result.model, {"x": x}) - expected) / np.linalg.norm(expected) < 0.03


def test_a_float16_weight_behind_a_cast_is_quantized():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float16)
    cast, conv = helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT), helper.make_node("Conv", ["x", "w32"], ["y"])
    model = _weight_path_model([cast], w, conv, (["N", 3, 6, 6], ["N", 4, 4, 4]))
    result = quantize_with_report(model, QuantizeConfig(bits=8))
    assert len(result.layers) == 1 and not result.skipped
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    got, want = run(result.model, {"x": x}), run(model, {"x": x})
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02  # 8-bit weights: about 0.5 %


def test_constant_paths_that_broadcast_or_reach_a_graph_output_stay():
    rng = np.random.default_rng(2)
    column, row = rng.standard_normal((4, 1)).astype(np.float32), rng.standard_normal((1, 4)).astype(np.float32)
    matmul, shapes = helper.make_node("MatMul", ["x", "w2"], ["y"]), (["N", 4], ["N", 4])
    grows = _weight_path_model([helper.make_node("Add", ["w", "r"], ["w2"])], column, matmul, shapes, {"r": row})
    assert fold_constant_paths(grows.graph, 17) == 0  # (4, 1) + (1, 4) -> (4, 4): more data than either input
    scale = {"s": np.array(2.0, dtype=np.float32)}
    same = _weight_path_model([helper.make_node("Mul", ["w", "s"], ["w2"])], column, matmul, (["N", 4], ["N", 1]), scale)
    assert fold_constant_paths(same.graph, 17) == 1
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in same.graph.initializer if t.name == "w2")), column * 2)
    output = _weight_path_model([], column, helper.make_node("Transpose", ["w"], ["y"], perm=[1, 0]), ([1], [1, 4]))
    assert fold_constant_paths(output.graph, 17) == 0


def _nested_bodies_model() -> onnx.ModelProto:
    """x[1,4] -> MatMul(w) -> h -> Loop(2 times, s = h): s = If(flag): MatMul(MatMul(s, wc), w') else MatMul(s, wc)
    wc is a Constant node of the Loop body; w' an initializer of the If's then branch named "w" like the main graph's.
    """
    rng = np.random.default_rng(3)
    v = helper.make_tensor_value_info
    then_w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")  # same name, other values
    then_branch = helper.make_graph([helper.make_node("MatMul", ["m", "w"], ["t"])], "then", [], [v("t", TensorProto.FLOAT, [1, 4])], [then_w])
    else_branch = helper.make_graph([helper.make_node("Identity", ["m"], ["e"])], "else", [], [v("e", TensorProto.FLOAT, [1, 4])])
    wc = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "wc")
    body = helper.make_graph(
        [
            helper.make_node("Constant", [], ["wc"], value=wc),
            helper.make_node("MatMul", ["s_in", "wc"], ["m"]),
            helper.make_node("If", ["flag"], ["s_out"], then_branch=then_branch, else_branch=else_branch),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [v("i", TensorProto.INT64, []), v("cond_in", TensorProto.BOOL, []), v("s_in", TensorProto.FLOAT, [1, 4])],
        [v("cond_out", TensorProto.BOOL, []), v("s_out", TensorProto.FLOAT, [1, 4])],
    )
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Loop", ["trips", "", "h"], ["y"], name="loop", body=body)]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w"), numpy_helper.from_array(np.array(2, np.int64), "trips")]
    inputs = [v("x", TensorProto.FLOAT, [1, 4]), v("flag", TensorProto.BOOL, [])]
    graph = helper.make_graph(nodes, "nested", inputs, [v("y", TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weights_of_nested_bodies_move_to_the_main_graph_and_keep_the_outputs():
    model = _nested_bodies_model()
    onnx.checker.check_model(model)
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    expected = {flag: run(model, {"x": x, "flag": np.array(flag)}) for flag in (True, False)}
    prepared = prepare(_copy(model))
    onnx.checker.check_model(prepared)
    loop = next(n for n in prepared.graph.node if n.op_type == "Loop")
    body = loop.attribute[0].g
    branch = next(n for n in body.node if n.op_type == "If")
    then_branch = next(a.g for a in branch.attribute if a.name == "then_branch")
    assert [n.op_type for n in body.node] == ["MatMul", "If", "Identity"] and list(body.initializer) == list(then_branch.initializer) == []
    inits = {t.name: numpy_helper.to_array(t) for t in prepared.graph.initializer}
    moved = then_branch.node[0].input[1]
    assert moved != "w" and set(inits) == {"w", "trips", "wc", moved}  # the inner "w" took a name of its own
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(inits["w"], original["w"])
    np.testing.assert_array_equal(inits[moved], numpy_helper.to_array(model.graph.node[1].attribute[0].g.node[2].attribute[1].g.initializer[0]))
    assert [n.name for n in body.node] == ["loop/MatMul_1", "loop/If_2", "loop/Identity_3"] and then_branch.node[0].name == "loop/If_2/MatMul_0"
    for flag in (True, False):
        np.testing.assert_array_equal(run(prepared, {"x": x, "flag": np.array(flag)}), expected[flag])


def test_weights_of_nested_bodies_are_quantized():
    model = _nested_bodies_model()
    result = quantize_with_report(model, QuantizeConfig(bits=8, first_last_bits=None))
    assert sorted(layer.nodes for layer in result.layers) == [("loop/If_2/MatMul_0",), ("loop/MatMul_1",), ("mm",)]
    assert all(t.data_type != TensorProto.FLOAT or t.name.endswith("_scale") for t in result.model.graph.initializer)
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        reference = run(model, feeds)
        quantized = run(result.model, feeds)
        assert 0 < np.linalg.norm(quantized - reference) / np.linalg.norm(reference) < 0.03


def _function_model() -> onnx.ModelProto:
    """x -> block1 = ConvRelu(x, w1, b1) -> block2 = ConvRelu(., w2, b2) -> y, ConvRelu a model-local function."""
    v = helper.make_tensor_value_info
    body = [helper.make_node("Conv", ["X", "W", "B"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["Y"])]
    function = helper.make_function("local", "ConvRelu", ["X", "W", "B"], ["Y"], body, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array(np.full(8, 0.1, np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("ConvRelu", ["x", "w1", "b1"], ["h"], domain="local", name="block1"),
        helper.make_node("ConvRelu", ["h", "w2", "b2"], ["y"], domain="local", name="block2"),
    ]
    graph = helper.make_graph(nodes, "f", [v("x", TensorProto.FLOAT, ["N", 3, 8, 8])], [v("y", TensorProto.FLOAT, ["N", 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[function])


def test_model_local_functions_are_inlined_and_their_weights_quantized():
    model = _function_model()
    feeds = random_feeds(model)
    result = quantize_with_report(model, QuantizeConfig(bits=8, first_last_bits=None))
    assert [(layer.tensor, layer.nodes) for layer in result.layers] == [("w1", ("ConvRelu/Conv_0__1",)), ("w2", ("ConvRelu/Conv_0__2",))]
    assert len(model.functions) == 1 and model.graph.node[0].op_type == "ConvRelu"  # the caller's model is left as it was
    assert not result.model.functions and {n.op_type for n in result.model.graph.node} == {"Cast", "Mul", "Conv", "Relu"}
    assert [(w.form, w.axis) for w in decoded_weights(result.model)] == [(CAST_FORM, 0)] * 2
    np.testing.assert_allclose(run(result.model, feeds), run(float_equivalent(result.model), feeds), rtol=1e-5, atol=1e-6)
    reference = run(model, feeds)
    assert 0 < np.linalg.norm(run(result.model, feeds) - reference) / np.linalg.norm(reference) < 0.02


def test_a_torch_lstms_sliced_weights_inside_an_if_are_computed_ahead_and_quantized():
    """The Slice/Concat/Unsqueeze chain on a branch's Constant becomes one main-graph weight per LSTM input, in ONNX's gate order."""
    model = sliced_lstm_in_if()
    then_branch = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    torch_order = {n.output[0][0]: numpy_helper.to_array(n.attribute[0].t) for n in then_branch.node if n.output[0].endswith("_torch")}
    x = np.random.default_rng(1).standard_normal((3, 2, 8)).astype(np.float32)
    expected = {flag: run(model, {"x": x, "cond": np.array(flag)}) for flag in (True, False)}
    prepared = prepare(_copy(model))
    onnx.checker.check_model(prepared)
    branch = next(a.g for a in prepared.graph.node[0].attribute if a.name == "then_branch")
    lstm = next(n for n in branch.node if n.op_type == "LSTM")
    assert not any(n.op_type in ("Slice", "Concat") for n in branch.node)
    inits = {t.name: numpy_helper.to_array(t) for t in prepared.graph.initializer}
    for index, name in ((1, "W"), (2, "R")):
        gates = np.split(torch_order[name], 4)  # torch: i, f, g, o
        np.testing.assert_array_equal(inits[lstm.input[index]], np.concatenate([gates[0], gates[3], gates[1], gates[2]])[None])
    assert not any(t.name.endswith("_torch") for g in all_graphs(prepared.graph) for t in g.initializer)  # the torch-order copies are gone
    for flag in (True, False):
        np.testing.assert_array_equal(run(prepared, {"x": x, "cond": np.array(flag)}), expected[flag])
    result = quantize_with_report(model, QuantizeConfig(bits=8, first_last_bits=None))
    assert sorted(layer.tensor for layer in result.layers if layer.nodes == ("lstm",)) == sorted([lstm.input[1], lstm.input[2]])
    quantized = run(result.model, {"x": x, "cond": np.array(True)})
    assert 0 < np.linalg.norm(quantized - expected[True]) / np.linalg.norm(expected[True]) < 0.03


def _two_matmuls(second: np.ndarray, first: np.ndarray) -> onnx.ModelProto:
    """x[4,4] -> MatMul(w_a) -> MatMul(w_b) -> Add(c) -> y: two weights and a constant that is not a weight."""
    v = helper.make_tensor_value_info
    nodes = [helper.make_node("MatMul", ["x", "w_a"], ["a"]), helper.make_node("MatMul", ["a", "w_b"], ["b"]),
             helper.make_node("Add", ["b", "c"], ["y"])]
    inits = [numpy_helper.from_array(first, "w_a"), numpy_helper.from_array(second, "w_b"), numpy_helper.from_array(first, "c")]
    graph = helper.make_graph(nodes, "g", [v("x", TensorProto.FLOAT, [4, 4])], [v("y", TensorProto.FLOAT, [4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_equal_weights_are_merged_and_other_constants_are_not():
    from onnxq.model.prepare import merge_identical_weights

    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    model = _two_matmuls(w.copy(), w)  # w_a == w_b == c; c is an Add's operand, not a weight
    x = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
    before = run(model, {"x": x})
    assert merge_identical_weights(model.graph) == 1
    assert sorted(t.name for t in model.graph.initializer) == ["c", "w_a"]
    assert [n.input[1] for n in model.graph.node] == ["w_a", "w_a", "c"]
    np.testing.assert_array_equal(run(model, {"x": x}), before)


def test_weights_that_differ_in_one_value_or_in_type_stay_apart():
    from onnxq.model.prepare import merge_identical_weights

    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    nudged = w.copy()
    nudged[3, 3] = np.nextafter(nudged[3, 3], np.float32(np.inf))
    assert merge_identical_weights(_two_matmuls(nudged, w).graph) == 0
    assert merge_identical_weights(_two_matmuls(w.reshape(4, 4).T.copy(), w).graph) == 0  # same bytes multiset, other layout


def _listing_initializers(model: onnx.ModelProto, which: str) -> onnx.ModelProto:
    """``model`` (IR 8) with its initializers also listed as graph inputs: "all" of them, or only the "weights" (rank >= 2)."""
    listed = [t for t in model.graph.initializer if which == "all" or len(t.dims) >= 2]
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in listed)
    model.ir_version = 8
    return model


def test_initializers_all_listed_as_inputs_are_unlisted_and_quantized(caplog):
    model = conv_bn_relu_gemm(with_bn=True)
    initializers = {t.name for t in model.graph.initializer}
    feeds = random_feeds(model, batch=2)
    expected = run(model, feeds)
    listed = _listing_initializers(_copy(model), "all")
    prepared = prepare(_copy(listed))
    assert [i.name for i in prepared.graph.input] == ["x"]
    assert_op_counts(prepared, BatchNormalization=0)  # the BatchNorm's parameters are constants again: folded
    np.testing.assert_allclose(run(prepared, feeds), expected, rtol=1e-4, atol=1e-5)
    assert "no longer lists them as inputs" in caplog.text
    result = quantize_with_report(listed, QuantizeConfig(bits=4))
    assert {layer.tensor for layer in result.layers} & initializers  # the weights are quantized, not refused
    assert [i.name for i in result.model.graph.input] == ["x"]


def test_initializers_some_listed_as_inputs_stay_inputs_and_float():
    listed = _listing_initializers(conv_bn_relu_gemm(with_bn=False), "weights")
    names = [i.name for i in listed.graph.input]
    assert len(names) > 1
    prepared = prepare(_copy(listed))
    assert [i.name for i in prepared.graph.input] == names


def _fused_matmul_model(trans_b: int, alpha: float) -> onnx.ModelProto:
    """x[N,3,16] -> com.microsoft FusedMatMul(x, W, transB, alpha) -> Relu -> y[N,3,8], as onnxruntime's optimizer saves it."""
    rng = np.random.default_rng(5)
    shape = (8, 16) if trans_b else (16, 8)
    w = numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), "w")
    nodes = [helper.make_node("FusedMatMul", ["x", "w"], ["m"], name="fused", domain="com.microsoft", transB=trans_b, alpha=alpha),
             helper.make_node("Relu", ["m"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_a_fused_matmul_with_a_constant_weight_becomes_matmul_and_is_quantized(trans_b):
    model = _fused_matmul_model(trans_b, alpha=0.5)
    x = np.random.default_rng(6).standard_normal((4, 3, 16)).astype(np.float32)
    w = numpy_helper.to_array(model.graph.initializer[0])
    expected = np.maximum(0.5 * (x @ (w.T if trans_b else w)), 0)  # numpy's own FusedMatMul
    np.testing.assert_allclose(run(model, {"x": x}), expected, rtol=1e-5, atol=1e-5)
    prepared = prepare(_copy(model))
    assert_op_counts(prepared, FusedMatMul=0, MatMul=1)
    np.testing.assert_allclose(run(prepared, {"x": x}), expected, rtol=1e-5, atol=1e-5)
    result = quantize_with_report(model, QuantizeConfig(bits=8, first_last_bits=None))
    assert [layer.op_types for layer in result.layers] == [("MatMul",)]
    got = run(result.model, {"x": x})
    assert 10 * np.log10(np.sum(expected**2) / np.sum((got - expected) ** 2)) > 35


def test_a_fused_matmul_transposing_its_activation_stays():
    model = _fused_matmul_model(0, alpha=1.0)
    model.graph.node[0].attribute.append(helper.make_attribute("transBatchA", 1))
    assert_op_counts(prepare(_copy(model)), FusedMatMul=1, MatMul=0)
