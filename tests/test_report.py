"""onnxq quantize --report: JSON matching the run, SQNR recomputed from the written model, Markdown, chart, errors."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import decode_matmul_nbits, weight_of
from onnx import numpy_helper

import onnxq
from models import conv_bn_relu_gemm
from onnxq.cli import main
from onnxq.config import Granularity, QuantizeConfig, SqrtMode, WeightFormat
from onnxq.model.save import write_files
from onnxq.pipeline import quantize_with_report
from onnxq.report.files import NO_MATPLOTLIB, ReportPaths, build_report, to_markdown


@pytest.fixture
def float_path(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save_model(conv_bn_relu_gemm(with_bn=False, c=16), path)  # no BatchNorm: the float weights are the ones quantized
    return path


def _attribute(node, name, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _dequantized_weight(model: onnx.ModelProto, node_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float weight a node of the written model computes with, decoded here from its initializers."""
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    if node.op_type in ("IntConv", "PostConv"):
        bits, packed = _attribute(node, "bits"), numpy_helper.to_array(inits[node.input[1]])
        scale = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
        k = math.prod(shape[1:])
        if bits <= 4:  # two's-complement nibbles, low nibble first, rows padded to whole bytes
            nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(len(packed), -1)[:, :k].astype(np.int8)
            codes = np.where(nibbles > 7, nibbles - 16, nibbles)
        else:
            codes = packed.view(np.int8)[:, :k]
        if node.op_type == "PostConv":
            top = 2 ** (bits - 1) - 1
            levels = np.where(codes == 0, 0.0, np.sqrt(2.0) ** -(top - np.abs(codes).astype(np.float64))).astype(np.float32)
            values = np.sign(codes).astype(np.float32) * levels * scale[:, None]
        else:
            values = codes.astype(np.float32) * scale[:, None]
        return values.reshape(shape)
    if node.op_type == "MatMulNBits":  # onnxruntime's layout, decoded in conftest
        values = decode_matmul_nbits(numpy_helper.to_array(inits[node.input[1]]), numpy_helper.to_array(inits[node.input[2]]),
                                     _attribute(node, "K"), _attribute(node, "bits"))
        return values if tuple(shape) == values.shape else values.T
    return weight_of(model, node_name).values  # DequantizeLinear, or Cast and Mul, [-> Abs, Mul], decoded in conftest


def _sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    return float(10 * np.log10(np.sum(reference**2) / np.sum((reference - approx.astype(np.float64)) ** 2)))


@pytest.mark.parametrize(("options", "config"), [
    ([], QuantizeConfig(bits=4)),
    (["-b", "3", "--granularity", "tensor", "--sqrt", "on"], QuantizeConfig(bits=3, granularity=Granularity.TENSOR, sqrt=SqrtMode.ON)),
    (["--format", "post", "--first-last-bits", "4"], QuantizeConfig(bits=4, format=WeightFormat.POST, first_last_bits=4)),
    (["-b", "6", "--format", "int"], QuantizeConfig(bits=6, format=WeightFormat.INT)),
])
def test_json_matches_the_run_and_the_written_model(float_path, tmp_path, capsys, options, config):
    output, report = tmp_path / "q.onnx", tmp_path / "run.json"
    assert main(["quantize", str(float_path), "-o", str(output), "--report", str(report), *options]) == 0
    data = json.loads(report.read_text())
    result = quantize_with_report(float_path, config)
    assert data["input"] == str(float_path) and data["output"] == str(output)
    assert data["input_file_bytes"] == float_path.stat().st_size and data["output_file_bytes"] == output.stat().st_size
    assert data["config"]["bits"] == config.bits and data["config"]["format"] == config.format.value
    assert data["onnxq_version"] == onnxq.__version__
    assert len(data["layers"]) == len(result.layers)
    float_weights = {t.name: numpy_helper.to_array(t) for t in conv_bn_relu_gemm(with_bn=False, c=16).graph.initializer}
    written = onnx.load(output)
    for got, want in zip(data["layers"], result.layers):
        assert (got["tensor"], got["nodes"], got["op_types"]) == (want.tensor, list(want.nodes), list(want.op_types))
        assert (got["bits"], got["storage_bits"], got["sqrt"], got["op"]) == (want.bits, want.storage_bits, want.sqrt, want.op)
        assert got["format"] == ("post" if want.op == "PostConv" else "uniform")
        assert got["granularity"] == ("channel" if want.per_channel else "tensor")
        assert (got["float_bytes"], got["quantized_bytes"]) == (want.float_bytes, want.quantized_bytes)
        assert got["alpha"]["median"] == pytest.approx(want.alpha_median, abs=1e-12)
        assert (got["alpha"].get("per_channel") is not None) == want.per_channel
        if want.per_channel:
            assert got["alpha"]["per_channel"] == pytest.approx(list(want.alpha), abs=1e-12)
        assert got["alpha"]["min"] == pytest.approx(min(want.alpha)) and got["alpha"]["max"] == pytest.approx(max(want.alpha))
        reference = float_weights[got["tensor"]]
        recomputed = _sqnr_db(reference, _dequantized_weight(written, got["nodes"][0], reference.shape))
        assert got["weight_sqnr_db"] == pytest.approx(recomputed, abs=0.01), got["tensor"]
        assert "sensitivity_db" not in got and "output_sqnr_db" not in got
    totals = data["totals"]
    assert totals["layers"] == len(result.layers) and totals["quantized_bytes"] == sum(layer.quantized_bytes for layer in result.layers)
    markdown = (tmp_path / "run.md").read_text()
    for layer in result.layers:
        assert any(line.startswith(f"| {layer.nodes[0]} |") for line in markdown.splitlines())
    assert f"report: {report}, {tmp_path / 'run.md'}" in capsys.readouterr().out


