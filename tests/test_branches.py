"""Calibration inside If bodies (onnxq/calibrate/branches.py): the branch the data take, inlined, gives its layers H.

References are numpy: the layers' inputs recomputed from the weights (or read off the model's own outputs) and
averaged directly.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from conftest import run
from onnx import TensorProto, helper, numpy_helper

from models import network_in_if, streaming_lstm_in_if
from onnxq.calibrate.branches import branch_view
from onnxq.config import QuantizeConfig
from onnxq.pipeline import calibrate, load_and_prepare, plan_quantization, quantize

WEIGHT_ONLY = QuantizeConfig(bits=4, first_last_bits=None)


def _hessians(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """H per weight from the pipeline's calibration stage, weight-only with data."""
    loaded = load_and_prepare(model)
    plan = plan_quantization(loaded, WEIGHT_ONLY, feeds)
    calibrated = calibrate(loaded, plan, WEIGHT_ONLY, feeds)
    assert calibrated is not None
    return calibrated.hessians


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


def _network_feeds(flags: list[bool], seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 16)).astype(np.float32), "cond": np.array(flag)} for flag in flags]


def _mean_outer(rows: list[np.ndarray]) -> np.ndarray:
    stacked = np.concatenate(rows).astype(np.float64)
    return stacked.T @ stacked / len(stacked)


def test_the_layers_of_the_branch_taken_get_the_h_of_their_inputs():
    model = network_in_if()
    feeds = _network_feeds([True] * 40)
    h = _hessians(model, feeds)
    w = _weights(model)
    x = [f["x"].astype(np.float64) for f in feeds]
    r1 = [np.maximum(a @ w["w1"], 0) for a in x]
    r2 = [np.maximum(a @ w["w2"], 0) for a in r1]
    for name, rows in (("w1", x), ("w2", r1), ("w3", r2)):
        np.testing.assert_allclose(h[name][0], _mean_outer(rows), rtol=1e-5, atol=1e-6, err_msg=name)
    assert "w_else" not in h  # the branch not taken: no data went through it


def test_the_other_branch_when_the_data_take_it():
    model = network_in_if()
    feeds = _network_feeds([False] * 20)
    h = _hessians(model, feeds)
    np.testing.assert_allclose(h["w_else"][0], _mean_outer([f["x"] for f in feeds]), rtol=1e-5, atol=1e-6)
    assert not {"w1", "w2", "w3"} & set(h)


def test_runs_that_leave_the_inlined_branch_take_its_h_away(caplog):
    """The first runs choose the branch; later runs taking the other one make its statistics wrong: dropped, and said."""
    model = network_in_if()
    feeds = _network_feeds([True] * 20 + [False] * 5 + [True] * 5)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        h = _hessians(model, feeds)
    assert not {"w1", "w2", "w3", "w_else"} & set(h)
    assert any("took another branch" in r.getMessage() for r in caplog.records)


def test_an_if_that_varies_on_the_first_runs_stays_an_if():
    model = network_in_if()
    feeds = _network_feeds([True, False] * 10)
    assert not {"w1", "w2", "w3", "w_else"} & set(_hessians(model, feeds))


