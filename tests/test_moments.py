"""Second moments H of each layer's input rows, against onnxruntime's own layers: for any weight row w, the mean square
of that output channel, as onnxruntime computes the layer, must equal w H w^T (and its mean w E[x]). That holds only if the rows (the
conv patches with their strides, padding, dilations and groups) are exactly what the layer multiplies."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import splitmix64
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibrate import moments
from onnxq.calibrate.moments import Hessians, LayerInput, MomentCollector, Moments, PackedSums, layer_inputs
from onnxq.config import QuantizeConfig
from onnxq.model.prepare import prepare
from onnxq.plan.weights import plan_weights


def _conv_model(c: int, m: int, kernel: tuple[int, ...], **attrs) -> onnx.ModelProto:
    rank = len(kernel)
    group = attrs.get("group", 1)
    w = np.random.default_rng(0).standard_normal((m, c // group, *kernel)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c] + ["S"] * rank)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)], "g", [x], [y], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _check(model: onnx.ModelProto, feeds: dict[str, np.ndarray], out_axis: int, groups: int) -> None:
    """Every output channel's mean square (onnxruntime) equals w_c H_g w_c^T with the collected H, its mean w_c E[x]_g."""
    prepared = prepare(model)
    plans, _ = plan_weights(prepared.graph, QuantizeConfig(bits=8, first_last_bits=None))
    inputs = layer_inputs(prepared.graph, plans)
    (weight,) = inputs
    collector = MomentCollector(inputs)
    for name in collector.tensors:
        collector.observe(name, feeds[name])
    h = collector.hessians()[weight]
    mean = collector.means()[weight]
    w = numpy_helper.to_array(next(t for t in prepared.graph.initializer if t.name == weight)).astype(np.float64)
    rows = np.moveaxis(w, plans[0].channel_axis, 0).reshape(w.shape[plans[0].channel_axis], -1)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0].astype(np.float64)
    per_channel = np.moveaxis(y, out_axis, 0).reshape(y.shape[out_axis], -1)
    assert h.shape[0] == groups
    per_group = len(rows) // groups
    for channel, row in enumerate(rows):
        want = np.mean(per_channel[channel] ** 2)
        got = row @ h[channel // per_group] @ row
        assert got == pytest.approx(want, rel=1e-4), channel
        assert row @ mean[channel // per_group] == pytest.approx(np.mean(per_channel[channel]), rel=1e-4, abs=1e-5 * np.sqrt(want)), channel


@pytest.mark.parametrize(
    ("c", "m", "kernel", "attrs"),
    [
        (3, 4, (3, 3), {}),
        (4, 6, (3, 2), {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]}),
        (6, 4, (3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
        (5, 5, (3, 3), {"group": 5, "strides": [2, 2], "pads": [1, 1, 1, 1]}),  # depthwise
        (4, 4, (3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        (4, 4, (2, 2), {"auto_pad": "SAME_LOWER"}),
        (3, 4, (5,), {"pads": [2, 1], "dilations": [2]}),  # Conv1d, as audio models have them
        (2, 3, (2, 2, 2), {"strides": [1, 2, 1]}),  # Conv3d
        (10, 3, (3, 3), {"pads": [1, 1, 1, 1]}),  # K = 90: the products' upper triangle only (syrk), mirrored at the end
    ],
)
@pytest.mark.parametrize("one_sample_at_a_time", [False, True])
def test_conv_patches_are_what_the_layer_multiplies(c, m, kernel, attrs, one_sample_at_a_time, monkeypatch):
    if one_sample_at_a_time:  # the patches are stacked a sample at a time and moved into place
        monkeypatch.setattr(moments, "STACKED_BYTES", 1)
    x = np.random.default_rng(1).standard_normal((3, c) + (7,) * len(kernel)).astype(np.float32)
    _check(_conv_model(c, m, kernel, **attrs), {"x": x}, out_axis=1, groups=attrs.get("group", 1))


@pytest.mark.parametrize("kind", ["x @ W", "W @ x", "Gemm", "Gemm transA transB", "x @ W, K = 70"])
def test_matmul_and_gemm_rows(kind):
    rng = np.random.default_rng(2)
    if kind == "x @ W, K = 70":  # wide enough for the syrk path
        node, w, x = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), rng.standard_normal((70, 5)), rng.standard_normal((2, 9, 70))
        kind, axis = "x @ W", -1
    elif kind == "x @ W":
        node, w, x, axis = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), rng.standard_normal((6, 5)), rng.standard_normal((2, 3, 6)), -1
    elif kind == "W @ x":
        node, w, x, axis = helper.make_node("MatMul", ["w", "x"], ["y"], name="mm"), rng.standard_normal((5, 6)), rng.standard_normal((2, 6, 3)), -2
    elif kind == "Gemm":
        node, w, x, axis = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc"), rng.standard_normal((6, 5)), rng.standard_normal((4, 6)), -1
    else:
        node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transA=1, transB=1)
        w, x, axis = rng.standard_normal((5, 6)), rng.standard_normal((6, 4)), -1
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w.astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _check(model, {"x": x.astype(np.float32)}, out_axis=axis % (x.ndim if kind != "Gemm transA transB" else 2), groups=1)


def test_a_shared_weight_sums_its_readers_inputs():
    """One weight read by two MatMuls: H is the mean over both readers' rows."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["a", "w"], ["p"], name="m1"), helper.make_node("MatMul", ["b", "w"], ["q"], name="m2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 3]) for n in "ab"],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "pq"],
                              [numpy_helper.from_array(rng.standard_normal((3, 2)).astype(np.float32), "w")])
    prepared = prepare(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    plans, _ = plan_weights(prepared.graph, QuantizeConfig(bits=8, first_last_bits=None))
    collector = MomentCollector(layer_inputs(prepared.graph, plans))
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    collector.observe("a", a)
    collector.observe("b", b)
    both = np.concatenate([a, b])
    np.testing.assert_allclose(collector.hessians()["w"][0], both.T @ both / len(both), rtol=1e-6)  # float32 products


@pytest.mark.parametrize(("groups", "k"), [(1, 70), (1, 301), (3, 5), (2, 80), (1, 7)])
def test_packed_sums_are_the_products_of_every_run(groups, k):
    """H kept as packed float32 triangles (sfrk's for one wide group, matmul's full matrices packed else; even and odd
    K, 301 across a block of the mirroring) and made full again: x^T x over all runs' rows, against numpy in float64,
    to float32's precision, whether the products went into the sums at once or were flushed between runs."""
    rng = np.random.default_rng(11)
    runs = [rng.standard_normal((groups, n, k)) + 0.5 for n in (3, 40, 9)]
    m = Moments()
    for i, rows in enumerate(runs):
        m.add_taken(rows)
        if i == 1:
            m.flush()
    assert m.sums is not None and m.sums.shape == (groups, k * (k + 1) // 2) and m.sums.dtype == np.float32
    every = np.concatenate(runs, axis=1)
    want = np.einsum("gni,gnj->gij", every, every) / every.shape[1]
    got = m.hessian()
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, got.transpose(0, 2, 1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.max(np.abs(want)))


def test_hessians_are_new_matrices_and_shared_sums_stay_until_the_last_weight():
    """Each look-up unpacks a new array (the quantizer centres it in place); a sum two weights share outlives one pop."""
    want = np.array([[0, 1, 3], [1, 2, 4], [3, 4, 5]], dtype=np.float64)[None]
    m = Moments(pending=want.astype(np.float32), count=2)
    m.flush()
    sums = PackedSums(m.sums, m.count)
    hessians = Hessians({"q": sums, "k": sums})
    want /= 2
    first = hessians["q"]
    np.testing.assert_array_equal(first, want)
    first += 1
    np.testing.assert_array_equal(hessians.pop("q"), want)
    assert "q" not in hessians and "k" in hessians and len(hessians) == 1
    np.testing.assert_array_equal(hessians["k"], want)
    assert hessians.pop("q") is None


@pytest.mark.parametrize("k", [1, 2, 3, 6, 7, 257, 600])  # odd and even (RFP's two layouts), past the mirrored block
def test_packed_sums_unpack_to_the_matrix_summed(k):
    """Sums packed from full symmetric products come back bit for bit, read from the packed blocks, into a given array too."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((2, 3 * k, k)).astype(np.float32)
    products = np.matmul(x.transpose(0, 2, 1), x)
    products = (products + products.transpose(0, 2, 1)) / 2  # symmetric to the bit
    m = Moments(pending=products, count=4)
    m.flush()
    want = products.astype(np.float64) / 4
    sums = PackedSums(m.sums, m.count)
    np.testing.assert_array_equal(sums.matrix(), want)
    out = np.full((2, k, k), np.nan)
    assert sums.fill(out) is out
    np.testing.assert_array_equal(out, want)


def test_layers_without_an_h_are_left_out():
    """A ConvTranspose given its output_shape: no H (it keeps its own-error quantization)."""
    rng = np.random.default_rng(4)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", output_shape=[6, 6])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(rng.standard_normal((2, 3, 3, 3)).astype(np.float32), "w")])
    prepared = prepare(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    plans, _ = plan_weights(prepared.graph, QuantizeConfig(bits=8, first_last_bits=None))
    assert layer_inputs(prepared.graph, plans) == {}
    assert LayerInput("x", "rows").rows(np.ones((2, 3, 4))).shape == (1, 6, 4)


@pytest.mark.parametrize("planned", [False, True])
def test_thinned_rows_count_for_the_rows_they_stand_for(monkeypatch, planned):
    """Past the cap, one row per run of `stride` positions (sample i, row r at i * 2**32 + r) is kept, weighted by the
    stride: the sums equal the reference built row by row. Unplanned, the stride doubles at 10, 20, 30 ... kept rows;
    planned (from 150 expected rows: stride 8), it stays until the kept rows pass 4 caps (40), then doubles per cap."""
    from onnxq.calibrate import moments as moments_module

    monkeypatch.setattr(moments_module, "MIN_ROWS", 10)
    rng = np.random.default_rng(5)
    k = 2  # the cap is max(MIN_ROWS, 4 k) = 10
    # calls of (samples, rows per sample), samples numbered on from 0; planned, more rows than the plan's 150 come
    shapes = [(1, 7), (2, 3), (3, 9), (1, 5), (2, 13), (4, 1), (5, 20), (3, 30), (2, 40)] * (3 if planned else 1)
    calls = [rng.standard_normal((1, samples * rows, k)) for samples, rows in shapes]
    m = moments_module.Moments()
    if planned:
        m.plan_stride(150, k)
        assert m.stride == 8  # 150 >= 2 x 10 x 4, < 2 x 10 x 8
    first = 0
    for (samples, _), rows in zip(shapes, calls, strict=True):
        m.add(rows, first, samples)
        first += samples
    # the reference: walk the rows one at a time by the rule, the stride checked after each call as the module does
    sums, linear, count, kept, stride, doublings = np.zeros((k, k)), np.zeros(k), 0, 0, 8 if planned else 1, 0
    sample = 0
    for (samples, per_sample), rows in zip(shapes, calls, strict=True):
        pending = []
        for j, row in enumerate(rows[0]):
            position = (sample + j // per_sample) * 2**32 + j % per_sample
            if stride == 1 or position % stride == splitmix64(position // stride) % stride:
                pending.append(row)
        sample += samples
        for row in pending:
            sums += stride * np.outer(row, row)
            linear += stride * row
        count += stride * len(pending)
        kept += len(pending)
        while (kept > 10 * (4 + doublings)) if planned else (kept >= 10 * stride.bit_length()):
            stride, doublings = stride * 2, doublings + 1
    assert stride > (16 if planned else 1)  # the case thins (and, planned, doubles past its plan)
    assert (m.count, m.kept, m.stride) == (count, kept, stride)
    np.testing.assert_allclose(m.hessian()[0] * m.count, sums, rtol=1e-5)
    np.testing.assert_allclose(m.mean()[0], linear / count, rtol=1e-9)


def test_thinning_keeps_h_an_average_over_all_rows(monkeypatch):
    """On many rows of a drifting input, the thinned H is close to the full average (not to the first rows')."""
    from onnxq.calibrate import moments as moments_module

    monkeypatch.setattr(moments_module, "MIN_ROWS", 256)
    rng = np.random.default_rng(6)
    runs = [rng.standard_normal((1, 512, 4)) * (1 + i / 10) for i in range(40)]  # the scale grows run by run
    m = moments_module.Moments()
    for i, rows in enumerate(runs):
        m.add(rows, first_sample=i)  # one sample of 512 rows each
    full = sum(r[0].T @ r[0] for r in runs) / sum(r.shape[1] for r in runs)
    first = runs[0][0].T @ runs[0][0] / 512
    assert m.kept < 0.2 * 40 * 512
    # the last ~4600 rows (the largest) are stood for by ~72 rows kept at stride 64: a diagonal entry's standard error is
    # about sqrt(2 / 72) = 0.17 of that part (over 200 seeds the worst entry was a median 0.12 off, whether rows were kept
    # by stream position or by sample position, and over 0.1 on 63% and 68% of the seeds); the first rows' H is over 0.5 off
    np.testing.assert_allclose(np.diagonal(m.hessian()[0]), np.diagonal(full), rtol=0.25)
    assert not np.allclose(np.diagonal(first), np.diagonal(full), rtol=0.5)


def _conv_transpose_model(c: int, m: int, kernel: tuple[int, ...], **attrs) -> onnx.ModelProto:
    rank = len(kernel)
    w = np.random.default_rng(0).standard_normal((c, m, *kernel)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c] + ["S"] * rank)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv", **attrs)
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("c", "m", "kernel", "attrs"),
    [
        (3, 4, (3, 3), {}),
        (4, 3, (4, 4), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),  # the usual 2x upsampling
        (3, 2, (3, 2), {"strides": [2, 3], "pads": [1, 0, 0, 1], "dilations": [1, 2], "output_padding": [1, 2]}),
        (2, 3, (5,), {"strides": [3], "pads": [2, 1]}),  # 1-D, as audio decoders have them
    ],
)
def test_conv_transpose_rows_are_what_the_layer_multiplies(c, m, kernel, attrs):
    """Each output channel's mean square from onnxruntime equals w_o H w_o^T with the H summed for ConvTranspose."""
    x = np.random.default_rng(1).standard_normal((2, c) + (5,) * len(kernel)).astype(np.float32)
    _check(_conv_transpose_model(c, m, kernel, **attrs), {"x": x}, out_axis=1, groups=1)


def test_conv_transpose_of_several_groups_gets_no_h():
    model = prepare(_conv_transpose_model(4, 2, (3, 3), group=2))
    plans, _ = plan_weights(model.graph, QuantizeConfig(bits=4))
    assert layer_inputs(model.graph, plans) == {}


@pytest.mark.parametrize(
    ("c", "kernel", "attrs"),
    [(4, (3, 3), {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]}), (6, (3, 3), {"group": 3, "pads": [1, 1, 1, 1]}),
     (3, (5,), {"pads": [2, 1], "dilations": [2]}), (2, (2, 2, 2), {"strides": [1, 2, 1]}),
     (5, (5, 3), {"group": 5, "pads": [2, 1, 2, 1], "strides": [2, 2]}),  # depthwise
     (3, (3, 4), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}), (2, (4,), {"auto_pad": "SAME_LOWER", "dilations": [2]})],
)
def test_picked_patches_are_those_rows_of_all_patches(c, kernel, attrs):
    """A thinned convolution builds only the rows it keeps: they equal the same rows of every patch."""
    rank = len(kernel)
    spatial = tuple(attrs.get("strides", [1] * rank))
    reader = LayerInput("x", "conv", attrs.get("group", 1), kernel=kernel, strides=spatial, pads=tuple(attrs.get("pads", [0] * 2 * rank)),
                        dilations=tuple(attrs.get("dilations", [1] * rank)), auto_pad=attrs.get("auto_pad", "NOTSET"))
    x = np.random.default_rng(8).standard_normal((3, c) + (7,) * rank).astype(np.float32)
    every = reader.rows(x)
    assert reader.count(x) == every.shape[1]
    for keep in (slice(1, None, 3), slice(0, None, 5), slice(2, None, 2)):
        np.testing.assert_array_equal(reader.rows(x, keep), every[:, keep])
        assert reader.rows(x, keep).flags.c_contiguous  # as the products' BLAS call reads them without a copy


