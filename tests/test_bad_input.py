"""Bad inputs to ``onnxq quantize``: one error line naming the file and the problem, the input untouched, nothing written.

Each case writes its input into an empty folder; after the run the folder must hold exactly
the same files with the same bytes (no output, no temporary left behind).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import CAST_FORM, decoded_weight, decoded_weight_counts, float_equivalent, run, weight_of
from onnx import TensorProto, helper, numpy_helper

from models import conv_bn_relu_gemm, matmul_then_loop, matmul_then_scan
from onnxq.cli import main
from onnxq.errors import OnnxqError
from onnxq.pipeline import quantize_with_report


def _save(folder: Path, model: onnx.ModelProto | bytes, name: str = "net.onnx") -> Path:
    path = folder / name
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


def _good_bytes() -> bytes:
    return conv_bn_relu_gemm(with_bn=False).SerializeToString()


def _weights_as_inputs(also_initializers: bool) -> onnx.ModelProto:
    """conv_bn_relu_gemm whose weights are graph inputs: fed by the caller, or initializers callers may override.

    Overridable: only the weights (not the biases) are listed, a choice rather than an old exporter's habit of listing
    every initializer (which prepare undoes: tests/test_prepare.py).
    """
    model = conv_bn_relu_gemm(with_bn=False)
    graph = model.graph
    listed = [t for t in graph.initializer if len(t.dims) >= 2] if also_initializers else list(graph.initializer)
    graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in listed)
    if not also_initializers:
        del graph.initializer[:]
    return model


def _old_model(opset: int, node: onnx.NodeProto, y_shape: list[int]) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(w) -> c -> ``node`` -> y, written as IR 3 wrote it: the initializer listed as an input too."""
    w = numpy_helper.from_array(np.linspace(-1, 1, 4 * 3 * 3 * 3, dtype=np.float32).reshape(4, 3, 3, 3), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), node],
        "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]), helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3
    return model


def _corrupt_weight_bytes(value: bytes) -> bytes:
    """The serialized model with the first float of w1 overwritten in place by ``value`` (4 bytes): still valid protobuf."""
    model = conv_bn_relu_gemm(with_bn=False)
    data = model.SerializeToString()
    start = data.index(model.graph.initializer[0].raw_data)
    return data[:start] + value + data[start + 4 :]


def _invalid_utf8_name() -> bytes:
    """A model whose Conv reads a tensor that does not exist, named with bytes that are not UTF-8."""
    model = conv_bn_relu_gemm(with_bn=False)
    model.graph.node[0].input[0] = "QQQQ"
    return model.SerializeToString().replace(b"QQQQ", b"\xff\xfe\xc0\xa8")


def _edited(edit: Callable[[onnx.ModelProto], None], as_constants: bool = False) -> onnx.ModelProto:
    model = conv_bn_relu_gemm(with_bn=False, as_constants=as_constants)
    edit(model)
    return model


def _set_w1_dims(model: onnx.ModelProto) -> None:
    model.graph.initializer[0].dims[0] = 5  # (5,3,3,3) holds fewer values than the 8*3*3*3 stored


def _set_w1_dtype(model: onnx.ModelProto) -> None:
    model.graph.initializer[0].data_type = 99


def _lengthen_constant_b3(model: onnx.ModelProto) -> None:
    value = next(n for n in model.graph.node if n.output[0] == "b3").attribute[0].t
    value.raw_data += bytes(36)  # (10,) floats need 40 bytes


def _set_opset(model: onnx.ModelProto) -> None:
    model.opset_import[0].version = 99


def _folder(folder: Path) -> Path:
    path = folder / "dir.onnx"
    path.mkdir()
    return path


def _model_and_link(folder: Path) -> Path:
    path = _save(folder, _good_bytes())
    (folder / "link.onnx").symlink_to(path)
    return path


