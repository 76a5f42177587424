"""Per-layer sensitivity: SQNR sums vs numpy, one-layer SQNR vs a really quantized model, ranking, report and CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from conftest import run
from onnx.reference import ReferenceEvaluator

from models import conv_bn_relu_gemm
from onnxq.analysis.sensitivity import ErrorEnergy, SensitivityAnalysis, measure_sensitivity, most_sensitive
from onnxq.cli import main
from onnxq.config import QuantizeConfig
from onnxq.pipeline import quantize_with_report

NODES = ("conv1", "conv2", "fc")


def _numpy_sqnr(reference: np.ndarray, approx: np.ndarray) -> float:
    reference, approx = reference.astype(np.float64).ravel(), approx.astype(np.float64).ravel()
    return 10 * math.log10(np.dot(reference, reference) / np.dot(reference - approx, reference - approx))


@pytest.fixture
def model():
    return conv_bn_relu_gemm(seed=3, with_bn=False, c=16)


@pytest.fixture
def batches():
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32)} for n in (5, 11)]


def test_error_energy_over_batches_is_the_sqnr_of_everything():
    rng = np.random.default_rng(1)
    refs = [rng.standard_normal(s) for s in ((3, 4), (7,), (2, 2, 2))]
    approx = [r + 0.05 * rng.standard_normal(r.shape) for r in refs]
    energy = ErrorEnergy()
    for r, a in zip(refs, approx, strict=True):
        energy.add(r, a)
    expected = _numpy_sqnr(np.concatenate([r.ravel() for r in refs]), np.concatenate([a.ravel() for a in approx]))
    assert energy.sqnr_db == pytest.approx(expected, abs=1e-9)
    exact = ErrorEnergy()
    exact.add(refs[0], refs[0])
    assert exact.sqnr_db == math.inf


def test_one_layer_sqnr_matches_a_model_with_only_that_layer_quantized(model, batches):
    """The probe's fake-quantized run equals the real QDQ model with the other layers excluded, SQNR by numpy."""
    config = QuantizeConfig(bits=4, first_last_bits=None)
    layers = {s.nodes[0]: s for s in measure_sensitivity(model, config, batches)}
    assert set(layers) == set(NODES)
    float_outputs = [run(model, b) for b in batches]
    with_node = onnx.ModelProto()
    with_node.CopyFrom(model)
    for name in ("c1", "c2"):
        with_node.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    for node, out_name in (("conv1", "c1"), ("conv2", "c2"), ("fc", "y")):
        only = QuantizeConfig(bits=4, first_last_bits=None, exclude=frozenset(set(NODES) - {node}))
        quantized = quantize_with_report(model, only).model
        outputs = [run(quantized, b) for b in batches]
        expected = _numpy_sqnr(np.concatenate(float_outputs), np.concatenate(outputs))
        assert layers[node].model_sqnr_db == pytest.approx(expected, abs=0.01)
        # The node's own output: read from the quantized model by onnx's reference evaluator.
        quantized.graph.output.append(onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
        evaluator, float_evaluator = ReferenceEvaluator(quantized), ReferenceEvaluator(with_node)
        ref = np.concatenate([float_evaluator.run([out_name], b)[0] for b in batches])
        got = np.concatenate([evaluator.run([out_name], b)[0] for b in batches])
        assert layers[node].node_sqnr_db == pytest.approx(_numpy_sqnr(ref, got), abs=0.01)
        assert layers[node].bits == 4


def test_a_fragile_layer_is_ranked_most_sensitive(model, batches):
    for fragile in NODES:
        config = QuantizeConfig(bits=6, first_last_bits=None, node_bits={fragile: 2})
        layers = measure_sensitivity(model, config, batches)
        assert most_sensitive(layers).nodes == (fragile,)
        assert {s.nodes[0]: s.bits for s in layers}[fragile] == 2


def test_fewer_bits_is_more_sensitive_and_samples_are_capped(model, batches):
    analysis = SensitivityAnalysis(model, QuantizeConfig(bits=4), batches, samples=9)
    assert analysis.samples == 9
    sqnr = [analysis.layer("w2", b).model_sqnr_db for b in (2, 4, 8)]
    assert sqnr[0] < sqnr[1] < sqnr[2]


def test_report_with_sensitivity_data_names_the_most_sensitive_layer(model, tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save_model(model, path)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32))
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code = main(["quantize", str(path), "-o", str(out), "-b", "3", "--first-last-bits", "8", "--sensitivity-data", str(data),
                 "--report", str(report)])
    assert code == 0
    written = json.loads(report.read_text())
    measured = {layer["nodes"][0]: layer["sensitivity_db"] for layer in written["layers"]}
    assert set(measured) == set(NODES) and all(isinstance(v, float) for v in measured.values())
    worst = min(measured, key=measured.get)
    assert written["totals"]["most_sensitive"] == [worst]
    assert worst == "conv2"  # the only layer at 3 bits; first and last are at 8
    markdown = report.with_suffix(".md").read_text()
    assert f"most sensitive (model output SQNR with only that layer's weights quantized): `{worst}`" in markdown
    assert "sensitivity dB" in markdown


def test_report_without_data_has_no_sensitivity(model, tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save_model(model, path)
    report = tmp_path / "r.json"
    assert main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--report", str(report)]) == 0
    assert all("sensitivity_db" not in layer for layer in json.loads(report.read_text())["layers"])
    assert "most sensitive" not in report.with_suffix(".md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--sensitivity-data", "DATA"], "--sensitivity-data is used by --report, --target-size and --max-drop"),
    (["--sensitivity-data", "DATA", "--report", "R", "--sensitivity-size", "0"], "--sensitivity-size must be a positive"),
])
def test_cli_sensitivity_option_errors(model, tmp_path, capsys, extra, message):
    path = tmp_path / "net.onnx"
    onnx.save_model(model, path)
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 8, 8), np.float32))
    extra = [str(tmp_path / "x.npy") if e == "DATA" else str(tmp_path / "r.json") if e == "R" else e for e in extra]
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(path), "-o", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(path) in err
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_without_nodes_only_the_model_outputs_are_measured(model, batches):
    """Mixed precision needs the model output only; the per-layer output SQNR (the report's) is then not measured."""
    with_nodes = SensitivityAnalysis(model, QuantizeConfig(bits=4), batches)
    without = SensitivityAnalysis(model, QuantizeConfig(bits=4), batches, nodes=False)
    for tensor in ("w1", "w2", "w3"):
        a, b = with_nodes.layer(tensor), without.layer(tensor)
        assert a.model_sqnr_db == b.model_sqnr_db and math.isfinite(a.node_sqnr_db) and math.isnan(b.node_sqnr_db)
