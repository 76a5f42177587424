"""Tiny ONNX models built with onnx.helper for unit tests. Each says its graph in a sketch."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, initializers, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _weight(rng: np.random.Generator, *shape: int, scale: float = 0.3) -> np.ndarray:
    # Heavy-ish tails like trained weights, so clipping matters.
    return (rng.standard_t(5, size=shape) * scale).astype(np.float32)


def conv_bn_relu_gemm(seed: int = 0, with_bn: bool = True, as_constants: bool = False, c: int = 8) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(c=8,3x3) -> [BatchNorm] -> Relu -> Conv(c,3x3) -> Relu
    -> GlobalAveragePool -> Flatten -> Gemm(10) -> y   (weights as initializers or Constant nodes)
    """
    rng = np.random.default_rng(seed)
    tensors = {
        "w1": _weight(rng, c, 3, 3, 3),
        "b1": _weight(rng, c, scale=0.1),
        "w2": _weight(rng, c, c, 3, 3),
        "w3": _weight(rng, 10, c),
        "b3": _weight(rng, 10, scale=0.1),
        "gamma": (1 + 0.2 * rng.standard_normal(c)).astype(np.float32),
        "beta": (0.1 * rng.standard_normal(c)).astype(np.float32),
        "mean": (0.1 * rng.standard_normal(c)).astype(np.float32),
        "var": (0.5 + rng.random(c)).astype(np.float32),
    }
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    if with_bn:
        nodes.append(helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["n1"], name="bn1", epsilon=1e-5))
    else:
        for k in ("gamma", "beta", "mean", "var"):
            del tensors[k]
    nodes += [
        helper.make_node("Relu", ["n1" if with_bn else "c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    if as_constants:
        consts = [helper.make_node("Constant", [], [k], name=f"const_{k}", value=numpy_helper.from_array(v, k)) for k, v in tensors.items()]
        nodes, inits = consts + nodes, []
    else:
        inits = [numpy_helper.from_array(v, k) for k, v in tensors.items()]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])
    return _model(nodes, [x], [y], inits)


def shared_weight_matmuls(seed: int = 0) -> onnx.ModelProto:
    """x[N,16] -> MatMul(W) -> Relu -> MatMul(W) -> Relu -> MatMul(W) -> y   (one 16x16 W read three times)"""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(_weight(rng, 16, 16, scale=0.25), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h1"], name="mm1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("MatMul", ["a1", "w"], ["h2"], name="mm2"),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("MatMul", ["a2", "w"], ["y"], name="mm3"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])
    return _model(nodes, [x], [y], [w])


def depthwise_convtranspose(seed: int = 0) -> onnx.ModelProto:
    """x[N,4,6,6] -> Conv(depthwise, group=4) -> Relu -> ConvTranspose(4->6, stride 2) -> y"""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(_weight(rng, 4, 1, 3, 3), "dw"),
        numpy_helper.from_array(_weight(rng, 4, 6, 2, 2), "up"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "dw"], ["d"], name="depthwise", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["r"], name="relu"),
        helper.make_node("ConvTranspose", ["r", "up"], ["y"], name="up", strides=[2, 2]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 12, 12])
    return _model(nodes, [x], [y], inits)


