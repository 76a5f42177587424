"""A model serialized with some initializers swapped for other values (onnxq/model/swap.py), the model left as it was."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models import conv_bn_relu_gemm
from onnxq.model.swap import SwappableWeights, _varint


def test_varint_is_protobufs():
    assert [_varint(v) for v in (0, 1, 127, 128, 300, 2**21)] == [b"\x00", b"\x01", b"\x7f", b"\x80\x01", b"\xac\x02", b"\x80\x80\x80\x01"]


def test_the_bytes_parse_as_the_model_with_the_new_values():
    model = conv_bn_relu_gemm()
    before = model.SerializeToString()
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    swappable_names = sorted(inits)[:2]
    swap = SwappableWeights(model, swappable_names)
    new = {swappable_names[0]: inits[swappable_names[0]] * 2 + 1}
    parsed = onnx.load_from_string(swap.serialized(new))
    got = {t.name: numpy_helper.to_array(t) for t in parsed.graph.initializer}
    assert sorted(got) == sorted(inits) and len(parsed.graph.initializer) == len(inits)  # each once
    for name, value in inits.items():
        np.testing.assert_array_equal(got[name], new.get(name, value))
    assert [n.SerializeToString() for n in parsed.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert model.SerializeToString() == before
    onnx.checker.check_model(parsed)


def test_only_the_named_initializers_swap():
    model = conv_bn_relu_gemm()
    name = model.graph.initializer[0].name
    with pytest.raises(ValueError, match="not swappable"):
        SwappableWeights(model, []).serialized({name: numpy_helper.to_array(model.graph.initializer[0])})