def test_md_path_puts_the_json_beside_and_lists_skipped(float_path, tmp_path):
    md = tmp_path / "reports.md"
    assert main(["quantize", str(float_path), "-o", str(tmp_path / "q.onnx"), "--exclude", "conv2", "--report", str(md)]) == 0
    data = json.loads((tmp_path / "reports.json").read_text())
    assert {"node": "conv2", "reason": "excluded by the user"} in data["skipped"]
    assert data["config"]["exclude"] == ["conv2"]
    text = md.read_text()
    assert "## Left in float" in text and "| conv2 | excluded by the user |" in text


def test_optional_layer_fields_appear_only_when_set(float_path, tmp_path):
    config = QuantizeConfig(bits=4)
    output = tmp_path / "q.onnx"
    output.write_bytes(b"x")  # build_report only measures the output file's size
    report = build_report(quantize_with_report(float_path, config), config, output, float_path)
    assert all("sensitivity_db" not in layer for layer in report.to_dict()["layers"])
    assert "sensitivity dB" not in to_markdown(report)
    measured = report.with_layer_values({"w2": {"sensitivity_db": 21.5, "output_sqnr_db": 30.25}})
    layers = {layer["tensor"]: layer for layer in json.loads(measured.to_json())["layers"]}
    assert (layers["w2"]["sensitivity_db"], layers["w2"]["output_sqnr_db"]) == (21.5, 30.25)
    assert "sensitivity_db" not in layers["w1"]
    table = to_markdown(measured)
    assert "| output SQNR dB | sensitivity dB |" in table and "| 30.25 | 21.50 |" in table
    with pytest.raises(ValueError, match="not optional layer fields: bogus"):
        report.with_layer_values({"w2": {"bogus": 1.0}})


def test_exact_weights_give_valid_json(tmp_path):
    model = conv_bn_relu_gemm(with_bn=False)
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    w2.CopyFrom(numpy_helper.from_array(np.zeros(numpy_helper.to_array(w2).shape, np.float32), "w2"))
    source, report = tmp_path / "zeros.onnx", tmp_path / "r.json"
    onnx.save_model(model, source)
    assert main(["quantize", str(source), "--report", str(report)]) == 0
    text = report.read_text()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON: no bare non-finite numbers
    layers = {layer["tensor"]: layer for layer in json.loads(text)["layers"]}
    assert isinstance(layers["w2"]["weight_sqnr_db"], str) and float(layers["w2"]["weight_sqnr_db"]) in (math.inf, -math.inf)


def test_chart_when_matplotlib_is_installed(float_path, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["quantize", str(float_path), "-o", str(tmp_path / "q.onnx"), "--report", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert NO_MATPLOTLIB not in capsys.readouterr().out


def test_chart_skipped_without_matplotlib(float_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("onnxq.report.chart.matplotlib_available", lambda: False)
    assert main(["quantize", str(float_path), "-o", str(tmp_path / "q.onnx"), "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert out.count(NO_MATPLOTLIB) == 1
    assert (tmp_path / "r.json").exists() and (tmp_path / "r.md").exists() and not (tmp_path / "r.png").exists()


@pytest.mark.parametrize(("report", "problem"), [
    ("missing/r.json", "report folder"),
    ("q.onnx", "would overwrite a model"),
    ("net.onnx", "would overwrite a model"),
    ("chart.png", "takes the .json or .md path"),
])
def test_bad_report_path_fails_before_any_work(float_path, tmp_path, capsys, report, problem):
    before = sorted(p.name for p in tmp_path.iterdir())
    digest = float_path.read_bytes()
    assert main(["quantize", str(float_path), "-o", str(tmp_path / "q.onnx"), "--report", str(tmp_path / report)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before and float_path.read_bytes() == digest


def test_no_report_when_quantization_fails(tmp_path, capsys):
    model = conv_bn_relu_gemm(with_bn=False)
    source = tmp_path / "net.onnx"
    onnx.save_model(model, source)
    assert main(["quantize", str(source), "--exclude", "conv1", "conv2", "fc", "--report", str(tmp_path / "r.json")]) == 1
    assert "no quantizable weights" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]


def test_report_paths():
    assert ReportPaths.from_option(Path("a/r.json")) == ReportPaths(Path("a/r.json"), Path("a/r.md"), Path("a/r.png"))
    assert ReportPaths.from_option(Path("a/r.MD")) == ReportPaths(Path("a/r.json"), Path("a/r.MD"), Path("a/r.png"))


def test_write_files_is_all_or_nothing(tmp_path):
    with pytest.raises(OSError):
        write_files({tmp_path / "a.json": b"{}", tmp_path / "missing" / "b.md": b"#"})
    assert list(tmp_path.iterdir()) == []
    write_files({tmp_path / "a.json": b"{}", tmp_path / "b.md": b"#"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.md"] and (tmp_path / "b.md").read_bytes() == b"#"


def test_readme_report_and_inspect_lines_run(tmp_path, monkeypatch, capsys):
    """The README's --report and inspect lines, run as written in a folder holding a model.onnx."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Using it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [shlex.split(line, comments=True) for line in block.strip().splitlines()]
    lines = [argv for argv in lines if "--report" in argv or argv[:2] == ["onnxq", "inspect"]]
    assert [argv[1] for argv in lines] == ["quantize", "inspect"]
    onnx.save_model(conv_bn_relu_gemm(), tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    for argv in lines:
        assert main(argv[1:]) == 0, argv
    assert json.loads(Path("run.json").read_text())["output"] == "model.q4.onnx" and Path("run.md").exists()
    assert "int4" in capsys.readouterr().out
