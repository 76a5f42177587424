"""Graph preparation: BatchNorm folding, Constant lifting, node naming."""

from __future__ import annotations

import numpy as np
from conftest import assert_op_counts, random_feeds, run

from models import conv_bn_relu_gemm
from onnxq.prepare import fold_batch_norms, lift_constants, name_nodes, prepare


def test_bn_folding_keeps_outputs():
    model = conv_bn_relu_gemm(with_bn=True)
    feeds = random_feeds(model, batch=3)
    expected = run(model, feeds)
    prepared = prepare(_copy(model))
    assert_op_counts(prepared, BatchNormalization=0, Conv=2)
    np.testing.assert_allclose(run(prepared, feeds), expected, rtol=1e-4, atol=1e-5)


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

    from onnxq.prepare import bypass_constant_identities

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
