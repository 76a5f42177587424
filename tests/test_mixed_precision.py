"""Mixed precision by sensitivity: size parsing, the greedy order, budgets on written models, --max-drop, CLI errors."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from conftest import decoded_weights

from models import conv_bn_relu_gemm
from onnxq.analysis.mixed_precision import Candidate, Rung, TargetSize, choose_bits, greedy_raises, ladder
from onnxq.analysis.sensitivity import SensitivityAnalysis
from onnxq.cli import main
from onnxq.config import QuantizeConfig
from onnxq.numerics.uniform import quantized_bytes

NODES = ("conv1", "conv2", "fc")


@pytest.mark.parametrize("text, unit, value", [
    ("300000", "bytes", 300000), ("300KB", "bytes", 300000), ("1.5MiB", "bytes", 1.5 * 2**20), ("2e3b", "bytes", 2000),
    ("0.2x", "ratio", 0.2), ("20%", "ratio", 0.2), ("12.5 %", "ratio", 0.125), ("5bits", "bits", 5), (" 4.5 bit ", "bits", 4.5),
])
def test_target_size_parses(text, unit, value):
    target = TargetSize.parse(text)
    assert (target.unit, target.value) == (unit, pytest.approx(value))


@pytest.mark.parametrize("text, message", [
    ("lots", "is not a size"), ("-5KB", "is not a size"), ("%", "is not a size"), ("0x", "must be positive"), ("0%", "must be positive"),
    ("12 parsecs", "unknown unit"), ("40bits", "from 1 to 32"),
])
def test_target_size_refuses(text, message):
    with pytest.raises(ValueError, match=message):
        TargetSize.parse(text)


def test_target_size_in_bytes():
    assert TargetSize.parse("0.25x").to_bytes(4000, 1000, 40) == 1000
    assert TargetSize.parse("5bits").to_bytes(4000, 1000, 40) == 625 + 40
    assert TargetSize.parse("1KiB").to_bytes(4000, 1000, 40) == 1024


def test_ladder_and_bytes():
    assert ladder(2) == (2, 4, 8) and ladder(4) == (4, 8) and ladder(5) == (5, 8) and ladder(8) == (8,)
    assert quantized_bytes(9, 4, 3) == 5 + 12 and quantized_bytes(9, 8, 3) == 9 + 12 and quantized_bytes(9, 3, 0) == 5 + 4


def _candidate(name: str, *rungs: tuple[int, int, float]) -> Candidate:
    return Candidate(name, (name,), tuple(Rung(*r) for r in rungs))


def test_greedy_takes_most_noise_removed_per_byte_within_the_budget():
    candidates = [
        _candidate("a", (4, 100, 10.0), (8, 200, 0.0)),  # 0.1 per byte
        _candidate("b", (4, 10, 5.0), (8, 20, 1.0)),  # 0.4 per byte
        _candidate("c", (4, 50, 1.0), (8, 100, 2.0)),  # gets worse: never
        _candidate("d", (2, 10, 9.0), (4, 10, 3.0), (8, 20, 0.0)),  # free first step, then 0.3 per byte
    ]
    assert [(s.tensor, s.after.bits) for s in greedy_raises(candidates)] == [("d", 4), ("b", 8), ("d", 8), ("a", 8)]
    start = 100 + 10 + 50 + 10
    limited = greedy_raises(candidates, budget=start + 25)  # a (100 bytes) no longer fits
    assert [(s.tensor, s.after.bits) for s in limited] == [("d", 4), ("b", 8), ("d", 8)]
    assert greedy_raises(candidates, budget=start) == [greedy_raises(candidates)[0]]


@pytest.fixture
def model():
    return conv_bn_relu_gemm(seed=3, with_bn=False, c=16)


@pytest.fixture
def batches():
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)}]


def test_choose_bits_raises_the_most_sensitive_layer_first(model, batches):
    config = QuantizeConfig(bits=3, first_last_bits=None)
    analysis = SensitivityAnalysis(model, config, batches)
    noise = {n: analysis.layer(t).noise for n, t in (("conv1", "w1"), ("conv2", "w2"), ("fc", "w3"))}
    weights = {"conv1": 3 * 3 * 3 * 16, "conv2": 16 * 16 * 9, "fc": 160}
    scales = {"conv1": 16, "conv2": 16, "fc": 10}
    # Each layer's first step (3 -> 4) is free; the next is 4 -> 8.
    chosen = choose_bits(analysis, TargetSize.parse("4bits"))
    assert {r.after.bits for r in chosen.raises} == {4} and len(chosen.raises) == 3
    by_gain = sorted(NODES, key=lambda n: -(noise[n] - analysis.layer({"conv1": "w1", "conv2": "w2", "fc": "w3"}[n], 4).noise))
    assert [r.nodes[0] for r in chosen.raises] == by_gain
    min_bytes = sum(quantized_bytes(weights[n], 3, scales[n]) for n in NODES)
    assert chosen.min_bytes == min_bytes and chosen.bytes == min_bytes
    assert chosen.max_bytes == sum(quantized_bytes(weights[n], 8, scales[n]) for n in NODES)


def _stored_weight_bytes(model: onnx.ModelProto) -> int:
    """Codes plus scales of the written model's decoded weights (either form: DequantizeLinear, or Cast and Mul), read
    from the file here; every one of the three weights must be among them."""
    decoded = decoded_weights(model)
    assert sorted(w.codes_name for w in decoded) == ["w1_quantized", "w2_quantized", "w3_quantized"]
    total = 0
    for weight in decoded:
        per_byte = 2 if weight.codes_type == onnx.TensorProto.INT4 else 1
        total += (weight.codes.size + per_byte - 1) // per_byte + 4 * weight.scale.size
    return total


@pytest.fixture
def files(model, tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save_model(model, path)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).standard_normal((24, 3, 8, 8)).astype(np.float32))
    return path, data


@pytest.mark.parametrize("extra_bytes", [0, 1500, 3000, 10**6])
def test_target_size_holds_in_the_written_model(files, tmp_path, capsys, extra_bytes):
    path, data = files
    base = ["quantize", str(path), "-b", "4", "--first-last-bits", "4", "--sensitivity-data", str(data)]
    floor = sum(quantized_bytes(n, 4, s) for n, s in ((432, 16), (2304, 16), (160, 10)))
    out = tmp_path / "q.onnx"
    assert main([*base, "-o", str(out), "--target-size", str(floor + extra_bytes)]) == 0
    written = onnx.load(out)
    assert floor <= _stored_weight_bytes(written) <= floor + extra_bytes
    printed = capsys.readouterr().out
    raised = [line for line in printed.splitlines() if line.strip().startswith("raised ")]
    if extra_bytes == 0:
        assert not raised
    if extra_bytes == 10**6:
        assert len(raised) == 3  # everything fits
    for line in raised:
        assert "4 -> 8 bits: model output SQNR with only it quantized" in line


def test_max_drop(files, tmp_path, capsys):
    path, data = files
    base = ["quantize", str(path), "-b", "4", "--first-last-bits", "4", "--sensitivity-data", str(data)]
    assert main([*base, "-o", str(tmp_path / "a.onnx"), "--max-drop", "0"]) == 0
    assert capsys.readouterr().out.count("  raised ") == 3  # only the all-8-bit model has no drop from itself
    assert main([*base, "-o", str(tmp_path / "b.onnx"), "--max-drop", "200"]) == 0
    assert "  raised " not in capsys.readouterr().out


def test_max_drop_with_a_metric(model, batches):
    analysis = SensitivityAnalysis(model, QuantizeConfig(bits=4, first_last_bits=None), batches)
    seen = []

    def metric(candidate: onnx.ModelProto) -> float:
        """1 when conv2's weight is the 8-bit one, else 0."""
        weight = onnx.numpy_helper.to_array(next(t for t in candidate.graph.initializer if t.name == "w2"))
        seen.append(weight)
        return float(np.array_equal(weight, analysis.dequantized("w2", 8)) or np.array_equal(weight, analysis.weights["w2"]))

    chosen = choose_bits(analysis, max_drop=0.5, metric=metric)
    assert chosen.met and chosen.raises[-1].nodes == ("conv2",) and chosen.drop == 0
    assert len(seen) >= 2  # the float model, then one candidate per step until conv2 is raised
    never = choose_bits(analysis, max_drop=0.5, metric=lambda m: 0.0 if m is analysis.model else -1.0)
    assert not never.met and len(never.raises) == 3 and math.isclose(never.drop, 1.0)


