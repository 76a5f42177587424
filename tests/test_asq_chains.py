"""ASQ's quantizations between onnxq ops in the op formats (onnxq/rewrite/chains.py).

The reference is the graph as the ASQ rewrite writes it, each op's float output quantized and dequantized in standard
ONNX (onnxq/rewrite/activations.py); the chain rewrite must give the same outputs within about a code step per op.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.native.domain import DOMAIN, DOMAIN_VERSION
from onnxq.native.session import session
from onnxq.rewrite.chains import link_chains
from onnxq.rewrite.ops import pack_rows

C, HW = 8, 6


class _Graph:
    """A hand-written int-format graph: IntConv nodes and ASQ's pairs in standard ONNX between them."""

    def __init__(self, seed: int = 3) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def conv(self, name: str, x: str, step: tuple[float, int]) -> str:
        """A 1x1 IntConv, 4-bit codes, reading float ``x`` with the fixed uint8 ``step`` (s, z); returns its float output."""
        codes = self.rng.integers(-7, 8, size=(C, C))
        inputs = [x, self.const(f"{name}_w", pack_rows(codes, 4)),
                  self.const(f"{name}_scale", np.full(C, 0.05, np.float32)),
                  self.const(f"{name}_b", (self.rng.standard_normal(C) * 0.1).astype(np.float32)),
                  self.const(f"{name}_xs", np.array(step[0], np.float32)), self.const(f"{name}_xz", np.array(step[1], np.uint8))]
        self.nodes.append(helper.make_node("IntConv", inputs, [f"{name}_y"], name=name, domain=DOMAIN, bits=4, kernel_shape=[1, 1]))
        return f"{name}_y"

    def channel_pair(self, x: str) -> str:
        """ASQ's fixed per-channel pair: Div(r) -> Q(1, z_c, axis 1) -> DQ -> Mul(r), r constant per channel."""
        r = self.const(f"{x}_r", (0.02 + 0.03 * self.rng.random((1, C, 1, 1))).astype(np.float32))
        ones = self.const(f"{x}_ones", np.ones(C, np.float32))
        z = self.const(f"{x}_z", self.rng.integers(100, 140, size=C).astype(np.uint8))
        self.nodes += [helper.make_node("Div", [x, r], [f"{x}_div"]),
                       helper.make_node("QuantizeLinear", [f"{x}_div", ones, z], [f"{x}_q"], axis=1),
                       helper.make_node("DequantizeLinear", [f"{x}_q", ones, z], [f"{x}_dq"], axis=1),
                       helper.make_node("Mul", [f"{x}_dq", r], [f"{x}_pair"])]
        return f"{x}_pair"

    def model(self, output: str) -> onnx.ModelProto:
        shape = ["N", C, HW, HW]
        graph = helper.make_graph(self.nodes, "asq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)], self.inits)
        graph.value_info.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, shape)
                                for n in self.nodes if n.domain == DOMAIN for o in n.output if o != output)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(model.SerializeToString()).run(None, {"x": x})[0]


def _residual_block(skip_pair: bool) -> onnx.ModelProto:
    """x -> a -> b -> pair -> Add(skip) -> Relu -> Q/DQ -> c; the skip x, or (``skip_pair``) a shortcut op s behind its own pair.

    ::
        x ---------------------- [-> s -> pair] ---.
          `-> a -> b -> pair -> Add(skip) -> Relu -> Q/DQ -> c
    """
    g = _Graph()
    a = g.conv("a", "x", (0.03, 128))
    b = g.conv("b", a, (0.03, 128))
    skip = g.channel_pair(g.conv("s", "x", (0.03, 128))) if skip_pair else "x"
    g.nodes += [helper.make_node("Add", [g.channel_pair(b), skip], ["sum"]), helper.make_node("Relu", ["sum"], ["relu"])]
    s, z = g.const("s", np.array(0.05, np.float32)), g.const("z", np.array(0, np.uint8))
    g.nodes += [helper.make_node("QuantizeLinear", ["relu", s, z], ["relu_q"]), helper.make_node("DequantizeLinear", ["relu_q", s, z], ["relu_dq"])]
    return g.model(g.conv("c", "relu_dq", (0.05, 0)))


def test_an_asq_per_channel_pair_in_front_of_a_residual_add_goes_with_the_add():
    for skip_pair in (False, True):
        reference = _residual_block(skip_pair)
        fused = onnx.ModelProto()
        fused.CopyFrom(reference)
        report = link_chains(fused.graph)
        types = [n.op_type for n in fused.graph.node]
        assert report.residuals == 1 and types.count("Add") == types.count("Div") == types.count("Relu") == 0, types
        b = next(n for n in fused.graph.node if n.name == "b")
        assert b.op_type == "IntConvQ" and b.input[8] == ("s_y" if skip_pair else "x")  # float R: s's exact output, or x
        x = np.random.default_rng(1).standard_normal((4, C, HW, HW)).astype(np.float32)
        got, want = _run(fused, x), _run(reference, x)
        # the sum from b's (and s's) exact outputs instead of their per-channel codes: up to half a step (0.05 max) each,
        # then c's input code may move by one (0.05), times c's weights (|q| <= 7, scale 0.05, C inputs)
        assert np.abs(got - want).max() <= 2 * 0.05 * 7 * 0.05 * C
        assert np.mean(np.abs(got - want)) < 0.1 * np.mean(np.abs(want))