def conv_then_if(seed: int = 0) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(w) -> h;  If(cond): then Conv(h, w2) (w2 from the outer graph), else Relu(h) -> y"""
    rng = np.random.default_rng(seed)
    h_info = helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 8, 8, 8])
    then_branch = helper.make_graph([helper.make_node("Conv", ["h", "w2"], ["t"], pads=[1, 1, 1, 1])], "then", [], [h_info])
    e_info = helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 8, 8, 8])
    else_branch = helper.make_graph([helper.make_node("Relu", ["h"], ["e"])], "else", [], [e_info])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    inits = [numpy_helper.from_array(_weight(rng, 8, 3, 3, 3), "w"), numpy_helper.from_array(_weight(rng, 8, 8, 3, 3), "w2")]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)


def matmul_then_loop(seed: int = 0) -> onnx.ModelProto:
    """x[1,8] -> MatMul(w) -> h;  Loop(3 times, state s = h): s = Relu(MatMul(MatMul(s, wb), w2)) -> y
    (wb is an initializer of the body, w2 comes from the outer graph)
    """
    rng = np.random.default_rng(seed)
    v = helper.make_tensor_value_info
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["s_in", "wb"], ["m1"]),
            helper.make_node("MatMul", ["m1", "w2"], ["m2"]),
            helper.make_node("Relu", ["m2"], ["s_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [v("i", TensorProto.INT64, []), v("cond_in", TensorProto.BOOL, []), v("s_in", TensorProto.FLOAT, [1, 8])],
        [v("cond_out", TensorProto.BOOL, []), v("s_out", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(_weight(rng, 8, 8), "wb")],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Loop", ["trips", "", "h"], ["y"], name="loop", body=body),
    ]
    inits = [
        numpy_helper.from_array(_weight(rng, 8, 8), "w"),
        numpy_helper.from_array(_weight(rng, 8, 8), "w2"),
        numpy_helper.from_array(np.array(3, dtype=np.int64), "trips"),
    ]
    return _model(nodes, [v("x", TensorProto.FLOAT, [1, 8])], [v("y", TensorProto.FLOAT, [1, 8])], inits)


def matmul_then_scan(seed: int = 0) -> onnx.ModelProto:
    """x[T,8] -> MatMul(w) -> h;  Scan over the rows h_t of h, state s[8] = 0:
    s = Tanh(MatMul(h_t, ws) + s), y_t = s -> y[T,8]   (ws is an initializer of the body)
    """
    rng = np.random.default_rng(seed)
    v = helper.make_tensor_value_info
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_t", "ws"], ["m"]),
            helper.make_node("Add", ["m", "s_in"], ["a"]),
            helper.make_node("Tanh", ["a"], ["s_out"]),
            helper.make_node("Identity", ["s_out"], ["y_t"]),
        ],
        "body",
        [v("s_in", TensorProto.FLOAT, [8]), v("h_t", TensorProto.FLOAT, [8])],
        [v("s_out", TensorProto.FLOAT, [8]), v("y_t", TensorProto.FLOAT, [8])],
        [numpy_helper.from_array(_weight(rng, 8, 8), "ws")],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Scan", ["s0", "h"], ["s_last", "y"], name="scan", body=body, num_scan_inputs=1),
    ]
    inits = [numpy_helper.from_array(_weight(rng, 8, 8), "w"), numpy_helper.from_array(np.zeros(8, dtype=np.float32), "s0")]
    return _model(nodes, [v("x", TensorProto.FLOAT, ["T", 8])], [v("y", TensorProto.FLOAT, ["T", 8])], inits)


def residual_block(seed: int = 0, c: int = 4) -> onnx.ModelProto:
    """x[N,c,6,6] -> Conv -> Relu -> Conv -> Add(x) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(5) -> y
    (a ResNet block: the Add joins two activations; the Gemm output is the graph output)
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(_weight(rng, c, c, 3, 3), "w1"),
        numpy_helper.from_array(_weight(rng, c, scale=0.1), "b1"),
        numpy_helper.from_array(_weight(rng, c, c, 3, 3), "w2"),
        numpy_helper.from_array(_weight(rng, c, scale=0.1), "b2"),
        numpy_helper.from_array(_weight(rng, 5, c), "w3"),
        numpy_helper.from_array(_weight(rng, 5, scale=0.1), "b3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "x"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    return _model(nodes, [x], [y], inits)


def transformer_block(seed: int = 0, d: int = 64, ff: int = 2048, heads: int = 2) -> onnx.ModelProto:
    """A pre-norm transformer encoder block, as exporters write it:

    x[N,T,d] -> LayerNorm -> MatMul(Wq|Wk|Wv) + b -> Reshape/Transpose into heads -> MatMul(Q, K^T) * 1/sqrt(dh)
    -> Softmax -> MatMul(., V) -> Transpose/Reshape -> MatMul(Wo, a Constant node) + b -> Add(x) = h
    h -> LayerNorm -> MatMul(W1: d x ff) + b -> GELU (Erf) -> MatMul(W2: ff x d) + b -> Add(h) -> y
    (the attention MatMuls multiply two activations; W1 and W2 hold ff * d = 2^17 weights at the defaults)
    """
    rng = np.random.default_rng(seed)
    dh = d // heads
    tensors = {
        "ln1_scale": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
        "ln1_bias": (0.1 * rng.standard_normal(d)).astype(np.float32),
        "ln2_scale": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
        "ln2_bias": (0.1 * rng.standard_normal(d)).astype(np.float32),
        "heads_shape": np.array([0, 0, heads, dh], dtype=np.int64),
        "merged_shape": np.array([0, 0, d], dtype=np.int64),
        "inv_sqrt_dh": np.array(1.0 / np.sqrt(dh), dtype=np.float32),
        "sqrt2": np.array(np.sqrt(2.0), dtype=np.float32),
        "one": np.array(1.0, dtype=np.float32),
        "half": np.array(0.5, dtype=np.float32),
    }
    for name, shape in (("wq", (d, d)), ("wk", (d, d)), ("wv", (d, d)), ("w1", (d, ff)), ("w2", (ff, d))):
        tensors[name] = _weight(rng, *shape, scale=1.0 / np.sqrt(shape[0]))
        tensors["b" + name[1:]] = _weight(rng, shape[1], scale=0.05)
    wo = _weight(rng, d, d, scale=1.0 / np.sqrt(d))
    tensors["bo"] = _weight(rng, d, scale=0.05)
    n = helper.make_node
    nodes = [
        n("Constant", [], ["wo"], name="const_wo", value=numpy_helper.from_array(wo, "wo")),
        n("LayerNormalization", ["x", "ln1_scale", "ln1_bias"], ["n1"], name="ln1", axis=-1),
    ]
    for p in ("q", "k", "v"):
        nodes += [
            n("MatMul", ["n1", f"w{p}"], [f"{p}_mm"], name=f"{p}_proj"),
            n("Add", [f"{p}_mm", f"b{p}"], [f"{p}_lin"], name=f"{p}_bias"),
            n("Reshape", [f"{p}_lin", "heads_shape"], [f"{p}_heads"], name=f"{p}_reshape"),
            n("Transpose", [f"{p}_heads"], [f"{p}_t"], name=f"{p}_transpose", perm=[0, 2, 3, 1] if p == "k" else [0, 2, 1, 3]),
        ]
    nodes += [
        n("MatMul", ["q_t", "k_t"], ["scores"], name="scores"),
        n("Mul", ["scores", "inv_sqrt_dh"], ["scaled"], name="scale_scores"),
        n("Softmax", ["scaled"], ["attn"], name="softmax", axis=-1),
        n("MatMul", ["attn", "v_t"], ["ctx"], name="context"),
        n("Transpose", ["ctx"], ["ctx_t"], name="ctx_transpose", perm=[0, 2, 1, 3]),
        n("Reshape", ["ctx_t", "merged_shape"], ["merged"], name="merge_heads"),
        n("MatMul", ["merged", "wo"], ["o_mm"], name="o_proj"),
        n("Add", ["o_mm", "bo"], ["o_lin"], name="o_bias"),
        n("Add", ["o_lin", "x"], ["h"], name="residual1"),
        n("LayerNormalization", ["h", "ln2_scale", "ln2_bias"], ["n2"], name="ln2", axis=-1),
        n("MatMul", ["n2", "w1"], ["f1_mm"], name="ffn1"),
        n("Add", ["f1_mm", "b1"], ["f1"], name="ffn1_bias"),
        n("Div", ["f1", "sqrt2"], ["g_div"], name="gelu_div"),
        n("Erf", ["g_div"], ["g_erf"], name="gelu_erf"),
        n("Add", ["g_erf", "one"], ["g_add"], name="gelu_add"),
        n("Mul", ["f1", "g_add"], ["g_mul"], name="gelu_mul"),
        n("Mul", ["g_mul", "half"], ["g"], name="gelu_half"),
        n("MatMul", ["g", "w2"], ["f2_mm"], name="ffn2"),
        n("Add", ["f2_mm", "b2"], ["f2"], name="ffn2_bias"),
        n("Add", ["f2", "h"], ["y"], name="residual2"),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in tensors.items()]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", d])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", d])
    return _model(nodes, [x], [y], inits)