def _mismatched_matmul() -> onnx.ModelProto:
    """x[1,8] @ w[5,4]: passes onnx.checker (no shape inference there), but onnxruntime refuses it."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mismatch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.linspace(-1, 1, 20, dtype=np.float32).reshape(5, 4), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _relu_only() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@dataclass(frozen=True)
class BadInput:
    """One bad input: how to write it, the options to run with, and what the error line must say.

    ``args`` may use ``{dir}`` (the folder) and ``{model}`` (the model path). ``names`` is the
    path the line must name ("model" or "output"); None for usage errors, which name the option.
    """

    write: Callable[[Path], Path]
    problem: tuple[str, ...]
    args: tuple[str, ...] = ()
    names: str | None = "model"
    status: int = 1


CASES: dict[str, BadInput] = {
    "missing file": BadInput(lambda d: d / "nope.onnx", ("no such file",)),
    "folder": BadInput(_folder, ("is a folder",)),
    "not onnx": BadInput(lambda d: _save(d, b"this is not a protobuf \x00\xff" * 10), ("not a readable ONNX model",)),
    "empty file": BadInput(lambda d: _save(d, b""), ("not an ONNX model (empty graph)",)),
    "truncated half": BadInput(lambda d: _save(d, _good_bytes()[: len(_good_bytes()) // 2]), ("not a readable ONNX model",)),
    "truncated last byte": BadInput(lambda d: _save(d, _good_bytes()[:-1]), ("not a readable ONNX model",)),
    "NaN weight bytes": BadInput(
        lambda d: _save(d, _corrupt_weight_bytes(b"\x00\x00\xc0\x7f")), ("weight w1 has NaN or infinite values", "--exclude conv1")
    ),
    "infinite weight bytes": BadInput(lambda d: _save(d, _corrupt_weight_bytes(b"\x00\x00\x80\xff")), ("weight w1 has NaN or infinite values",)),
    "weight data longer than shape": BadInput(
        lambda d: _save(d, _edited(_set_w1_dims)), ("tensor w1 holds 864 bytes", "(5, 3, 3, 3)", "needs 540")
    ),
    "Constant value longer than shape": BadInput(
        lambda d: _save(d, _edited(_lengthen_constant_b3, as_constants=True)), ("tensor b3 holds 76 bytes but its shape (10,) of FLOAT needs 40",)
    ),
    "unknown tensor type": BadInput(lambda d: _save(d, _edited(_set_w1_dtype)), ("tensor w1 has unknown data type 99",)),
    "name not UTF-8": BadInput(lambda d: _save(d, _invalid_utf8_name()), ("invalid ONNX model", "not valid UTF-8")),
    "opset too old to convert": BadInput(
        lambda d: _save(d, _old_model(1, helper.make_node("Pad", ["c"], ["y"], paddings=[0] * 8), [1, 4, 6, 6])),
        ("cannot convert opset 1 to 13", "Pad"),
    ),
    "old op onnx no longer knows": BadInput(
        lambda d: _save(d, _old_model(7, helper.make_node("ImageScaler", ["c"], ["y"], scale=2.0), [1, 4, 6, 6])),
        ("cannot convert opset 7 to 13", "ImageScaler"),
    ),
    "opset too new": BadInput(lambda d: _save(d, _edited(_set_opset)), ("opset 99 is newer than onnx",)),
    "model onnxruntime refuses": BadInput(
        lambda d: _save(d, _mismatched_matmul()), ("model does not load in onnxruntime", "Incompatible dimensions for matrix multiplication")
    ),
    "no quantizable nodes": BadInput(lambda d: _save(d, _relu_only()), ("no quantizable weights",)),
    "weights are graph inputs": BadInput(
        lambda d: _save(d, _weights_as_inputs(also_initializers=False)), ("no quantizable weights", "conv1 (weight is a graph input, not a constant)")
    ),
    "weights are overridable initializers": BadInput(
        lambda d: _save(d, _weights_as_inputs(also_initializers=True)),
        ("no quantizable weights", "initializer also listed as a graph input", "drop such names from graph.input"),
    ),
    "bits too high": BadInput(lambda d: _save(d, _good_bytes()), ("argument -b/--bits: invalid choice: 9",), ("-b", "9"), None, 2),
    "bits too low": BadInput(lambda d: _save(d, _good_bytes()), ("argument -b/--bits: invalid choice: 1",), ("-b", "1"), None, 2),
    "first/last bits not a number": BadInput(
        lambda d: _save(d, _good_bytes()), ("argument --first-last-bits: invalid int value: 'x'",), ("--first-last-bits", "x"), None, 2
    ),
    "output is the input": BadInput(lambda d: _save(d, _good_bytes()), ("output path is the input model",), ("-o", "{model}")),
    "output is the input through a link": BadInput(_model_and_link, ("output path is the input model",), ("-o", "{dir}/link.onnx"), "output"),
    "output in a missing folder": BadInput(
        lambda d: _save(d, _good_bytes()), ("output folder", "does not exist"), ("-o", "{dir}/missing/out.onnx"), "output"
    ),
    "output is a folder": BadInput(lambda d: _save(d, _good_bytes()), ("output path is a folder",), ("-o", "{dir}"), "output"),
}


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's usage errors
        return int(e.code)


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_bad_input_gives_one_line_and_leaves_files_alone(case: BadInput, tmp_path: Path, capfd):
    model = case.write(tmp_path)
    args = [a.format(dir=tmp_path, model=model) for a in case.args]
    before = _snapshot(tmp_path)
    assert _run(["quantize", str(model), *args]) == case.status
    captured = capfd.readouterr()  # file descriptors: onnx's and onnxruntime's C++ logging counts too
    assert "wrote" not in captured.out
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith("onnxq: error: ")
    assert "Traceback" not in line and "unexpected" not in line
    for text in case.problem:
        assert text in line
    if case.names == "model":
        assert f"error: {model}: " in line
    elif case.names == "output":
        assert f"error: {args[args.index('-o') + 1]}: " in line
    assert _snapshot(tmp_path) == before  # input bytes unchanged, no output, no temporary files


def test_debug_shows_the_exception(tmp_path):
    model = _save(tmp_path, b"not a model")
    with pytest.raises(OnnxqError, match="not a readable ONNX model"):
        main(["quantize", str(model), "--debug"])


def test_old_model_with_initializers_as_inputs_is_quantized(tmp_path, capsys):
    """IR 3 listed every initializer as an input; onnxruntime treats them as constants, and so does onnxq."""
    relu = helper.make_node("Relu", ["c"], ["y"])
    model = _old_model(6, relu, [1, 4, 6, 6])
    path = _save(tmp_path, model)
    assert main(["quantize", str(path), "-b", "8", "-o", str(tmp_path / "q.onnx")]) == 0
    assert "quantized 1 weight tensors" in capsys.readouterr().out
    quantized = onnx.load(tmp_path / "q.onnx")
    assert [i.name for i in quantized.graph.input] == ["x"]
    feeds = {"x": np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)}
    np.testing.assert_allclose(run(quantized, feeds), run(float_equivalent(quantized), feeds), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", [matmul_then_loop, matmul_then_scan], ids=["Loop", "Scan"])
@pytest.mark.parametrize("bits", [4, 8])
def test_loop_and_scan_body_weights_are_quantized_with_the_outer_graph(build, bits, tmp_path, capsys):
    """A body's own weights (wb, ws) and the outer weight it reads (w2) are quantized; their codes live in the main graph."""
    model = build()
    path = _save(tmp_path, model)
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(path), "-b", str(bits), "--first-last-bits", str(bits), "-o", str(out)]) == 0
    expected = ["w", "wb", "w2"] if build is matmul_then_loop else ["w", "ws"]
    assert f"quantized {len(expected)} weight tensors" in capsys.readouterr().out
    assert [layer.tensor for layer in quantize_with_report(model).layers] == expected
    quantized = onnx.load(out)
    new_body = next(n for n in quantized.graph.node if n.op_type in ("Loop", "Scan")).attribute[0].g
    assert list(new_body.initializer) == []  # the body's weight moved out, as codes
    assert not {t.name for t in quantized.graph.initializer} & set(expected)  # no float copy of any of them is left
    main_outputs = {out for n in quantized.graph.node for out in n.output}
    body_weights = [n.input[1] for n in new_body.node if n.op_type == "MatMul"]
    assert body_weights and all(name in main_outputs for name in body_weights)  # decoded in the main graph
    assert [decoded_weight(quantized, name).form for name in body_weights] == [CAST_FORM] * len(body_weights)
    x = np.random.default_rng(0).random((4 if build is matmul_then_scan else 1, 8), dtype=np.float32)
    unfused = _run_unfused(quantized, {"x": x})
    np.testing.assert_allclose(unfused, _run_unfused(float_equivalent(quantized), {"x": x}), rtol=1e-5, atol=1e-6)
    reference = _run_unfused(model, {"x": x})
    assert 0 < np.linalg.norm(unfused - reference) / np.linalg.norm(reference) < (0.3 if bits == 4 else 0.03)
    assert run(quantized, {"x": x}).shape == unfused.shape