def test_a_known_sample_count_sets_the_stride_from_the_first_run(monkeypatch):
    """Told how many samples come, a reader keeps about the cap's worth of rows spread over all of them (not the cap per doubling)."""
    from onnxq.calibrate import moments as moments_module

    monkeypatch.setattr(moments_module, "MIN_ROWS", 1000)
    inputs = {"w": [LayerInput("x", "rows")]}
    rng = np.random.default_rng(10)
    runs = [rng.standard_normal((8, 50, 4)).astype(np.float32) * (1 + i / 20) for i in range(40)]  # 40 x 400 rows
    told, untold = MomentCollector(inputs, samples=320), MomentCollector(inputs)
    for i, run in enumerate(runs):
        told.observe("x", run, 8 * i)
        untold.observe("x", run, 8 * i)
    (kept,) = [m.kept for m in told.moments.values()]
    (kept_untold,) = [m.kept for m in untold.moments.values()]
    assert 1000 <= kept <= 2000 < kept_untold
    full = sum(np.einsum("bnk,bnl->kl", r, r) for r in runs) / (40 * 400)
    np.testing.assert_allclose(np.diagonal(told.hessians()["w"][0]), np.diagonal(full), rtol=0.1)


def _lstm_model(layout: int, outputs: tuple[str, str]) -> onnx.ModelProto:
    """One forward LSTM over x ([T, N, C], or [N, T, C] with layout 1), its Y and Y_h outputs named as ``outputs`` says."""
    rng = np.random.default_rng(5)
    hidden, c = 3, 4
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)
               for name, shape in (("W", (1, 4 * hidden, c)), ("R", (1, 4 * hidden, hidden)))]
    node = helper.make_node("LSTM", ["x", "W", "R"], list(outputs), name="lstm", hidden_size=hidden, layout=layout)
    shape = [5, 2, c] if layout == 0 else [2, 5, c]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs if o], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _recurrent_moments(
    model: onnx.ModelProto, layout: int, outputs: tuple[str, str], directions: int
) -> tuple[np.ndarray, dict[str, np.ndarray], Hessians]:
    """The LSTM's input, the states it produced (onnxruntime's, or random ones of layout 1's shapes: onnxruntime runs
    layout 0 only) and the H the collector sums from them."""
    x = np.random.default_rng(6).standard_normal([5, 2, 4] if layout == 0 else [2, 5, 4]).astype(np.float32)
    if layout == 0:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        produced = dict(zip([o for o in outputs if o], session.run(None, {"x": x})))
    else:
        rng = np.random.default_rng(7)
        produced = {"y": rng.standard_normal((2, 5, directions, 3)), "y_h": rng.standard_normal((2, directions, 3))}
    prepared = prepare(model)
    plans, _ = plan_weights(prepared.graph, QuantizeConfig(bits=8, first_last_bits=None))
    collector = MomentCollector(layer_inputs(prepared.graph, plans))
    for name in collector.tensors:
        collector.observe(name, {"x": x, **produced}[name])
    return x, produced, collector.hessians()


