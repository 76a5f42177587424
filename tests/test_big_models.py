"""Big models: weights searched in row blocks, onnx passes run on a skeleton, peak memory near the model's size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.config import SqrtMode
from onnxq.model.load import LoadedModel
from onnxq.model.opset import ensure_opset
from onnxq.model.prepare import infer_shapes
from onnxq.model.skeleton import DETACH_BYTES, skeleton
from onnxq.numerics import weights
from onnxq.numerics.weights import quantize_post_weight, quantize_weight

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("sqrt", [SqrtMode.OFF, SqrtMode.AUTO])
def test_row_blocks_give_the_codes_of_the_whole_tensor(monkeypatch: pytest.MonkeyPatch, axis: int, sqrt: SqrtMode) -> None:
    rng = np.random.default_rng(3)
    weight = (rng.standard_t(4, size=(37, 29)) * 0.1).astype(np.float32)
    whole = quantize_weight(weight, 4, axis, sqrt)
    monkeypatch.setattr(weights, "BLOCK_WEIGHTS", 100)  # blocks of 3 or 4 rows, the last one shorter
    assert len(list(weights.row_blocks(weight, axis))) > 5
    blocked = quantize_weight(weight, 4, axis, sqrt)
    np.testing.assert_array_equal(blocked.codes, whole.codes)
    np.testing.assert_array_equal(blocked.scale, whole.scale)
    np.testing.assert_array_equal(blocked.alpha, whole.alpha)
    assert blocked.sqrt == whole.sqrt
    reference = whole.dequantize().astype(np.float64) - weight
    assert blocked.mse == pytest.approx(np.mean(reference**2), rel=1e-12)


def test_row_blocks_post(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = np.random.default_rng(4).normal(size=(16, 8, 3, 3)).astype(np.float32)
    whole = quantize_post_weight(weight, 4, 0)
    monkeypatch.setattr(weights, "BLOCK_WEIGHTS", 150)
    blocked = quantize_post_weight(weight, 4, 0)
    np.testing.assert_array_equal(blocked.codes, whole.codes)
    np.testing.assert_array_equal(blocked.scale, whole.scale)


def _matmul_chain(width: int, layers: int, opset: int) -> onnx.ModelProto:
    """x -> MatMul(W0) -> Relu -> ... -> MatMul(W{layers-1}) -> y, weights deterministic."""
    rng = np.random.default_rng(5)
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_t(5, size=(width, width)) * 0.02).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, width]) for name in ("x", x)]
    graph = helper.make_graph(nodes, "chain", io[:1], io[1:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_skeleton_holds_no_big_weight_values() -> None:
    model = _matmul_chain(1024, 2, 17)  # 4 MiB weights
    model.graph.initializer.append(numpy_helper.from_array(np.arange(4, dtype=np.int64), "small"))
    bare = skeleton(model)
    assert bare.ByteSize() < DETACH_BYTES
    big = {t.name: t for t in bare.graph.initializer}
    assert not big["w0"].raw_data and list(big["w0"].dims) == [1024, 1024] and big["w0"].data_type == TensorProto.FLOAT
    np.testing.assert_array_equal(numpy_helper.to_array(big["small"]), np.arange(4))
    assert list(bare.graph.node) == list(model.graph.node) and bare.opset_import == model.opset_import


def test_conversion_and_shape_inference_keep_big_weights_exactly() -> None:
    model = _matmul_chain(1024, 2, 13)
    model.graph.node.append(helper.make_node("ReduceSum", ["r1", "axes"], ["s"], name="sum", keepdims=1))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"))
    model.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 1]))
    expected = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    loaded = LoadedModel(model, None, False)
    ensure_opset(loaded, 21)
    assert loaded.model.opset_import[0].version == 21 and loaded.model.ir_version >= 10
    loaded.model = infer_shapes(loaded.model)
    onnx.checker.check_model(loaded.model)
    got = {t.name: numpy_helper.to_array(t) for t in loaded.model.graph.initializer}
    assert got.keys() == expected.keys()
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in loaded.model.graph.value_info}
    assert shapes["m0"] == [1, 1024]


_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from onnxq.config import QuantizeConfig
    from onnxq.pipeline import quantize_with_report
    from onnxq.model.save import save_model

    def rss():
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()

    source, output = sys.argv[1:3]
    start = rss()
    result = quantize_with_report(source, QuantizeConfig(bits=4))
    save_model(result.model, output, external_data=True)
    print(json.dumps({"start": start, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc")
def test_peak_memory_stays_near_the_model_size(tmp_path: Path) -> None:
    """Quantizing a 64 MiB external-data model (opset 17, so converted to 21) raises the process's RSS by at most 5x its size.

    Measured in a child process that has imported everything first. At this size about
    150 MiB of first-use allocations (onnxruntime's verification session, numpy buffers)
    sit on top of the model, hence 5x and not the 1.5x the 3 GB benchmark meets; before
    the row blocks the search's temporaries alone made it 12.6x.
    """
    width, layers = 2048, 4
    model = _matmul_chain(width, layers, 17)
    path = tmp_path / "chain.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="chain.onnx.data")
    del model
    size = path.stat().st_size + (tmp_path / "chain.onnx.data").stat().st_size
    warm = "import onnxruntime, onnxq.pipeline, onnxq.model.save, numpy; numpy.ones((1 << 20,)); "
    run = subprocess.run(
        [sys.executable, "-c", warm + _CHILD, str(path), str(tmp_path / "out.onnx")], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert run.returncode == 0, run.stderr
    memory = json.loads(run.stdout.strip().splitlines()[-1])
    rise = memory["peak"] - memory["start"]
    assert rise <= 5 * size, f"peak RSS rose by {rise / size:.2f}x the model's {size / 2**20:.0f} MiB"
    assert (tmp_path / "out.onnx.data").exists()


def test_external_weights_are_not_read_at_load_but_read_exactly_when_needed(tmp_path: Path) -> None:
    """Loading keeps external tensors in their file (so float weights are never all in memory); reading one gives its values."""
    from onnxq.model.external import is_external, materialize
    from onnxq.model.graph import to_array
    from onnxq.model.load import load

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save_model(model, folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = load(folder / "m.onnx")
    w = next(t for t in loaded.model.graph.initializer if t.name == "w")
    assert is_external(w) and not w.raw_data and loaded.external_data
    np.testing.assert_array_equal(to_array(w), weight)
    assert is_external(w)  # reading did not pull the bytes into the model
    assert materialize(loaded.model) == 1 and not is_external(w)
    np.testing.assert_array_equal(numpy_helper.to_array(w), weight)
