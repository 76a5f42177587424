"""--reduce-range: which 8-bit weights become 7-bit codes (onnxq/plan/weights.py, reduces_range).

CPUs without VNNI sum uint8 x int8 products in 16-bit pairs that full 8-bit weights can saturate: onnxruntime's
integer kernels then go wrong, and onnxq's ops stay exact by running 8-bit codes as two streams (slower than float).
'auto' cuts the weights of both to 7 bits where the quantizing CPU lacks VNNI; weights only decoded to float keep 8.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import decoded_weights
from onnx import numpy_helper

import onnxq.plan.weights
from models import conv_bn_relu_gemm
from onnxq import QuantizeConfig, WeightFormat
from onnxq.cli import main
from onnxq.config import ActivationConfig, ReduceRange
from onnxq.pipeline import quantize_with_report


def _op_weights(model: onnx.ModelProto) -> dict[str, tuple[int, np.ndarray]]:
    """Per onnxq op: its bits attribute and its weight codes (8-bit storage: the int8 codes' bytes)."""
    inits = {t.name: t for t in model.graph.initializer}
    ops = {}
    for node in model.graph.node:
        if node.domain == "ai.onnxq":
            bits = next(a.i for a in node.attribute if a.name == "bits")
            ops[node.name] = (bits, numpy_helper.to_array(inits[node.input[1]]).view(np.int8))
    return ops


@pytest.mark.parametrize(("vnni", "flag", "bits", "largest"), [
    (False, [], 7, 63), (False, ["--reduce-range", "off"], 8, 127),
    (True, [], 8, 127), (True, ["--reduce-range", "on"], 7, 63),
])
def test_the_ops_8_bit_weights_follow_the_cpu_unless_told(tmp_path, capsys, monkeypatch, vnni, flag, bits, largest):
    """Weight-only -b 8 --format int: the IntConv codes use the whole 7-bit range (-63..63) or the 8-bit one."""
    monkeypatch.setattr(onnxq.plan.weights, "has_vnni", lambda: vnni)
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_gemm(c=16), path)
    assert main(["quantize", str(path), "-b", "8", "--format", "int", "-o", str(tmp_path / "q.onnx"), *flag]) == 0
    ops = _op_weights(onnx.load(tmp_path / "q.onnx"))
    assert len(ops) == 2
    for op_bits, codes in ops.values():
        assert op_bits == bits and int(np.abs(codes.astype(np.int32)).max()) == largest
    out = capsys.readouterr().out
    assert ("8-bit weights that integer products read are 7-bit (reduced range, for CPUs without VNNI)" in out) == (bits == 7)
    assert ("note: 2 onnxq op layers have 8-bit codes, which CPUs without VNNI (AVX2-only) run as two streams" in out) == (bits == 8)


def test_only_the_weights_the_ops_read_are_cut(monkeypatch):
    """In the op format without activations, a weight left to DequantizeLinear + float keeps its 8 bits."""
    monkeypatch.setattr(onnxq.plan.weights, "has_vnni", lambda: False)
    result = quantize_with_report(conv_bn_relu_gemm(c=16), QuantizeConfig(bits=8, format=WeightFormat.INT))
    read_by_ops = {n.input[1] for n in result.model.graph.node if n.domain == "ai.onnxq"}
    layers = {layer.tensor: layer.bits for layer in result.layers}
    cut = {tensor for tensor, bits in layers.items() if bits == 7}
    assert cut and len(cut) < len(layers)
    assert all(bits == 8 for tensor, bits in layers.items() if tensor not in cut)
    assert len(read_by_ops) == len(cut)  # one packed weight per op, one op per cut weight


def test_weights_decoded_to_float_keep_8_bits_in_the_qdq_format(monkeypatch):
    monkeypatch.setattr(onnxq.plan.weights, "has_vnni", lambda: False)
    result = quantize_with_report(conv_bn_relu_gemm(c=16), QuantizeConfig(bits=8))
    assert {layer.bits for layer in result.layers} == {8}


@pytest.mark.parametrize(("vnni", "largest"), [(True, 127), (False, 63)])
def test_qdq_beside_activations_follows_this_cpus_vnni(monkeypatch, vnni, largest):
    """onnxruntime's kernels saturate only without VNNI: 'auto' cuts the weights where the quantizing CPU lacks it."""
    monkeypatch.setattr(onnxq.plan.weights, "has_vnni", lambda: vnni)
    data = [{"x": np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)}]
    result = quantize_with_report(conv_bn_relu_gemm(c=16), QuantizeConfig(bits=8, activations=ActivationConfig()), data)
    codes = [w.codes for w in decoded_weights(result.model) if w.codes_type == onnx.TensorProto.INT8]  # (not the int32 biases)
    assert codes and max(int(np.abs(c.astype(np.int32)).max()) for c in codes) == largest


def test_on_cuts_every_8_bit_weight_and_off_none():
    on = quantize_with_report(conv_bn_relu_gemm(c=16), QuantizeConfig(bits=8, reduce_range=ReduceRange.ON))
    assert {layer.bits for layer in on.layers} == {7}
    off = quantize_with_report(conv_bn_relu_gemm(c=16), QuantizeConfig(bits=8, format=WeightFormat.INT, reduce_range=ReduceRange.OFF))
    assert {layer.bits for layer in off.layers} == {8}


def test_the_note_counts_the_8_bit_op_layers():
    """-b 4 --format int keeps 8 bits for the first conv (--first-last-bits 8): one op layer, named in the singular."""
    from onnxq.report.summary import eight_bit_ops

    one = quantize_with_report(conv_bn_relu_gemm(c=16), QuantizeConfig(bits=4, format=WeightFormat.INT, reduce_range=ReduceRange.OFF))
    assert eight_bit_ops(one).startswith("note: 1 onnxq op layer has 8-bit codes, which CPUs without VNNI")
    cut = quantize_with_report(conv_bn_relu_gemm(c=16), QuantizeConfig(bits=4, format=WeightFormat.INT, reduce_range=ReduceRange.ON))
    assert eight_bit_ops(cut) is None
