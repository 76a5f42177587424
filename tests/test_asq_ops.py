"""ASQ in front of IntConv/PostConv: one step per sample (an adapter with one output), handed to the op as x_scale.

The ops sum over input channels, so the channels must share a step; ASQ's candidates for a tensor an op reads are a
per-sample scalar step and the fixed per-tensor step, and take_input_quantization gives the op the adapter's steps.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import op_counts, step_tensor
from conv_ops import post_decode
from onnx import TensorProto, helper, numpy_helper

from onnxq import QuantizeConfig, WeightFormat
from onnxq.calibrate.activations import asq_error
from onnxq.calibrate.asq import Adapter, LogLinear
from onnxq.calibrate.placement import activation_sites
from onnxq.calibrate.ranges import QuantParams
from onnxq.calibrate.result import ActivationQuant
from onnxq.config import ActivationConfig, CalibrationMethod
from onnxq.native.domain import DOMAIN
from onnxq.native.session import session_options
from onnxq.pipeline import load_and_prepare, plan_quantization, quantize_with_report
from onnxq.rewrite.activations import insert_activation_qdq
from onnxq.rewrite.fusions import take_input_quantization
from onnxq.rewrite.ops import pack_rows

OPSET = 21
CHAIN = ("Div", "QuantizeLinear", "DequantizeLinear", "Mul", "Reshape")


def _scalar_quant(rng: np.random.Generator, zero_point: int = 7) -> ActivationQuant:
    """A one-output adapter on (N, 3, H, W) tensors: step = exp(means @ w + b), zero point ``zero_point``."""
    adapter = Adapter(LogLinear(rng.standard_normal(3) * 0.3, 0.0), np.array([0.02]))
    return ActivationQuant("x", QuantParams(0.02, zero_point, 8), adapter, (2, 3), np.array([zero_point]), 1, 4)


def _x(rng: np.random.Generator, n: int = 5, hw: int = 6) -> np.ndarray:
    gains = np.geomspace(0.3, 3.0, n)[:, None, None, None]
    return (rng.standard_normal((n, 3, hw, hw)) * gains + 0.5 * gains).astype(np.float32)


def _identity_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "asq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 6, 6])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    return model


def _literal_session(model: onnx.ModelProto, custom_ops: bool = False) -> ort.InferenceSession:
    """onnxruntime without graph optimizations: its optimizer changes what Q -> DQ -> float computes."""
    options = session_options(custom_ops=custom_ops)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_one_output_adapter_is_a_per_tensor_pair_with_one_step_per_sample():
    rng = np.random.default_rng(1)
    quant = _scalar_quant(rng)
    assert quant.per_sample_step
    model = _identity_model()
    insert_activation_qdq(model, {"x": quant}, OPSET)
    onnx.checker.check_model(model)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert not node.attribute  # no axis
            assert not inits[node.input[1]].dims and not inits[node.input[2]].dims  # scalar unit scale and zero point
    steps = step_tensor(model)
    model.graph.output.append(helper.make_tensor_value_info(steps, TensorProto.FLOAT, ["N", 1]))
    x = _x(rng)
    y, s = _literal_session(model).run(None, {"x": x})
    np.testing.assert_allclose(s, quant.adapter.predict(x.mean(axis=(2, 3), dtype=np.float64)), rtol=1e-5)
    assert s.shape == (5, 1) and len(set(s[:, 0].tolist())) == 5
    r = s.astype(np.float32)[:, :, None, None]
    expected = ((np.clip(np.rint(x / r) + 7, 0, 255) - 7) * r).astype(np.float32)
    np.testing.assert_array_equal(y, expected)
    # asq_error computes the same quantization in numpy (float64 steps: equal up to rounding ties)
    err = float(np.sum((x.astype(np.float64) - expected) ** 2))
    assert asq_error(x, quant) == pytest.approx(err, rel=1e-3)


def test_asq_error_without_an_adapter_is_the_fixed_per_tensor_error():
    rng = np.random.default_rng(2)
    x = _x(rng)
    quant = ActivationQuant("x", QuantParams(0.03, 11, 8))
    expected = (np.clip(np.rint(x.astype(np.float64) / 0.03) + 11, 0, 255) - 11) * 0.03
    assert asq_error(x, quant) == pytest.approx(float(np.sum((x - expected) ** 2)), rel=1e-12)


def _op_model(op: str, quant: ActivationQuant, extra_reader: bool = False, float_conv: bool = False) -> onnx.ModelProto:
    """x -> [one-step-per-sample ASQ chain] -> IntConv/PostConv(3 -> 4, 3x3, pad 1) -> y (and Identity -> z when
    ``extra_reader``: a second reader of the chain's output). ``float_conv``: a float Conv on the op's weights decoded
    (POST levels or integer codes times the scale) in place of the op: what the op computes from the chain's output."""
    rng = np.random.default_rng(3)
    bits = 4 if op == "PostConv" else 8
    limit = 2 ** (bits - 1) - 1
    codes = rng.integers(-limit, limit + 1, (4, 27)).astype(np.int8)
    scale = rng.uniform(0.01, 0.2, 4).astype(np.float32)
    if float_conv:
        weights = post_decode(codes, scale, bits) if op == "PostConv" else codes * scale[:, None]
        conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        w = numpy_helper.from_array(weights.astype(np.float32).reshape(4, 3, 3, 3), "w")
    else:
        conv = helper.make_node(op, ["x", "w", "scale", "b"], ["y"], name="conv", domain=DOMAIN, bits=bits, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        w = numpy_helper.from_array(pack_rows(codes, bits), "w")
    nodes = [conv]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["x"], ["z"], name="other"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        outputs,
        [w, numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10
    insert_activation_qdq(model, {"x": quant}, OPSET)
    return model


@pytest.mark.parametrize("op", ["PostConv", "IntConv"])
@pytest.mark.parametrize("extra_reader", [False, True], ids=["only-reader", "shared"])
def test_op_takes_the_per_sample_steps_and_computes_what_the_chain_did(op, extra_reader, tmp_path: Path):
    rng = np.random.default_rng(4)
    quant = _scalar_quant(rng, zero_point=9)
    qdq = _op_model(op, quant, extra_reader)
    rewired = copy.deepcopy(qdq)
    assert take_input_quantization(rewired.graph) == 1
    conv = next(n for n in rewired.graph.node if n.op_type == op)
    steps = step_tensor(rewired)
    zero_point = next(t for t in rewired.graph.initializer if t.name == conv.input[5])
    assert list(conv.input) == ["x", "w", "scale", "b", steps, zero_point.name]
    assert zero_point.data_type == TensorProto.UINT8 and numpy_helper.to_array(zero_point) == 9
    counts = Counter(n.op_type for n in rewired.graph.node if n.output[0] != steps)  # the steps stay: the op reads them
    assert {k: counts.get(k, 0) for k in CHAIN} == {k: int(extra_reader) for k in CHAIN}  # the chain stays only while read

    # The op now quantizes x with the chain's own steps: its output is the float Conv of the chain's output
    # (unrewired, the op would requantize that output dynamically).
    x = _x(rng, n=6)
    want = _literal_session(_op_model(op, quant, extra_reader, float_conv=True)).run(None, {"x": x})
    got = _literal_session(rewired, custom_ops=True).run(None, {"x": x})
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    # onnxruntime's optimized graph reads x straight into the op
    options = session_options(custom_ops=True)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(rewired.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x[:2]})
    optimized = onnx.load(options.optimized_model_filepath)
    op_node = next(n for n in optimized.graph.node if n.op_type == op)
    assert op_node.input[0] == "x"
    if not extra_reader:
        assert not {"Div", "QuantizeLinear"} & set(op_counts(optimized))


def test_chain_with_per_channel_steps_is_left_alone():
    """A per-channel chain (4-bit sites keep it) cannot feed the op's one step per sample: the op stays as it is."""
    rng = np.random.default_rng(5)
    adapter = Adapter(LogLinear(rng.standard_normal(3) * 0.3, 0.0), np.array([0.02, 0.03, 0.04]))
    quant = ActivationQuant("x", QuantParams(0.02, 0, 8), adapter, (2, 3), np.array([0, 3, 7]), 1, 4)
    model = _op_model("IntConv", quant)
    assert take_input_quantization(model.graph) == 0
    assert len(next(n for n in model.graph.node if n.op_type == "IntConv").input) == 4


def _one_conv() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(8, 3x3, pad 1) -> Relu -> y."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        "one_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [
            numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
            numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _gain_batches(count: int = 16, batch: int = 16) -> list[dict[str, np.ndarray]]:
    """Samples a * pattern of very different gains a, with log a in channel 0: a per-sample step wins, and the
    adapter (log-linear in the channel means) can predict it."""
    rng = np.random.default_rng(1)
    pattern = rng.uniform(0.2, 1.0, (1, 2, 8, 8))
    out = []
    for _ in range(count):
        log_gain = rng.uniform(0, 3, (batch, 1, 1, 1))
        x = np.concatenate([np.broadcast_to(log_gain, (batch, 1, 8, 8)), np.exp(log_gain) * pattern], axis=1)
        out.append({"x": x.astype(np.float32)})
    return out


@pytest.mark.parametrize("fmt", [WeightFormat.POST, WeightFormat.INT])
def test_format_op_with_asq_wires_the_per_sample_steps_into_the_op(fmt):
    config = QuantizeConfig(bits=4, first_last_bits=None, format=fmt, activations=ActivationConfig(bits=8, method=CalibrationMethod.ASQ))
    data = _gain_batches()
    result = quantize_with_report(_one_conv(), config, data)
    (quant,) = result.activations
    assert quant.per_sample_step  # kept: the held-out error drops
    q = result.model
    op = "PostConv" if fmt is WeightFormat.POST else "IntConv"
    # (the Relu after the conv is folded into the op as clip_min = 0: onnxq.rewrite.fusions.fold_clipping_into_ops)
    assert Counter(n.op_type for n in q.graph.node) == Counter({"ReduceMean": 1, "Gemm": 1, "Clip": 1, "Exp": 1, "Mul": 1, op: 1})
    conv = next(n for n in q.graph.node if n.op_type == op)
    assert [(a.name, a.f) for a in conv.attribute if a.name.startswith("clip_")] == [("clip_min", 0.0)]
    steps = step_tensor(q)
    assert conv.input[0] == "x" and conv.input[4] == steps
    sess = ort.InferenceSession(q.SerializeToString(), session_options(custom_ops=True), providers=["CPUExecutionProvider"])
    x = data[0]["x"]
    (y,) = sess.run(None, {"x": x})
    (y1,) = sess.run(None, {"x": x[3:4]})
    np.testing.assert_array_equal(y1, y[3:4])  # each sample with its own step, whatever the batch
    (want,) = _literal_session(_one_conv()).run(None, {"x": x})
    assert np.isfinite(y).all() and np.corrcoef(y.ravel(), want.ravel())[0, 1] > 0.95  # (4-bit weights)


def test_only_8_bit_sites_read_by_an_op_get_a_per_sample_scalar_step():
    """Sites an op reads are marked; at 4 bits (not the op's uint8) ASQ keeps per-channel steps there."""
    data = _gain_batches(count=4)
    for fmt, bits, marked, outputs in [(WeightFormat.POST, 8, True, {1}), (WeightFormat.QDQ, 8, False, {3}), (WeightFormat.INT, 4, True, {3})]:
        config = QuantizeConfig(bits=4, first_last_bits=None, format=fmt, activations=ActivationConfig(bits=bits, method=CalibrationMethod.ASQ))
        loaded = load_and_prepare(_one_conv())
        plan = plan_quantization(loaded, config, data)
        (site,) = activation_sites(loaded.model.graph, plan.weights, plan.integer_op_nodes, config)
        assert site.feeds_integer_op is marked
        (quant,) = quantize_with_report(_one_conv(), config, data).activations
        assert quant.adapter is None or quant.adapter.outputs in outputs, (fmt, bits)


@pytest.mark.parametrize("adaptive", [False, True])
def test_channel_last_steps_shift_by_zero_point_offsets_around_a_scalar_pair(adaptive):
    """(N, T, C) tensors: each channel's zero point is an offset added before a scalar pair (onnxruntime runs a per-axis
    pair along the last axis one element at a time); the codes are those of the per-channel zero points."""
    rng = np.random.default_rng(4)
    channels = 6
    zero_points = np.array([0, 3, 128, 200, 255, 17])
    weight = rng.standard_normal(channels) * (0.3 if adaptive else 0.0)
    adapter = Adapter(LogLinear(weight, 0.0), np.geomspace(0.01, 0.2, channels))
    quant = ActivationQuant("x", QuantParams(0.02, 0, 8), adapter, (1,), zero_points, 2, 3)
    value = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "asq", [value("x", TensorProto.FLOAT, ["N", 7, channels])],
                              [value("y", TensorProto.FLOAT, ["N", 7, channels])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    insert_activation_qdq(model, {"x": quant}, OPSET)
    onnx.checker.check_model(model)
    pairs = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    inits = {t.name: t for t in model.graph.initializer}
    assert len(pairs) == 2 and all(not n.attribute and not inits[n.input[2]].dims for n in pairs)  # scalar pairs, no axis
    x = (rng.standard_normal((4, 7, channels)) * np.geomspace(0.3, 3.0, 4)[:, None, None]).astype(np.float32)
    y = _literal_session(model).run(None, {"x": x})[0]
    steps = adapter.predict(x.mean(axis=1, dtype=np.float64)).astype(np.float32)[:, None, :]  # (N, 1, C)
    scaled = x / steps
    expected = (np.clip(np.rint(scaled) + zero_points, 0, 255) - zero_points) * steps
    near_tie = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-4  # adding the offset first may round these the other way
    assert near_tie.sum() <= 2 and len(np.unique(np.clip(np.rint(scaled) + zero_points, 0, 255))) > 50
    np.testing.assert_allclose(y[~near_tie], expected[~near_tie], rtol=1e-6, atol=1e-6 * float(np.abs(expected).max()))
