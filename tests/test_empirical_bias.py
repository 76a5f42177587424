"""Empirical bias correction: after it, every corrected layer's mean output in the quantized model equals the float one."""

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibrate.bias_measured import depth_levels, empirical_correction, merge_levels, nodes_for, segment_model
from onnxq.calibrate.ranges import QuantParams
from onnxq.calibrate.result import ActivationQuant
from onnxq.config import ActivationConfig, BiasCorrection, CalibrationMethod, ReduceRange, WeightFormat


def _chain(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> onnx.ModelProto:
    """x -> Conv1x1(w1, b1) -> Relu -> Conv1x1(w2, b2) -> y, plus a side branch Relu -> Conv1x1(w2, b2s)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="c2"),
    ]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w1.shape[1], 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv1x1(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("oc,nchw->nohw", w[:, :, 0, 0].astype(np.float64), x) + b[None, :, None, None]


def _fake_quant(x: np.ndarray, p: QuantParams) -> np.ndarray:
    q = np.clip(np.rint(x / p.scale) + p.zero_point, 0, (1 << p.bits) - 1)
    return (q - p.zero_point) * p.scale


@dataclass
class _Perturbed:
    """A two-layer chain (_chain) with its float weights, a copy of it as the float reference, and perturbed weights."""

    model: onnx.ModelProto
    float_model: onnx.ModelProto
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    q1: np.ndarray
    q2: np.ndarray


def _perturbed_chain(rng: np.random.Generator) -> _Perturbed:
    w1, b1 = rng.standard_normal((6, 3, 1, 1)), rng.standard_normal(6) * 0.1
    w2, b2 = rng.standard_normal((5, 6, 1, 1)), rng.standard_normal(5) * 0.1
    model = _chain(w1, b1, w2, b2)
    float_model = onnx.ModelProto()
    float_model.CopyFrom(model)
    q1, q2 = w1 + rng.standard_normal(w1.shape) * 0.2, w2 + rng.standard_normal(w2.shape) * 0.2
    return _Perturbed(model, float_model, w1, b1, w2, b2, q1, q2)


def test_corrected_means_match_the_float_model_layer_by_layer():
    rng = np.random.default_rng(0)
    c = _perturbed_chain(rng)
    model, w1, b1, w2, b2, q1, q2 = c.model, c.w1, c.b1, c.w2, c.b2, c.q1, c.q2
    params = QuantParams(scale=np.float32(0.005), zero_point=0, bits=8)  # clips the Relu output at 1.275
    activations = {"r": ActivationQuant("r", params)}
    batches = [{"x": rng.standard_normal((8, 3, 4, 4)).astype(np.float32)} for _ in range(3)]

    empirical_correction(model, c.float_model, {"w1": q1, "w2": q2}, activations, 17, {"h": "b1", "y": "b2"}, batches)

    new = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    x = np.concatenate([b["x"] for b in batches]).astype(np.float64)
    h_float = _conv1x1(x, w1, b1)
    y_float = _conv1x1(np.maximum(h_float, 0), w2, b2)
    h_quant = _conv1x1(x, q1, new["b1"])
    y_quant = _conv1x1(_fake_quant(np.maximum(h_quant, 0), params), q2, new["b2"])
    axes = (0, 2, 3)
    np.testing.assert_allclose(h_quant.mean(axis=axes), h_float.mean(axis=axes), atol=1e-5)
    np.testing.assert_allclose(y_quant.mean(axis=axes), y_float.mean(axis=axes), atol=1e-5)
    # and the correction did something: uncorrected, the second layer's means are off
    y_plain = _conv1x1(_fake_quant(np.maximum(_conv1x1(x, q1, b1), 0), params), q2, b2)
    assert np.abs(y_plain.mean(axis=axes) - y_float.mean(axis=axes)).max() > 0.05
    # the model's float weights are untouched; only the biases moved
    np.testing.assert_array_equal(new["w1"], w1.astype(np.float32))


def test_the_float_means_are_taken_over_the_samples_the_passes_use(monkeypatch):
    """With more passes than samples allow, the passes use the first samples only, and the float reference with them."""
    from onnxq.calibrate import bias_measured

    monkeypatch.setattr(bias_measured, "SAMPLE_PASSES", 16)  # 2 levels: 8 samples per pass
    monkeypatch.setattr(bias_measured, "MIN_SAMPLES", 1)
    rng = np.random.default_rng(8)
    c = _perturbed_chain(rng)
    model, w1, b1, w2, b2, q1, q2 = c.model, c.w1, c.b1, c.w2, c.b2, c.q1, c.q2
    batches = [{"x": (rng.standard_normal((8, 3, 4, 4)) + k).astype(np.float32)} for k in range(3)]  # each batch its own mean

    empirical_correction(model, c.float_model, {"w1": q1, "w2": q2}, {}, 17, {"h": "b1", "y": "b2"}, batches)

    new = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    x = batches[0]["x"].astype(np.float64)  # the 8 samples the passes used
    y_float = _conv1x1(np.maximum(_conv1x1(x, w1, b1), 0), w2, b2)
    y_quant = _conv1x1(np.maximum(_conv1x1(x, q1, new["b1"]), 0), q2, new["b2"])
    np.testing.assert_allclose(y_quant.mean(axis=(0, 2, 3)), y_float.mean(axis=(0, 2, 3)), atol=1e-5)


def test_depth_levels_follow_the_longest_path():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["ra", "w"], ["b"]),
        helper.make_node("Conv", ["x", "w"], ["side"]),  # parallel branch: depth 1
        helper.make_node("Add", ["b", "side"], ["s"]),
        helper.make_node("Conv", ["s", "w"], ["c"]),
    ]
    graph = helper.make_graph(nodes, "g", [], [])
    assert depth_levels(graph, ["c", "side", "a", "b"]) == [["side", "a"], ["b"], ["c"]]


def test_merge_levels_keeps_order_and_caps_the_count():
    levels = [[str(i)] for i in range(7)]
    merged = merge_levels(levels, 3)
    assert len(merged) == 3 and sum(merged, []) == [str(i) for i in range(7)]
    assert merge_levels(levels, 10) == levels


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize(("weight_bits", "output_aware", "activation_bits", "auto_is"), [
    (8, True, 8, BiasCorrection.ANALYTIC),
    (4, False, 8, BiasCorrection.MEASURED),  # 4-bit weights by their own error
    (4, True, 8, BiasCorrection.ANALYTIC),  # 4-bit weights chosen for the output: the measured passes took real models apart
    (4, True, 4, BiasCorrection.MEASURED),  # 4-bit activations
])
def test_auto_measures_below_seven_bits_unless_the_weights_were_chosen_for_the_output(weight_bits, output_aware, activation_bits, auto_is):
    from models import residual_block
    from onnxq import QuantizeConfig, quantize

    rng = np.random.default_rng(3)
    batches = [{"x": rng.standard_normal((8, 4, 6, 6)).astype(np.float32)} for _ in range(4)]

    def run(mode: BiasCorrection) -> dict[str, np.ndarray]:
        act = ActivationConfig(bits=activation_bits, method=CalibrationMethod.MINMAX, bias_correction=mode)
        config = QuantizeConfig(bits=weight_bits, first_last_bits=weight_bits, activations=act, format=WeightFormat.QDQ,
                                output_aware=output_aware, reduce_range=ReduceRange.OFF)
        return _initializers(quantize(residual_block(), config, batches))

    auto, analytic, measured = run(BiasCorrection.AUTO), run(BiasCorrection.ANALYTIC), run(BiasCorrection.MEASURED)
    assert any(not np.array_equal(analytic[k], measured[k]) for k in analytic)  # the two modes differ here
    same = analytic if auto_is is BiasCorrection.ANALYTIC else measured
    assert auto.keys() == same.keys() and all(np.array_equal(auto[k], same[k]) for k in auto)


def test_bias_correction_accepts_the_old_booleans():
    assert ActivationConfig(bias_correction=True).bias_correction is BiasCorrection.AUTO
    assert ActivationConfig(bias_correction=False).bias_correction is BiasCorrection.OFF
    with pytest.raises(ValueError, match="BiasCorrection"):
        ActivationConfig(bias_correction="measured")


def test_segment_model_keeps_only_what_its_outputs_need():
    """Nodes after the outputs, and inputs/initializers only they read, are dropped; an If body's outer reads are kept."""
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["outer"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["outer"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)]
    )
    nodes = [
        helper.make_node("Add", ["x", "b1"], ["outer"]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["early"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Mul", ["early", "b2"], ["late"]),
    ]
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for v, n in ((1.0, "b2"), (0.0, "zero"))]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("b1", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("late", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    prefix = segment_model(model, nodes_for(model.graph, ["early"]), ["early"])
    assert [n.op_type for n in prefix.graph.node] == ["Add", "ReduceSum", "Greater", "If"]
    assert [i.name for i in prefix.graph.input] == ["x", "b1"] and [t.name for t in prefix.graph.initializer] == ["zero"]
    import onnxruntime as ort

    x, b1 = np.array([1.0, 2.0], np.float32), np.array([0.5, -4.0], np.float32)
    (early,) = ort.InferenceSession(prefix.SerializeToString(), providers=["CPUExecutionProvider"]).run(["early"], {"x": x, "b1": b1})
    np.testing.assert_array_equal(early, x + b1)


def test_a_level_that_needs_only_one_of_two_inputs_is_measured():
    """Two graph inputs; the first layer reads only one, so its pass runs a prefix without the other."""
    rng = np.random.default_rng(5)
    w1, w2 = rng.standard_normal((4, 3, 1, 1)), rng.standard_normal((4, 4, 1, 1))
    nodes = [
        helper.make_node("Conv", ["a", "w1", "b1"], ["h"]),
        helper.make_node("Add", ["h", "c"], ["s"]),
        helper.make_node("Conv", ["s", "w2", "b2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for v, n in ((w1, "w1"), (np.zeros(4), "b1"), (w2, "w2"), (np.zeros(4), "b2"))]
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 3, 2, 2]),
        helper.make_tensor_value_info("c", TensorProto.FLOAT, [None, 4, 2, 2]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "two", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    float_model = onnx.ModelProto()
    float_model.CopyFrom(model)
    batches = [{"a": rng.standard_normal((4, 3, 2, 2)).astype(np.float32), "c": rng.standard_normal((4, 4, 2, 2)).astype(np.float32)}]
    q1, q2 = w1 + 0.3, w2 - 0.2
    empirical_correction(model, float_model, {"w1": q1, "w2": q2}, {}, 17, {"h": "b1", "y": "b2"}, batches)
    new = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    a, c = batches[0]["a"].astype(np.float64), batches[0]["c"].astype(np.float64)
    y_float = _conv1x1(_conv1x1(a, w1, np.zeros(4)) + c, w2, np.zeros(4))
    y_quant = _conv1x1(_conv1x1(a, q1, new["b1"]) + c, q2, new["b2"])
    np.testing.assert_allclose(y_quant.mean(axis=(0, 2, 3)), y_float.mean(axis=(0, 2, 3)), atol=1e-5)


def test_a_simulation_onnxruntime_cannot_run_leaves_the_biases_and_warns(caplog):
    model = _chain(np.ones((2, 3, 1, 1)), np.zeros(2), np.ones((2, 2, 1, 1)), np.zeros(2))
    before = {t.name: t.SerializeToString() for t in model.graph.initializer}
    batches = [{"x": np.ones((2, 5, 4, 4), np.float32)}]  # 5 channels where the Conv wants 3
    with caplog.at_level("WARNING", logger="onnxq.calibrate.bias_measured"):
        empirical_correction(model, model, {"w1": np.ones((2, 3, 1, 1))}, {}, 17, {"h": "b1", "y": "b2"}, batches)
    assert {t.name: t.SerializeToString() for t in model.graph.initializer} == before
    assert "measured bias correction skipped" in caplog.text


def test_level_runner_runs_every_node_once_and_matches_the_whole_model(monkeypatch):
    """Level by level, each segment starts from what earlier ones left (x crosses to the Add two levels on)."""
    import onnxruntime as ort

    from models import residual_block
    from onnxq.calibrate import bias_measured

    model = residual_block()
    rng = np.random.default_rng(2)
    batches = [{"x": rng.standard_normal((3, 4, 6, 6)).astype(np.float32)} for _ in range(2)]
    outputs = ["c1", "r1", "c2", "s", "r2", "p", "f", "y"]
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    whole.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs[:-1])
    sess = ort.InferenceSession(whole.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = [dict(zip(outputs, sess.run(outputs, b), strict=True)) for b in batches]

    ran: list[str] = []
    segment_model = bias_measured.segment_model
    monkeypatch.setattr(bias_measured, "segment_model", lambda m, nodes, *a: (ran.extend(n.name for n in nodes), segment_model(m, nodes, *a))[1])
    runner = bias_measured.LevelRunner(model, ["c1", "c2", "y"], batches)
    for level in (["c1"], ["c2"], ["y"]):
        got = runner.run(level, {})
        for index, values in enumerate(expected):
            np.testing.assert_allclose(got[level[0]][index], values[level[0]], rtol=1e-6, atol=1e-6)
    assert sorted(ran) == sorted(n.name for n in model.graph.node)  # each node once
    assert runner.cache == {}  # nothing is kept after its last reader ran


def test_a_shifted_layer_output_reaches_the_next_level():
    """After shift(c1, d) the next level sees conv1's output as if its bias were b1 + d."""
    import onnxruntime as ort

    from models import residual_block
    from onnxq.calibrate.bias_measured import LevelRunner

    model = residual_block()
    batches = [{"x": np.random.default_rng(4).standard_normal((2, 4, 6, 6)).astype(np.float32)}]
    change = np.array([0.5, -1.0, 0.25, 2.0], np.float32)
    runner = LevelRunner(model, ["c1", "c2"], batches)
    runner.run(["c1"], {})
    runner.shift("c1", change)
    got = runner.run(["c2"], {})["c2"][0]
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    b1 = next(t for t in moved.graph.initializer if t.name == "b1")
    b1.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(b1) + change, "b1"))
    moved.graph.output.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, None))
    (want,) = ort.InferenceSession(moved.SerializeToString(), providers=["CPUExecutionProvider"]).run(["c2"], batches[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_gemm_bias_scaled_by_beta_is_corrected_fully():
    """y = x W^T + beta * C: the measured shift is cancelled by moving C by shift / beta."""
    rng = np.random.default_rng(6)
    w, c = rng.standard_normal((5, 7)), rng.standard_normal(5) * 0.1
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1, beta=0.5)
    inits = [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(c.astype(np.float32), "c")]
    x_info, y_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 7]), helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "g", [x_info], [y_info], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    float_model = onnx.ModelProto()
    float_model.CopyFrom(model)
    batches = [{"x": (rng.standard_normal((16, 7)) + 1.0).astype(np.float32)}]
    q = w + 0.3
    empirical_correction(model, float_model, {"w": q}, {}, 17, {"y": "c"}, batches)
    new_c = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "c").astype(np.float64)
    x = batches[0]["x"].astype(np.float64)
    np.testing.assert_allclose((x @ q.T + 0.5 * new_c).mean(axis=0), (x @ w.T + 0.5 * c).mean(axis=0), atol=1e-5)
