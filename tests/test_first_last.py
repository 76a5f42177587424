"""The first/last rule by data flow, through If/Loop/Scan bodies: the first and last weighted layers keep
--first-last-bits, wherever they sit. A network inside one branch of an If made the If both first and last, so every
weight stayed 8-bit and -b 4 wrote the same model as -b 8."""

from __future__ import annotations

import onnx
import pytest

from models import (
    conv_bn_relu_gemm,
    conv_then_if,
    matmul_then_loop,
    matmul_then_scan,
    network_in_if,
    shared_weight_matmuls,
    unrolled_rnn_zero_state,
)
from onnxq.config import QuantizeConfig
from onnxq.model.prepare import prepare
from onnxq.pipeline import quantize_with_report
from onnxq.plan.boundary import boundary_nodes
from onnxq.plan.weights import find_weight_uses


def _boundary(model) -> set[str]:
    graph = prepare(model).graph
    uses, _ = find_weight_uses(graph)
    return boundary_nodes(graph, {u.node for us in uses.values() for u in us})


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        # x -> mm1 -> Relu -> mm2 -> Relu -> mm3 in the then-branch; else_mm alone in the else-branch is both
        (network_in_if, {"then_mm1", "then_mm3", "else_mm"}),
        # conv (main graph) -> If: then Conv(w2): the body's conv is last; the Relu branch has no weight
        (conv_then_if, {"conv", "branch/Conv_0"}),
        # mm (main graph) -> Loop body: MatMul(s, wb) -> MatMul(w2) -> Relu: the body's second MatMul is last
        (matmul_then_loop, {"mm", "loop/MatMul_1"}),
        (conv_bn_relu_gemm, {"conv1", "fc"}),  # no control flow: as before
    ],
)
def test_boundary_by_data_flow_through_bodies(build, expected):
    assert _boundary(build()) == expected


def test_scan_body_layers_are_judged_by_what_flows_into_them():
    """x -> MatMul(w) -> h; Scan over the rows of h: the body's MatMul reads h, so mm is first and it is last."""
    assert _boundary(matmul_then_scan()) == {"mm", "scan/MatMul_0"}


def test_a_loop_of_three_layers_keeps_its_middle_one_at_b_bits():
    """matmul_then_loop: mm (first), then in the body MatMul(wb) (middle) and MatMul(w2) (last)."""
    result = quantize_with_report(matmul_then_loop(), QuantizeConfig(bits=4))
    assert {layer.tensor: layer.bits for layer in result.layers} == {"w": 8, "wb": 4, "w2": 8}


def test_a_network_inside_an_if_gets_its_middle_layer_at_4_bits():
    result = quantize_with_report(network_in_if(), QuantizeConfig(bits=4))
    bits = {layer.tensor: layer.bits for layer in result.layers}
    assert bits == {"w1": 8, "w2": 4, "w3": 8, "w_else": 8}


def test_a_shared_weight_on_the_boundary_keeps_8_bits():
    """Unchanged by the data-flow rule: mm1 is first and mm3 last, and they share one tensor."""
    result = quantize_with_report(shared_weight_matmuls(), QuantizeConfig(bits=4))
    assert {layer.bits for layer in result.layers} == {8}


@pytest.mark.parametrize("zeros", ["constant_of_shape", "expand"])
def test_a_product_of_a_zero_state_is_not_a_first_layer(zeros):
    """An RNN unrolled with a zero initial state (torch's dynamo export with a dynamic batch): the first step's w_hh
    product reads zeros, so w_hh, shared by every step, is a middle weight (4 bits); w_ih is first, w_out last."""
    model = unrolled_rnn_zero_state(zeros=zeros)
    assert _boundary(model) == {"ih_0", "ih_1", "ih_2", "out"}  # every step reads x through w_ih
    result = quantize_with_report(model, QuantizeConfig(bits=4))
    assert {layer.tensor: layer.bits for layer in result.layers} == {"w_ih": 8, "w_hh": 4, "w_out": 8}


def test_a_state_that_is_not_zero_still_makes_a_first_layer():
    """The same RNN with its initial state a graph input: the first step's w_hh product reads data, w_hh stays 8-bit."""
    model = unrolled_rnn_zero_state()
    h0 = next(n for n in model.graph.node if n.output[0] == "h0")
    model.graph.node.remove(h0)
    model.graph.input.append(onnx.helper.make_tensor_value_info("h0", onnx.TensorProto.FLOAT, ["N", 16]))
    assert _boundary(model) == {"ih_0", "ih_1", "ih_2", "hh_0", "out"}


def test_the_summary_says_when_most_weights_missed_the_requested_bits(tmp_path, capsys):
    """One 16x16 weight read by the first, middle and last MatMul: all of it stays 8-bit under -b 4, and the summary
    says why and what to do; a model with most weights at -b says nothing."""
    import onnx

    from onnxq.cli import main
    from onnxq.report.summary import few_at_requested_bits

    path = tmp_path / "m.onnx"
    onnx.save(shared_weight_matmuls(), path)
    assert main(["quantize", str(path), "-b", "4", "-o", str(tmp_path / "q.onnx")]) == 0
    assert ("note: only 0% of the weights are at -b 4 bits: the first and last layers keep --first-last-bits 8 "
            "(--first-last-bits 4 quantizes them at 4 bits too)") in capsys.readouterr().out
    assert few_at_requested_bits(quantize_with_report(network_in_if(), QuantizeConfig(bits=4))) is None  # w2 holds 59%


def test_the_summary_names_reduced_range_when_it_takes_8_bit_weights_to_7():
    import numpy as np

    from onnxq.config import ActivationConfig, ReduceRange
    from onnxq.report.summary import few_at_requested_bits

    data = [{"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)}]
    config = QuantizeConfig(bits=8, activations=ActivationConfig(), reduce_range=ReduceRange.ON)
    note = few_at_requested_bits(quantize_with_report(shared_weight_matmuls(), config, data))
    assert note == ("note: only 0% of the weights are at -b 8 bits: 8-bit weights that integer products read are 7-bit "
                    "(reduced range, for CPUs without VNNI) (--reduce-range off keeps 8 bits)")
