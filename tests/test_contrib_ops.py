"""onnxruntime's fused transformer ops (com.microsoft Attention, EmbedLayerNormalization): their weights are quantized.

Models saved by onnxruntime's transformer optimizer hold a BERT's q, k, v weights packed in Attention and its embedding
tables in EmbedLayerNormalization; left float they were most of such a model (a MiniLM wrote 0.696x at -b 4).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibrate.moments import MomentCollector, layer_inputs
from onnxq.config import QuantizeConfig
from onnxq.model.prepare import prepare
from onnxq.pipeline import quantize_with_report
from onnxq.plan.weights import plan_weights

HIDDEN, HEADS, VOCAB, POSITIONS, SEQUENCE = 16, 2, 50, 12, 8


def _bert_like(seed: int = 0) -> onnx.ModelProto:
    """ids -> EmbedLayerNormalization (word, position, segment tables) -> Attention (packed q, k, v) -> MatMul -> y."""
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [weight("word", VOCAB, HIDDEN), weight("position", POSITIONS, HIDDEN), weight("segment", 2, HIDDEN),
             numpy_helper.from_array(np.ones(HIDDEN, np.float32), "gamma"), numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "beta"),
             weight("qkv", HIDDEN, 3 * HIDDEN), weight("qkv_bias", 3 * HIDDEN, scale=0.1), weight("out", HIDDEN, HIDDEN)]
    nodes = [
        helper.make_node("EmbedLayerNormalization", ["ids", "segments", "word", "position", "segment", "gamma", "beta"],
                         ["embedded", "mask_index"], name="embed", domain="com.microsoft", epsilon=1e-12),
        helper.make_node("Attention", ["embedded", "qkv", "qkv_bias"], ["attended"], name="attention", domain="com.microsoft", num_heads=HEADS),
        helper.make_node("MatMul", ["attended", "out"], ["y"], name="out"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT32, ["N", SEQUENCE]),
                                           helper.make_tensor_value_info("segments", TensorProto.INT32, ["N", SEQUENCE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", SEQUENCE, HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _feeds(n: int = 16, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"ids": rng.integers(0, VOCAB, (n, SEQUENCE)).astype(np.int32), "segments": rng.integers(0, 2, (n, SEQUENCE)).astype(np.int32)}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0].astype(np.float64)


def test_the_fused_ops_weights_are_planned():
    """The packed q, k, v weight per column (x @ W), the three tables per row (a scale per token), the MatMul as before."""
    plans, skipped = plan_weights(prepare(_bert_like()).graph, QuantizeConfig(bits=4))
    axes = {p.tensor: p.channel_axis for p in plans}
    assert axes == {"word": 0, "position": 0, "segment": 0, "qkv": 1, "out": 1}
    assert not skipped


@pytest.mark.parametrize(("bits", "data"), [(8, False), (4, False), (4, True)])
def test_the_written_model_runs_its_weights_quantized(bits, data):
    """onnxruntime runs the written model, every weight quantized, close to the float model (with data: H through Attention)."""
    model, feeds = _bert_like(), _feeds()
    calibration = [_feeds(32, seed=3)] if data else None
    result = quantize_with_report(model, QuantizeConfig(bits=bits, first_last_bits=None, samples=32), calibration)
    assert {layer.tensor for layer in result.layers} == {"word", "position", "segment", "qkv", "out"}
    assert all(layer.bits == bits for layer in result.layers)
    reference, quantized = _run(model, feeds), _run(result.model, feeds)
    sqnr = 10 * np.log10(np.sum(reference**2) / np.sum((reference - quantized) ** 2))
    assert sqnr > (35 if bits == 8 else 10), sqnr
    assert not np.allclose(reference, quantized)  # the weights did change


def test_attention_h_is_the_mean_outer_product_of_its_input_rows():
    """H of the packed weight: E[x x^T] over the rows (tokens) of Attention's input, against numpy on those rows."""
    model = prepare(_bert_like())
    plans, _ = plan_weights(model.graph, QuantizeConfig(bits=4))
    inputs = {t: r for t, r in layer_inputs(model.graph, plans).items() if t == "qkv"}
    assert [r.tensor for r in inputs["qkv"]] == ["embedded"]
    x = np.random.default_rng(2).standard_normal((4, SEQUENCE, HIDDEN)).astype(np.float32)
    collector = MomentCollector(inputs)
    collector.observe("embedded", x)
    rows = x.reshape(-1, HIDDEN).astype(np.float64)
    np.testing.assert_allclose(collector.hessians()["qkv"][0], rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)