@pytest.mark.parametrize(("layout", "outputs"), [(0, ("y", "y_h")), (1, ("y", "")), (0, ("", "y_h")), (1, ("", "y_h"))])
def test_recurrent_weights_see_the_steps_inputs_and_the_hidden_states(layout, outputs):
    """W's H is the mean of x_t x_t^T over every step and sample; R's, of h h^T over the hidden states onnxruntime returns
    (all steps' Y where the layer outputs it, else the last state Y_h)."""
    x, produced, h = _recurrent_moments(_lstm_model(layout, outputs), layout, outputs, directions=1)
    xs = x.reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(h["W"][0], xs.T @ xs / len(xs), rtol=1e-6)
    # Y [T, 1, N, 3] (layout 0) or [N, T, 1, 3]; Y_h [1, N, 3] or [N, 1, 3]
    states = (produced["y"] if outputs[0] else produced["y_h"]).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(h["R"][0], states.T @ states / len(states), rtol=1e-6)


def test_a_sequence_counts_its_samples_on_the_batch_axis():
    """Layout 0 keeps samples on axis -2 ([T, N, C], Y [T, D, N, C]): rows come sample after sample, as the thinning counts them."""
    value = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    steps = LayerInput("x", "steps")
    assert steps.layout(value) == (2, 5)
    np.testing.assert_array_equal(steps.rows(value)[0], np.concatenate([value[:, 0], value[:, 1]]))