@pytest.mark.parametrize("extra, message", [
    (["--target-size=-5KB"], "is not a size"),
    (["--target-size", "lots"], "is not a size"),
    (["--target-size", "100"], "below the smallest possible 1616 bytes"),  # int4 codes 216 + 1152 + 80, scales 4 * (16 + 16 + 10)
    (["--max-drop", "-1"], "--max-drop must be a non-negative number"),
    (["--max-drop", "nan"], "--max-drop must be a non-negative number"),
])
def test_cli_budget_errors(files, tmp_path, capsys, extra, message):
    path, data = files
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(path), "-o", str(out), "-b", "4", "--first-last-bits", "4", "--sensitivity-data", str(data), *extra])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(path) in err, err
    assert not out.exists()


def test_cli_budget_needs_data(files, tmp_path, capsys):
    path, _ = files
    assert main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--target-size", "0.5x"]) == 1
    assert "--target-size needs data to measure sensitivity on" in capsys.readouterr().err


def test_mix_sqnr_predicted_for_a_budget_measured_for_a_drop(model, batches):
    """A size budget alone predicts the mix's SQNR from the chosen layers' noises (no run); --max-drop reports its last,
    measured, score."""
    from onnxq.analysis.sensitivity import energy_sqnr_db

    analysis = SensitivityAnalysis(model, QuantizeConfig(bits=4, first_last_bits=None), batches)
    budget = choose_bits(analysis, TargetSize.parse("6bits"))
    raised = {r.tensor for r in budget.raises}
    noise = sum(analysis.layer(p.tensor, 8 if p.tensor in raised else 4).noise for p in analysis.plans)
    assert raised and not budget.measured and budget.signal == analysis.signal
    assert budget.sqnr_db == pytest.approx(energy_sqnr_db(analysis.signal, noise), rel=1e-12)
    assert "predicted" in budget.lines()[-1]
    drop = choose_bits(analysis, max_drop=1.0)
    assert drop.measured and drop.sqnr_db == analysis.combined(drop.bits).model_sqnr_db