def _asq_block(opset: int = 17) -> onnx.ModelProto:
    """ASQ's steps per sample on a's output X, as the activation rewrite and take_input_quantization leave them.

    ::
        x -> a -> X -> ReduceMean -> Gemm -> Clip -> Exp -> Mul(s) = steps
                  X (x_scale = steps) -> b -> c -> Add(skip) -> y
                  X -> Div(r) -> Q(1, z) -> DQ(1, z) -> Mul(r) ----'    (r = Reshape(steps))
    """
    g = _Graph(seed=7)
    x = g.conv("a", "x", (0.03, 128))
    weight = g.const("asq_w", (g.rng.standard_normal((C, 1)) * 0.5).astype(np.float32))
    bias = g.const("asq_b", np.array([0.1], np.float32))
    lo, hi = g.const("asq_lo", np.array(-0.6, np.float32)), g.const("asq_hi", np.array(0.8, np.float32))
    s, z = g.const("asq_s", np.array([0.04], np.float32)), g.const("asq_z", np.array(120, np.uint8))
    g.nodes += [helper.make_node("ReduceMean", [x], ["f"], axes=[2, 3], keepdims=0),
                helper.make_node("Gemm", ["f", weight, bias], ["t"]), helper.make_node("Clip", ["t", lo, hi], ["tc"]),
                helper.make_node("Exp", ["tc"], ["e"]), helper.make_node("Mul", ["e", s], ["steps"])]
    ones, shape = g.const("one", np.array(1.0, np.float32)), g.const("shape", np.array([0, 1, 1, 1], np.int64))
    g.nodes += [helper.make_node("Reshape", ["steps", shape], ["r"]), helper.make_node("Div", [x, "r"], ["xd"]),
                helper.make_node("QuantizeLinear", ["xd", ones, z], ["xq"]), helper.make_node("DequantizeLinear", ["xq", ones, z], ["xu"]),
                helper.make_node("Mul", ["xu", "r"], ["x_dequantized"])]
    b = g.conv("b", x, (0.03, 128))
    g.nodes[-1].input[4:6] = ["steps", z]  # b reads X with ASQ's steps
    c = g.conv("c", b, (0.05, 128))
    g.nodes.append(helper.make_node("Add", [c, "x_dequantized"], ["y"]))
    return g.model("y")


def test_an_op_computes_asq_steps_for_its_readers_and_writes_codes():
    reference = _asq_block()
    fused = onnx.ModelProto()
    fused.CopyFrom(reference)
    report = link_chains(fused.graph)
    ops = {n.name: n for n in fused.graph.node if n.domain == DOMAIN}
    assert report.asq_steps == 1 and report.residuals == 1 and report.linked == 2, report
    assert [n.op_type for n in fused.graph.node] == ["IntConvQ", "IntConvQ", "IntConv"]  # no adapter, no Add, no pair
    a, b, c = ops["a"], ops["b"], ops["c"]
    assert list(a.output) == [b.input[0], b.input[4]] == [c.input[8], c.input[9]]  # codes and steps: b's X, c's R
    inits = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    np.testing.assert_array_equal(inits[a.input[14]], np.array([0.1, -0.6, 0.8], np.float32))
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, C, HW, HW)).astype(np.float32) * 3
        got, want = _run(fused, x), _run(reference, x)
        steps = session(_with_output(reference, "steps").SerializeToString()).run(["steps"], {"x": x})[0].reshape(-1)
        # X's codes are the graph's but where a step's last bits differ (double sums in the op, float32 in onnxruntime)
        # put a value on the other side of a rounding tie: one code of X, in the skip and through b and c
        bound = steps.max() * (1 + 7 * 0.05 * C * (1 + 7 * 0.05 * C))
        assert np.abs(got - want).max() <= bound, (np.abs(got - want).max(), bound)
        assert np.mean(np.abs(got - want) <= 1e-6 * np.abs(want).max()) > 0.99  # nearly all within float32 rounding


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy of ``model`` with tensor ``name`` as an extra graph output."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy


def test_an_op_in_front_of_an_asq_per_channel_pair_writes_its_codes_for_float_readers():
    """x -> a -> pair -> GlobalAveragePool: a writes the pair's codes (its affine map 1/r, z), one DequantizeLinear."""
    g = _Graph(seed=11)
    pair = g.channel_pair(g.conv("a", "x", (0.03, 128)))
    g.nodes.append(helper.make_node("GlobalAveragePool", [pair], ["y"]))
    reference = g.model("y")
    reference.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, 1, 1]))
    fused = onnx.ModelProto()
    fused.CopyFrom(reference)
    report = link_chains(fused.graph)
    assert [n.op_type for n in fused.graph.node] == ["IntConvQ", "DequantizeLinear", "GlobalAveragePool"]
    assert report.float_outputs["a"].startswith("ASQ's per-channel steps (written as codes, dequantized for GlobalAveragePool")
    x = np.random.default_rng(2).standard_normal((6, C, HW, HW)).astype(np.float32) * 2
    got, want = _run(fused, x), _run(reference, x)
    r = numpy_helper.to_array(next(t for t in reference.graph.initializer if t.name == "a_y_r")).reshape(1, C, 1, 1)
    # a code moves by one only next to a rounding tie (1/r multiplied, z added in float32): far under one step on average
    assert np.all(np.abs(got - want) <= r * (1 + 1e-5))
    assert np.mean(np.abs(got - want) <= 1e-6 * np.abs(want).max()) > 0.9