def test_inspect_lists_the_fused_ops_weights_float_and_quantized():
    """`onnxq inspect` shows the tables and the packed weight, float before and 4-bit codes after."""
    from onnxq.analysis.inventory import inspect_model

    model = _bert_like()
    before = [(n.op_type, n.bits, n.shape) for n in inspect_model(model).nodes if n.op_type != "MatMul"]
    assert sorted(before) == sorted([("EmbedLayerNormalization", 32, (VOCAB, HIDDEN)), ("EmbedLayerNormalization", 32, (POSITIONS, HIDDEN)),
                                     ("EmbedLayerNormalization", 32, (2, HIDDEN)), ("Attention", 32, (HIDDEN, 3 * HIDDEN))])
    quantized = quantize_with_report(model, QuantizeConfig(bits=4, first_last_bits=None)).model
    after = [(n.op_type, n.bits) for n in inspect_model(quantized).nodes if n.op_type != "MatMul"]
    assert sorted(after) == sorted([("EmbedLayerNormalization", 4)] * 3 + [("Attention", 4)])


def _attention_layer(bias_computed: bool = False) -> tuple[onnx.ModelProto, np.ndarray]:
    """x [N, S, H] -> Attention(x, qkv, bias): the bias a constant, or computed (an Identity of one)."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.standard_normal((HIDDEN, 3 * HIDDEN)) * 0.3).astype(np.float32), "qkv"),
             numpy_helper.from_array((rng.standard_normal(3 * HIDDEN) * 0.1).astype(np.float32), "b")]
    nodes = [helper.make_node("Attention", ["x", "qkv", "bias" if bias_computed else "b"], ["y"], name="attention", domain="com.microsoft",
                              num_heads=HEADS)]
    if bias_computed:
        nodes.insert(0, helper.make_node("Identity", ["b"], ["bias"], name="computed"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SEQUENCE, HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model, np.random.default_rng(6).standard_normal((3, SEQUENCE, HIDDEN)).astype(np.float32)


def test_attention_mean_shift_goes_into_its_bias():
    """The fold equals the model whose q, k, v bias numpy lowered by the shift; a computed bias gets no site."""
    from onnxq.calibrate.mean_shift import fold_shifts, shift_sites

    model, x = _attention_layer()
    plans, _ = plan_weights(model.graph, QuantizeConfig(bits=4, first_last_bits=None))
    sites = shift_sites(model.graph, plans)
    assert set(sites) == {"qkv"}
    shift = np.random.default_rng(7).standard_normal(3 * HIDDEN) * 0.2
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    fold_shifts(folded.graph, {"qkv": (shift_sites(folded.graph, plans)["qkv"], shift)})
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    bias = next(t for t in expected.graph.initializer if t.name == "b")
    bias.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(bias).astype(np.float64) - shift).astype(np.float32), "b"))
    np.testing.assert_allclose(_run(folded, {"x": x}), _run(expected, {"x": x}), atol=1e-5)
    assert not np.allclose(_run(folded, {"x": x}), _run(model, {"x": x}), atol=1e-3)
    computed, _ = _attention_layer(bias_computed=True)
    plans, _ = plan_weights(computed.graph, QuantizeConfig(bits=4, first_last_bits=None))
    assert shift_sites(computed.graph, plans) == {}
