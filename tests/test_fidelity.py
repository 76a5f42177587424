"""The check of a written model against the float one (output SQNR, top-1 agreement), and where the CLI shows it."""

from __future__ import annotations

import json

import numpy as np
import onnx
from conftest import run
from onnx import TensorProto, helper

from models import conv_bn_relu_gemm
from onnxq.analysis.fidelity import check_against_float
from onnxq.cli import main


def _samples(n: int = 24) -> np.ndarray:
    return np.random.default_rng(5).random((n, 3, 8, 8), dtype=np.float32)


def test_a_model_against_itself_is_exact(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_gemm(), path)
    check = check_against_float(path, path, [{"x": _samples()}])
    assert (check.samples, check.output_sqnr_db, check.top1_agreement, check.worst_output) == (24, float("inf"), 1.0, None)


def test_the_check_matches_numpy_on_the_two_models_outputs(tmp_path, capsys):
    path, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    model = conv_bn_relu_gemm()
    onnx.save(model, path)
    np.save(tmp_path / "calib.npy", _samples())
    assert main(["quantize", str(path), "-b", "2", "--first-last-bits", "2", "-o", str(out), "--calibration", str(tmp_path / "calib.npy"),
                 "--report", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    x = {"x": _samples()}
    reference, quantized = run(model, x).astype(np.float64), run(onnx.load(out), x).astype(np.float64)
    sqnr = 10 * np.log10(np.sum(reference**2) / np.sum((reference - quantized) ** 2))
    agreement = np.mean(reference.argmax(1) == quantized.argmax(1))
    assert f"checked against the float model on 24 samples of the calibration data: output SQNR {sqnr:.1f} dB" in printed
    assert f"top-1 agrees on {100 * agreement:.1f}% of them" in printed
    check = json.loads((tmp_path / "r.json").read_text())["check"]
    assert check["samples"] == 24 and abs(check["output_sqnr_db"] - sqnr) < 1e-6 and check["top1_agreement"] == agreement


def test_the_worst_of_several_outputs_is_named_and_no_data_means_no_check(tmp_path, capsys):
    model = conv_bn_relu_gemm()
    model.graph.output.append(helper.make_tensor_value_info("r2", TensorProto.FLOAT, ["N", 8, 8, 8]))  # the features too
    path, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(model, path)
    assert main(["quantize", str(path), "-b", "4", "-o", str(out)]) == 0
    assert "checked against" not in capsys.readouterr().out
    check = check_against_float(path, out, [{"x": _samples()}])
    assert check.worst_output in ("y", "r2") and f"({check.worst_output})" in check.line()
    x = {"x": _samples()}
    sessions = [onnx.load(p) for p in (path, out)]
    import onnxruntime as ort

    outputs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y", "r2"], x) for m in sessions]
    sqnr = {name: 10 * np.log10(np.sum(a.astype(np.float64) ** 2) / np.sum((a.astype(np.float64) - b) ** 2))
            for name, a, b in zip(["y", "r2"], outputs[0], outputs[1], strict=True)}
    assert check.worst_output == min(sqnr, key=sqnr.get)
    assert abs(check.output_sqnr_db - min(sqnr.values())) < 1e-6