def _run_unfused(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """First output with only basic graph optimizations.

    At its default level onnxruntime fuses a single-use DequantizeLinear + MatMul into
    MatMulNBits, which (accuracy level 4) also rounds the activations to int8; the graph's
    own meaning is what these tests compare.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("variance", [-1.0, float("nan")])
def test_batchnorm_that_cannot_be_folded_is_left_in_place(variance, tmp_path, capfd):
    """A negative or NaN variance made the fold warn and hand on NaN weights; such a BatchNormalization now stays as it is."""
    model = conv_bn_relu_gemm()
    var = next(t for t in model.graph.initializer if t.name == "var")
    values = numpy_helper.to_array(var).copy()
    values[0] = variance
    var.CopyFrom(numpy_helper.from_array(values, "var"))
    path = _save(tmp_path, model)
    assert main(["quantize", str(path), "-o", str(tmp_path / "q.onnx")]) == 0
    assert capfd.readouterr().err == ""  # no RuntimeWarning lines
    quantized = onnx.load(tmp_path / "q.onnx")
    assert [n.op_type for n in quantized.graph.node].count("BatchNormalization") == 1
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"))
    w1_used = weight_of(quantized, "conv1").values
    assert np.max(np.abs(w1_used - w1)) < 0.05 * np.max(np.abs(w1))  # the Conv's own weight, not a folded one


@pytest.mark.parametrize("first_run", [["-b", "4", "--sqrt", "on"], ["-b", "8", "--format", "int"], ["-b", "4", "--first-last-bits", "4"]])
def test_quantizing_a_quantized_model_says_so_and_writes_nothing(first_run, tmp_path, capsys):
    path, once, twice = _save(tmp_path, conv_bn_relu_gemm()), tmp_path / "once.onnx", tmp_path / "twice.onnx"
    assert main(["quantize", str(path), "-o", str(once), *first_run]) == 0
    capsys.readouterr()
    if "int" not in first_run:  # weight-only qdq: the default form, every weight decoded at load (Cast and Mul)
        assert decoded_weight_counts(onnx.load(once)) == {CAST_FORM: 3}
    assert main(["quantize", str(once), "-o", str(twice)]) != 0
    err = capsys.readouterr().err
    assert "once.onnx: the model is already quantized" in err and "give onnxq the float model" in err and len(err.strip().splitlines()) == 1
    assert not twice.exists()
