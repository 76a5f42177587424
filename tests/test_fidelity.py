"""The check of a written model against the float one (output SQNR, top-1 agreement), and where the CLI shows it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from conftest import run
from onnx import TensorProto, helper, numpy_helper

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


def test_no_data_warns_where_the_bits_break_the_model_and_not_where_they_do_not(tmp_path, capsys):
    """Synthetic inputs shaped and typed as the model declares: MobileNetV2 at 2 bits drifts (and loses most of its
    accuracy), ResNet-20 at 4 bits does not (it keeps its top-1 within half a point)."""
    from onnxq.cli import main

    repo = Path(__file__).resolve().parents[1] / "models"
    assert main(["quantize", str(repo / "fmnist_mobilenetv2.onnx"), "-b", "2", "-o", str(tmp_path / "m2.onnx")]) == 0
    out = capsys.readouterr().out
    assert "warning: the quantized model's output drifted from the float model's (output SQNR" in out
    assert "on 16 synthetic inputs" in out and "--calibration DATA" in out
    assert main(["quantize", str(repo / "fmnist_resnet20.onnx"), "-b", "4", "-o", str(tmp_path / "r4.onnx")]) == 0
    assert "warning" not in capsys.readouterr().out


def test_synthetic_token_ids_stay_inside_the_table():
    from onnxq.analysis.fidelity import synthetic_inputs

    table = numpy_helper.from_array(np.zeros((7, 3), np.float32), "table")
    node = helper.make_node("Gather", ["table", "ids"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [table])
    feeds = synthetic_inputs(helper.make_model(graph), samples=32)
    ids = np.concatenate([f["ids"].ravel() for f in feeds])
    assert feeds[0]["ids"].shape == (1, 16) and ids.min() >= 0 and ids.max() <= 6 and len(set(ids.tolist())) == 7


def _padded(tmp_path: Path, pad: int) -> Path:
    """x[N, T] -> reflect Pad by ``pad`` on both sides (needs T > pad) -> Relu."""
    pads = numpy_helper.from_array(np.array([0, pad, 0, pad], dtype=np.int64), "pads")
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect", name="pad"), helper.make_node("Relu", ["p"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L"])], [pads])
    path = tmp_path / f"pad{pad}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_model_synthetic_inputs_cannot_drive_is_skipped_silently(tmp_path, capfd):
    """A reflect Pad wider than every synthetic length fails in onnxruntime: no check, and none of its error log on the terminal."""
    from onnxq.analysis.fidelity import check_on_synthetic

    path = _padded(tmp_path, 5000)
    capfd.readouterr()
    assert check_on_synthetic(path, path) is None
    assert "onnxruntime" not in capfd.readouterr().err


def test_synthetic_inputs_grow_until_the_model_runs(tmp_path, capfd):
    """A model that pads by 32 (Silero VAD-like) cannot run 16-long inputs: the check runs 256-long ones instead."""
    from onnxq.analysis.fidelity import check_on_synthetic

    path = _padded(tmp_path, 32)
    capfd.readouterr()
    check = check_on_synthetic(path, path)
    assert check is not None and check.output_sqnr_db == float("inf")  # the same file against itself
    assert "onnxruntime" not in capfd.readouterr().err


def test_the_speed_line_reports_the_measured_ratio_and_what_may_help():
    """The ratio is float's time over the quantized model's; a slower QDQ model gets the hint, a faster one does not."""
    from onnxq.analysis.speed import Speed

    slow = Speed(float_ms=2.0, quantized_ms=4.0, samples=8, integer_ops=False)
    assert slow.ratio == 0.5
    assert slow.line().startswith("speed: 0.50x the float model's on this CPU (4 ms against 2 ms for a run of 8 samples")
    assert "--format int" in slow.line()
    assert "onnxq's ops dequantize" in Speed(2.0, 4.0, 1, integer_ops=True).line()
    nbits = Speed(2.0, 4.0, 1, integer_ops=False, dequantizes=False, nbits=True).line()
    assert "MatMulNBits can be slower" in nbits and "--format int" not in nbits
    fast = Speed(float_ms=3.0, quantized_ms=2.0, samples=1, integer_ops=True)
    assert fast.line().endswith("for a run of 1 sample, onnxruntime, one thread)")


def test_the_cli_times_the_written_model_unless_told_not_to(tmp_path, capsys):
    """With data (a batch of it) and without (the synthetic inputs): one speed line; --no-speed: none."""
    import re

    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_gemm(), path)
    np.save(tmp_path / "calib.npy", _samples())
    runs = {
        "data": ["--calibration", str(tmp_path / "calib.npy")],
        "none": [],
        "off": ["--no-speed"],
    }
    for name, extra in runs.items():
        assert main(["quantize", str(path), "-b", "4", "-o", str(tmp_path / f"{name}.onnx"), *extra]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("speed:")]
        if name == "off":
            assert lines == []
            continue
        assert len(lines) == 1, lines
        samples = 8 if name == "data" else 1  # a batch of the data (up to 8 samples), or one synthetic input
        pattern = r"speed: ([0-9.]+)x the float model's on this CPU \(([0-9.e+-]+) ms against ([0-9.e+-]+) ms for a run of (\d+) sample"
        match = re.match(pattern, lines[0])
        assert match is not None, lines[0]
        ratio, quantized_ms, float_ms, count = float(match[1]), float(match[2]), float(match[3]), int(match[4])
        assert count == samples and quantized_ms > 0 and float_ms > 0
        assert abs(ratio - float_ms / quantized_ms) <= 0.02 * ratio + 0.01  # the printed ratio is the printed times' (rounded)


def test_the_warning_suggests_what_the_run_did_not_try():
    """Without data: data for the weights. With data, weights only: no data advice, the size budgets. With fixed-step
    activations: ASQ or float activations too; with ASQ float activations, not ASQ again. A healthy check: no warning."""
    from onnxq.analysis.fidelity import DAMAGED_SQNR_DB, Fidelity, RunKind, damage_warning

    damaged = Fidelity(samples=8, output_sqnr_db=DAMAGED_SQNR_DB - 3, worst_output=None, top1_agreement=None)
    blind = damage_warning(damaged, "16 synthetic inputs")
    assert blind.startswith("warning: ") and "--calibration DATA" in blind and "--sensitivity-data DATA" in blind
    weights = damage_warning(damaged, "the calibration data", RunKind(calibrated=True))
    assert "--calibration DATA" not in weights and "--target-size SIZE" in weights and "--calibrate asq" not in weights
    fixed = damage_warning(damaged, "the calibration data", RunKind(calibrated=True, activations=True))
    assert "--calibrate asq" in fixed and "--activations none" in fixed
    asq = damage_warning(damaged, "the calibration data", RunKind(calibrated=True, activations=True, asq=True))
    assert "--calibrate asq" not in asq and "more bits (-b)" in asq and "--activations none" in asq
    assert "--activations none" not in weights
    ops = damage_warning(damaged, "16 synthetic inputs", RunKind(op_inputs=True, bits=8))
    assert "--format qdq" in ops and "--calibration DATA" in ops and "more bits" not in ops and "--max-drop" not in ops
    assert "--format qdq" not in blind and "more bits (-b)" in blind and "--exclude" not in blind
    eight = damage_warning(damaged, "the calibration data", RunKind(calibrated=True, bits=8))
    assert eight.endswith("accuracy): --exclude the layers that cannot take 8 bits (--report PATH with --sensitivity-data DATA ranks them)")
    healthy = Fidelity(samples=8, output_sqnr_db=DAMAGED_SQNR_DB + 0.1, worst_output=None, top1_agreement=None)
    assert damage_warning(healthy, "the calibration data", RunKind(calibrated=True, activations=True)) is None