def test_a_streaming_lstms_weights_see_the_step_inputs_and_the_fed_back_state():
    """W: the inputs x (one step a run); R: the state h the layer returns (the next run's h0), read off the model's state output."""
    model = streaming_lstm_in_if()
    rng = np.random.default_rng(1)
    state = np.zeros((2, 3, 16), np.float32)
    feeds, returned = [], []
    for _ in range(30):  # a stream: each run's state is the last one's
        feed = {"x": rng.standard_normal((3, 8)).astype(np.float32), "state": state, "cond": np.array(True)}
        feeds.append(feed)
        state = onnx_state = _state_out(model, feed)
        returned.append(onnx_state[0])
    h = _hessians(model, feeds)
    np.testing.assert_allclose(h["w_lstm"][0], _mean_outer([f["x"] for f in feeds]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h["r_lstm"][0], _mean_outer(returned), rtol=1e-5, atol=1e-6)


def _state_out(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["state_out"], feed)[0]


def test_the_view_computes_what_the_model_computes():
    model = network_in_if()
    feeds = _network_feeds([True] * 4)
    loaded = load_and_prepare(model)
    view = branch_view(loaded.model, {"then_mm2"}, feeds)
    assert view is not None and [b.taken for b in view.inlined] == [True]
    assert not any(n.op_type == "If" for n in view.model.graph.node)
    onnx.checker.check_model(view.model)
    for feed in feeds:
        np.testing.assert_array_equal(run(view.model, feed), run(model, feed))


def test_nested_ifs_are_inlined_round_after_round():
    """An If inside the taken branch comes up once that branch is inlined; its own taken branch then is too."""
    rng = np.random.default_rng(2)
    v = helper.make_tensor_value_info
    inner_then = helper.make_graph([helper.make_node("MatMul", ["a", "w_in"], ["t"], name="inner_mm")], "it", [],
                                   [v("t", TensorProto.FLOAT, ["N", 4])])
    inner_else = helper.make_graph([helper.make_node("Identity", ["a"], ["e"])], "ie", [], [v("e", TensorProto.FLOAT, ["N", 4])])
    outer_then = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_out"], ["a"], name="outer_mm"),
         helper.make_node("Greater", ["x_sum", "zero"], ["inner_cond"]),
         helper.make_node("If", ["inner_cond"], ["o"], name="inner", then_branch=inner_then, else_branch=inner_else)],
        "ot", [], [v("o", TensorProto.FLOAT, ["N", 4])])
    outer_else = helper.make_graph([helper.make_node("Slice", ["x", "s0", "s4", "s1"], ["z"])], "oe", [], [v("z", TensorProto.FLOAT, ["N", 4])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["x_sum"], keepdims=0),
             helper.make_node("If", ["cond"], ["y"], name="outer", then_branch=outer_then, else_branch=outer_else)]
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in (("w_out", (8, 4)), ("w_in", (4, 4)))]
    inits += [numpy_helper.from_array(np.array(value, np.float32 if name == "zero" else np.int64), name)
              for name, value in (("zero", -1e9), ("s0", [0]), ("s4", [4]), ("s1", [1]))]
    graph = helper.make_graph(nodes, "nested", [v("x", TensorProto.FLOAT, ["N", 8]), v("cond", TensorProto.BOOL, [])],
                              [v("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": rng.standard_normal((2, 8)).astype(np.float32), "cond": np.array(True)} for _ in range(20)]
    h = _hessians(model, feeds)
    a = [f["x"].astype(np.float64) @ _weights(model)["w_out"] for f in feeds]
    np.testing.assert_allclose(h["w_out"][0], _mean_outer([f["x"] for f in feeds]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h["w_in"][0], _mean_outer(a), rtol=1e-5, atol=1e-6)


def test_a_branch_that_reuses_a_main_graph_node_name_stays_an_if():
    """Tensor names are unique across a model's graphs (onnx's checker says so); node names need not be."""
    model = network_in_if()
    model.graph.node.insert(0, helper.make_node("Identity", ["x"], ["x_copy"], name="then_mm1"))  # the then branch has a node of that name
    model.graph.output.append(helper.make_tensor_value_info("x_copy", TensorProto.FLOAT, ["N", 16]))
    h = _hessians(model, _network_feeds([True] * 20))
    assert not {"w1", "w2", "w3"} & set(h)


@pytest.mark.parametrize("flag", [True, False])
def test_weights_chosen_with_h_in_a_branch_cut_its_output_error(flag):
    """-b 4 with data against -b 4 without, on held-out runs (inputs with correlated features) through the branch the data took."""
    model = network_in_if()
    mixing = np.random.default_rng(5).standard_normal((16, 16)).astype(np.float32)  # correlated inputs: where H is not a multiple of I
    calibration = [{**f, "x": f["x"] @ mixing} for f in _network_feeds([flag] * 64, seed=3)]
    held_out = [{**f, "x": f["x"] @ mixing} for f in _network_feeds([flag] * 16, seed=4)]
    with_data = quantize(model, WEIGHT_ONLY, calibration)
    without = quantize(model, WEIGHT_ONLY)

    def error(quantized: onnx.ModelProto) -> float:
        return sum(float(np.sum((run(quantized, f) - run(model, f)) ** 2)) for f in held_out)

    assert error(with_data) < 0.8 * error(without)


def _twin_weights_in_branches(seed: int = 6) -> tuple[onnx.ModelProto, np.ndarray]:
    """One weight written twice, a Constant in each branch of an If (what folding Silero VAD's inner If leaves):

    x[N,8], cond -> If(cond): then MatMul(x, w_then) -> y;  else MatMul(x, w_else) -> Neg -> y;  w_then == w_else
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    v = helper.make_tensor_value_info

    def branch(tag: str, extra: list[onnx.NodeProto]) -> onnx.GraphProto:
        nodes = [helper.make_node("Constant", [], [f"w_{tag}"], value=numpy_helper.from_array(w, f"w_{tag}")),
                 helper.make_node("MatMul", ["x", f"w_{tag}"], [f"m_{tag}"], name=f"{tag}_mm"), *extra]
        return helper.make_graph(nodes, tag, [], [v(nodes[-1].output[0], TensorProto.FLOAT, ["N", 6])])

    then_branch = branch("then", [])
    else_branch = branch("else", [helper.make_node("Neg", ["m_else"], ["n_else"])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="switch", then_branch=then_branch, else_branch=else_branch)]
    graph = helper.make_graph(nodes, "twins", [v("x", TensorProto.FLOAT, ["N", 8]), v("cond", TensorProto.BOOL, [])],
                              [v("y", TensorProto.FLOAT, ["N", 6])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


def test_one_weight_read_in_both_branches_gets_the_h_of_the_branch_taken():
    """The twins are merged into one weight read by both branches; its H is the taken reader's (the other adds no rows)."""
    model, _ = _twin_weights_in_branches()
    rng = np.random.default_rng(7)
    feeds = [{"x": rng.standard_normal((3, 8)).astype(np.float32), "cond": np.array(True)} for _ in range(20)]
    h = _hessians(model, feeds)
    assert len(h) == 1, sorted(h)  # one weight, not two
    (only,) = h.values()
    np.testing.assert_allclose(only[0], _mean_outer([f["x"] for f in feeds]), rtol=1e-5, atol=1e-6)


def test_the_merged_weight_is_written_once_and_both_branches_compute_with_it():
    model, w = _twin_weights_in_branches()
    rng = np.random.default_rng(8)
    calibration = [{"x": rng.standard_normal((3, 8)).astype(np.float32), "cond": np.array(True)} for _ in range(16)]
    written = quantize(model, WEIGHT_ONLY, calibration)
    codes = [t for t in written.graph.initializer if t.data_type in (TensorProto.INT4, TensorProto.UINT8, TensorProto.INT8)
             and int(np.prod(t.dims)) >= w.size // 2]
    assert len(codes) == 1, [(t.name, list(t.dims)) for t in codes]
    x = rng.standard_normal((3, 8)).astype(np.float32)
    then_out = run(written, {"x": x, "cond": np.array(True)})
    else_out = run(written, {"x": x, "cond": np.array(False)})
    np.testing.assert_array_equal(else_out, -then_out)  # the same dequantized weight in both
    assert np.abs(then_out - x @ w).max() < 0.25 * np.abs(x @ w).max()  # and it is the weight, at 4 bits