def test_a_grus_recurrence_gets_no_h():
    """A GRU's candidate gate multiplies R by r * h, not h (its W gets H, and a bidirectional GRU's W too)."""
    from test_recurrent import recurrent_then_gemm

    for directions in (1, 2):
        gru = prepare(recurrent_then_gemm("GRU", directions=directions))
        plans, _ = plan_weights(gru.graph, QuantizeConfig(bits=8, first_last_bits=None))
        assert set(layer_inputs(gru.graph, plans)) == {"W", "fc"}


def _bidirectional_lstm(layout: int, outputs: tuple[str, str]) -> onnx.ModelProto:
    model = _lstm_model(layout, outputs)
    node = model.graph.node[0]
    node.attribute.append(helper.make_attribute("direction", "bidirectional"))
    rng = np.random.default_rng(8)
    for i, tensor in enumerate(model.graph.initializer):  # (2, 4 * hidden, C) and (2, 4 * hidden, hidden)
        dims = (2, *tensor.dims[1:])
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array((rng.standard_normal(dims) * 0.5).astype(np.float32), tensor.name))
    return model


@pytest.mark.parametrize(("layout", "outputs"), [(0, ("y", "y_h")), (0, ("", "y_h")), (1, ("y", "")), (1, ("", "y_h"))])
def test_a_bidirectional_layer_puts_each_directions_inputs_in_its_own_block(layout, outputs):
    """Rows of a bidirectional W hold both directions' weights side by side: H is half the block diagonal of the steps'
    x x^T twice (both directions read x), R's half that of the forward and of the backward states (numpy on onnxruntime's
    Y / Y_h, or states of layout 1's shapes)."""
    x, produced, h = _recurrent_moments(_bidirectional_lstm(layout, outputs), layout, outputs, directions=2)

    def halved_blocks(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
        k = forward.shape[1]
        out = np.zeros((2 * k, 2 * k))
        out[:k, :k], out[k:, k:] = forward.T @ forward / len(forward) / 2, backward.T @ backward / len(backward) / 2
        return out

    xs = x.reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(h["W"][0], halved_blocks(xs, xs), rtol=1e-6, atol=1e-12)
    states = produced["y"] if outputs[0] else produced["y_h"]
    axis = -3 if layout == 0 else -2  # the directions: Y [T, 2, N, 3] / Y_h [2, N, 3], or [N, T, 2, 3] / [N, 2, 3]
    forward, backward = (np.take(states, d, axis=axis).reshape(-1, 3).astype(np.float64) for d in (0, 1))
    np.testing.assert_allclose(h["R"][0], halved_blocks(forward, backward), rtol=1e-6, atol=1e-12)


def test_conv_transpose_weights_chosen_for_the_output_beat_their_own_error():
    """With its H, a 4-bit ConvTranspose (the model's output layer here) leaves less output error on the data than the
    same layer quantized for its own error: onnxruntime runs both against the float model."""
    from models import depthwise_convtranspose
    from onnxq.pipeline import quantize

    model = depthwise_convtranspose()
    rng = np.random.default_rng(9)
    mixing = rng.standard_normal((2, 4))  # correlated channels: where the output's error and the weight's differ
    x = (np.einsum("nkhw,kc->nchw", rng.standard_normal((32, 2, 6, 6)), mixing) + 0.05 * rng.standard_normal((32, 4, 6, 6))).astype(np.float32)
    data = [{"x": x}]

    def output_error(config: QuantizeConfig) -> float:
        q = quantize(model, config, data)
        run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0] for m in (model, q)]
        return float(np.mean((run[0].astype(np.float64) - run[1]) ** 2))

    config = QuantizeConfig(bits=4, first_last_bits=None, depthwise_bits=None)
    assert output_error(config) < 0.8 * output_error(dataclasses.replace(config, output_aware=False))


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_bidirectional_weights_chosen_for_the_output_beat_their_own_error(op):
    """A 4-bit bidirectional LSTM/GRU then a Gemm, on correlated inputs: with H (both directions' W, the LSTM's R) the
    model's output error on the data is under half that of every weight quantized for its own error (onnxruntime runs
    both; without the directions' H it was 1.7x that error for the LSTM, a one-off run)."""
    from test_recurrent import recurrent_then_gemm

    from onnxq.pipeline import quantize

    model = recurrent_then_gemm(op, directions=2)
    name = model.graph.input[0].name
    dims = [d.dim_value or 4 for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(3)
    x = (rng.standard_normal([*dims[:-1], 2]) @ rng.standard_normal((2, dims[-1])) + 0.05 * rng.standard_normal(dims)).astype(np.float32)

    def output_error(config: QuantizeConfig) -> float:
        q = quantize(model, config, [{name: x}])
        run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})[0] for m in (model, q)]
        return float(np.mean((run[0].astype(np.float64) - run[1]) ** 2))

    config = QuantizeConfig(bits=4, first_last_bits=None)
    assert output_error(config) < 0.5 * output_error(dataclasses.replace(config, output_aware=False))


def test_picked_patches_in_blocks_are_the_same_rows(monkeypatch):
    """Gathered a few rows at a time (blocks of 5 here, 256 in use), the kept rows are those of every patch."""
    from onnxq.calibrate import moments as moments_module

    monkeypatch.setattr(moments_module, "PICK_ROWS", 5)
    for kind, attrs in (("conv", {"strides": (2, 1), "pads": (1, 0, 2, 1)}), ("deconv", {"strides": (2, 2), "pads": (1, 1, 1, 1)})):
        reader = LayerInput("x", kind, kernel=(3, 3), dilations=(1, 1), **attrs)
        x = np.random.default_rng(11).standard_normal((2, 3, 6, 5)).astype(np.float32)
        every = reader.rows(x) if kind == "conv" else reader.rows(x, np.arange(reader.count(x)))
        keep = np.arange(1, reader.count(x), 3)
        np.testing.assert_array_equal(reader.rows(x, keep), every[:, keep])