def streaming_lstm_in_if(seed: int = 0, batch_name: str = "batch", hidden: int = 16) -> onnx.ModelProto:
    """A streaming model as exporters write them: a recurrent state [2, batch, H] in and out, an If around the LSTM.

    x[batch,8], state[2,batch,16], cond (bool scalar) ->
      If(cond): then LSTM(Unsqueeze(x), h0=state[0:1], c0=state[1:2]) -> h[batch,16], new state [2,batch,16]
                else MatMul(x, w_else) -> h, state unchanged
      -> MatMul(h, w_out) -> Relu -> y[batch,4];  state_out
    ``batch_name``: the batch dimension's name ("" leaves it unnamed, as some exporters do).
    """
    rng = np.random.default_rng(seed)
    v = helper.make_tensor_value_info
    batch = batch_name or None
    i64 = lambda *values: numpy_helper.from_array(np.array(values, dtype=np.int64))  # noqa: E731
    then_nodes = [
        helper.make_node("Unsqueeze", ["x", "axis0"], ["seq"]),
        helper.make_node("Split", ["state", "halves"], ["h0", "c0"], axis=0),
        helper.make_node("LSTM", ["seq", "w_lstm", "r_lstm", "", "", "h0", "c0"], ["", "h_last", "c_last"], hidden_size=hidden),
        helper.make_node("Squeeze", ["h_last", "axis0"], ["h_then"]),
        helper.make_node("Concat", ["h_last", "c_last"], ["state_then"], axis=0),
    ]
    then_branch = helper.make_graph(then_nodes, "then", [], [v("h_then", TensorProto.FLOAT, [batch, hidden]),
                                                           v("state_then", TensorProto.FLOAT, [2, batch, hidden])])
    else_nodes = [helper.make_node("MatMul", ["x", "w_else"], ["h_else"]), helper.make_node("Identity", ["state"], ["state_else"])]
    else_branch = helper.make_graph(else_nodes, "else", [], [v("h_else", TensorProto.FLOAT, [batch, hidden]),
                                                           v("state_else", TensorProto.FLOAT, [2, batch, hidden])])
    nodes = [
        helper.make_node("If", ["cond"], ["h", "state_out"], name="step", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("MatMul", ["h", "w_out"], ["o"], name="head"),
        helper.make_node("Relu", ["o"], ["y"], name="relu"),
    ]
    axis0, halves = i64(0), i64(1, 1)
    axis0.name, halves.name = "axis0", "halves"
    inits = [
        axis0, halves,
        numpy_helper.from_array(_weight(rng, 1, 4 * hidden, 8), "w_lstm"),
        numpy_helper.from_array(_weight(rng, 1, 4 * hidden, hidden), "r_lstm"),
        numpy_helper.from_array(_weight(rng, 8, hidden), "w_else"),
        numpy_helper.from_array(_weight(rng, hidden, 4), "w_out"),
    ]
    inputs = [v("x", TensorProto.FLOAT, [batch, 8]), v("state", TensorProto.FLOAT, [2, batch, hidden]), v("cond", TensorProto.BOOL, [])]
    return _model(nodes, inputs, [v("y", TensorProto.FLOAT, [batch, 4]), v("state_out", TensorProto.FLOAT, [2, batch, hidden])], inits)


def scalar_rate_input(seed: int = 0) -> onnx.ModelProto:
    """A VAD-like model with a scalar sample-rate input: x[N,16], sr (int64 scalar) ->
    MatMul(x, w1) * (Cast(sr) / 16000) -> Relu -> MatMul(w2) -> y[N,2]
    """
    rng = np.random.default_rng(seed)
    v = helper.make_tensor_value_info
    nodes = [
        helper.make_node("Cast", ["sr"], ["rate"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["rate", "reference_rate"], ["gain"]),
        helper.make_node("MatMul", ["x", "w1"], ["m"], name="mm1"),
        helper.make_node("Mul", ["m", "gain"], ["g"], name="scale"),
        helper.make_node("Relu", ["g"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    inits = [numpy_helper.from_array(np.array(16000.0, np.float32), "reference_rate"),
             numpy_helper.from_array(_weight(rng, 16, 8), "w1"), numpy_helper.from_array(_weight(rng, 8, 2), "w2")]
    inputs = [v("x", TensorProto.FLOAT, ["N", 16]), v("sr", TensorProto.INT64, [])]
    return _model(nodes, inputs, [v("y", TensorProto.FLOAT, ["N", 2])], inits)


def network_in_if(seed: int = 0) -> onnx.ModelProto:
    """The whole network in one branch, as TorchScript writes a model with a data-dependent switch:

    x[N,16], cond -> If(cond): then  MatMul(w1) -> Relu -> MatMul(w2) -> Relu -> MatMul(w3) -> y[N,4]
                               else  MatMul(w_else) -> y
    """
    rng = np.random.default_rng(seed)
    v = helper.make_tensor_value_info
    then_nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a1"], name="then_mm1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="then_relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["a2"], name="then_mm2"),
        helper.make_node("Relu", ["a2"], ["r2"], name="then_relu2"),
        helper.make_node("MatMul", ["r2", "w3"], ["y_then"], name="then_mm3"),
    ]
    then_branch = helper.make_graph(then_nodes, "then", [], [v("y_then", TensorProto.FLOAT, ["N", 4])])
    else_branch = helper.make_graph([helper.make_node("MatMul", ["x", "w_else"], ["y_else"], name="else_mm")], "else", [],
                                    [v("y_else", TensorProto.FLOAT, ["N", 4])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="switch", then_branch=then_branch, else_branch=else_branch)]
    inits = [numpy_helper.from_array(_weight(rng, *shape), name)
             for name, shape in (("w1", (16, 32)), ("w2", (32, 32)), ("w3", (32, 4)), ("w_else", (16, 4)))]
    inputs = [v("x", TensorProto.FLOAT, ["N", 16]), v("cond", TensorProto.BOOL, [])]
    return _model(nodes, inputs, [v("y", TensorProto.FLOAT, ["N", 4])], inits)


def sliced_lstm_in_if(seed: int = 0, hidden: int = 4) -> onnx.ModelProto:
    """A torch LSTM inside an If as TorchScript exports it (Silero VAD's decoder): its weights are Constant nodes of the
    branch in torch's gate order (i, f, g, o), cut by Slice into gates, put in ONNX's order (i, o, f, c) by Concat and
    given a direction axis by Unsqueeze.

    x[3, N, 8], cond -> If(cond): then LSTM(x, W, R) -> Y_h[1, N, H] -> Squeeze -> y[N, H]
                                  else ReduceMean(x over steps) -> MatMul(w_else) -> y
    """
    rng = np.random.default_rng(seed)
    v = helper.make_tensor_value_info
    i64 = lambda name, *values: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64)))  # noqa: E731
    then_nodes = [i64("axis0", 0), *(i64(f"at{k}", k * hidden) for k in range(5))]
    for name, width in (("W", 8), ("R", hidden)):
        torch_order = numpy_helper.from_array(_weight(rng, 4 * hidden, width, scale=0.5), f"{name}_torch")
        then_nodes.append(helper.make_node("Constant", [], [f"{name}_torch"], value=torch_order))
        then_nodes += [helper.make_node("Slice", [f"{name}_torch", f"at{k}", f"at{k + 1}", "axis0"], [f"{name}_{gate}"])
                       for k, gate in enumerate("ifgo")]
        then_nodes += [helper.make_node("Concat", [f"{name}_{gate}" for gate in "iofg"], [f"{name}_onnx"], axis=0),
                       helper.make_node("Unsqueeze", [f"{name}_onnx", "axis0"], [name])]
    then_nodes += [helper.make_node("LSTM", ["x", "W", "R"], ["", "h_last"], name="lstm", hidden_size=hidden),
                   helper.make_node("Squeeze", ["h_last", "axis0"], ["y_then"])]
    then_branch = helper.make_graph(then_nodes, "then", [], [v("y_then", TensorProto.FLOAT, ["N", hidden])])
    else_nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=0),
                  helper.make_node("MatMul", ["mean", "w_else"], ["y_else"], name="else_mm")]
    else_branch = helper.make_graph(else_nodes, "else", [], [v("y_else", TensorProto.FLOAT, ["N", hidden])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="switch", then_branch=then_branch, else_branch=else_branch)]
    inputs = [v("x", TensorProto.FLOAT, [3, "N", 8]), v("cond", TensorProto.BOOL, [])]
    return _model(nodes, inputs, [v("y", TensorProto.FLOAT, ["N", hidden])], [numpy_helper.from_array(_weight(rng, 8, hidden), "w_else")])


def causal_mask_from_shape(seed: int = 0, d: int = 8, t: int = 6) -> onnx.ModelProto:
    """x[N,T,d] -> MatMul(Wq) -> q; s = q @ x^T [N,T,T]; mask = Where(Trilu(ones(Shape(s)[1:])) == 0, -inf, 0)
    -> Softmax(s + mask) @ x -> MatMul(Wo) -> y   (the causal mask torch's exporters build where T is dynamic)
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(_weight(rng, d, d), "wq"),
        numpy_helper.from_array(_weight(rng, d, 4), "wo"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(-np.inf, np.float32), "neg_inf"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="query"),
        helper.make_node("Transpose", ["x"], ["xt"], name="keys", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "xt"], ["s"], name="scores"),
        helper.make_node("Shape", ["s"], ["tt"], name="mask_shape", start=1),
        helper.make_node("ConstantOfShape", ["tt"], ["ones"], name="ones", value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("Trilu", ["ones"], ["lower"], name="lower", upper=0),
        helper.make_node("Equal", ["lower", "zero"], ["above"], name="above"),
        helper.make_node("Where", ["above", "neg_inf", "zero"], ["mask"], name="mask"),
        helper.make_node("Add", ["s", "mask"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "x"], ["a"], name="attend"),
        helper.make_node("MatMul", ["a", "wo"], ["y"], name="out"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", d])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 4])
    return _model(nodes, [x], [y], inits)


def weight_with_other_reader(layer: str, seed: int = 0) -> onnx.ModelProto:
    """x -> layer(x, w) -> Add(ReduceMean(w)) -> y: a weight that a node besides its layer reads (here a ReduceMean; in
    torch's dynamo exports without the optimizer, a Shape of the Conv weight sizes a zero bias).
    ``layer``: "conv" (x[N,8,6,6], w[16,8,3,3]), "matmul" (x[N,32], w[32,64]) or "gather" (token ids x[N], table w[50,16]).
    """
    rng = np.random.default_rng(seed)
    if layer == "conv":
        w, x, y = _weight(rng, 16, 8, 3, 3), ("x", TensorProto.FLOAT, ["N", 8, 6, 6]), ["N", 16, 6, 6]
        node = helper.make_node("Conv", ["x", "w"], ["c"], name="layer", pads=[1, 1, 1, 1])
    elif layer == "matmul":
        w, x, y = _weight(rng, 32, 64), ("x", TensorProto.FLOAT, ["N", 32]), ["N", 64]
        node = helper.make_node("MatMul", ["x", "w"], ["c"], name="layer")
    else:
        w, x, y = _weight(rng, 50, 16), ("x", TensorProto.INT64, ["N"]), ["N", 16]
        node = helper.make_node("Gather", ["w", "x"], ["c"], name="layer")
    nodes = [node, helper.make_node("ReduceMean", ["w"], ["wm"], name="weight_mean", keepdims=0),
             helper.make_node("Add", ["c", "wm"], ["y"], name="add")]
    return _model(nodes, [helper.make_tensor_value_info(*x)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
                  [numpy_helper.from_array(w, "w")])


def unrolled_rnn_zero_state(seed: int = 0, zeros: str = "constant_of_shape", steps: int = 3, hidden: int = 16) -> onnx.ModelProto:
    """An RNN unrolled as torch's dynamo export writes it with a dynamic batch: x[N,3,8]; h0 zeros of shape [N, hidden]
    (``zeros``: "constant_of_shape" of Shape(x), or "expand" of a zero scalar); h_t = Tanh(x_t @ w_ih + h_(t-1) @ w_hh);
    y = h_3 @ w_out. Every step reads w_ih and w_hh; the first step's w_hh product is of zeros."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_weight(rng, 8, hidden), "w_ih"), numpy_helper.from_array(_weight(rng, hidden, hidden), "w_hh"),
             numpy_helper.from_array(_weight(rng, hidden, 4), "w_out"), numpy_helper.from_array(np.array([0], dtype=np.int64), "zero_i"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "one_i"), numpy_helper.from_array(np.array([hidden], dtype=np.int64), "hid"),
             numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero_f")]
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Slice", ["shape", "zero_i", "one_i"], ["batch"]),
             helper.make_node("Concat", ["batch", "hid"], ["state_shape"], axis=0)]
    if zeros == "constant_of_shape":
        nodes.append(helper.make_node("ConstantOfShape", ["state_shape"], ["h0"], value=numpy_helper.from_array(np.array([0.0], dtype=np.float32))))
    else:
        nodes.append(helper.make_node("Expand", ["zero_f", "state_shape"], ["h0"]))
    state = "h0"
    for t in range(steps):
        inits.append(numpy_helper.from_array(np.array(t, dtype=np.int64), f"t{t}"))
        nodes += [helper.make_node("Gather", ["x", f"t{t}"], [f"x{t}"], axis=1),
                  helper.make_node("MatMul", [f"x{t}", "w_ih"], [f"a{t}"], name=f"ih_{t}"),
                  helper.make_node("MatMul", [state, "w_hh"], [f"b{t}"], name=f"hh_{t}"),
                  helper.make_node("Add", [f"a{t}", f"b{t}"], [f"s{t}"]), helper.make_node("Tanh", [f"s{t}"], [f"h{t + 1}"])]
        state = f"h{t + 1}"
    nodes.append(helper.make_node("MatMul", [state, "w_out"], ["y"], name="out"))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", steps, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)

