"""Which format would be faster: the written model's timing twins in the other formats, and how the speed line says it."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx
import pytest

from models import conv_bn_relu_gemm
from onnxq.analysis.speed import FormatTime, Speed, build_twins, measure_speed
from onnxq.cli import main
from onnxq.config import ActivationConfig, CalibrationMethod, QuantizeConfig, WeightFormat
from onnxq.pipeline import quantize


def _samples(n: int = 24) -> np.ndarray:
    return np.random.default_rng(11).random((n, 3, 8, 8), dtype=np.float32)


def _structure(model: onnx.ModelProto) -> tuple[collections.Counter, collections.Counter]:
    """What decides a model's speed: its ops (type and domain) and its initializers' types and shapes."""
    ops = collections.Counter((node.op_type, node.domain) for node in model.graph.node)
    tensors = collections.Counter((t.data_type, tuple(t.dims)) for t in model.graph.initializer)
    return ops, tensors


def test_the_line_names_a_twin_only_when_it_is_clearly_faster():
    """Ratios are float's time over each model's; a twin is called faster from FASTER (1.1) times the written ratio."""
    clear = Speed(2.0, 4.0, 8, integer_ops=False, others=(FormatTime(WeightFormat.INT, 1.0), FormatTime(WeightFormat.POST, 3.0)))
    line = clear.line()
    assert "--format int 2.00x, --format post 0.67x" in line
    assert "--format int would run faster" in line
    assert "may be faster" not in line  # measured, not guessed
    assert line.startswith("speed: 0.50x the float model's")

    close = Speed(2.0, 2.0, 8, integer_ops=False, others=(FormatTime(WeightFormat.INT, 2.0 / 1.05),))
    assert close.faster is None and "(none of them faster)" in close.line()
    clear_enough = Speed(2.0, 2.0, 8, integer_ops=False, others=(FormatTime(WeightFormat.INT, 2.0 / 1.2),))
    assert clear_enough.faster == FormatTime(WeightFormat.INT, 2.0 / 1.2)

    alone = Speed(2.0, 4.0, 8, integer_ops=False)  # no twins: the old hint stays
    assert "may be faster" in alone.line() and "other formats" not in alone.line()


@pytest.mark.parametrize("activations", [None, ActivationConfig(), ActivationConfig(method=CalibrationMethod.ASQ)],
                         ids=["weights", "w4a8", "asq"])
def test_a_twin_has_the_ops_and_tensors_of_the_model_that_format_writes(tmp_path, activations):
    """Built from one batch with full-range weights, a twin still has the graph a real run in its format writes."""
    path = tmp_path / "m.onnx"
    model = conv_bn_relu_gemm()
    onnx.save(model, path)
    config = QuantizeConfig(bits=4, activations=activations)
    data = [{"x": _samples()}] if activations is not None else None
    batch = {"x": _samples(8)}
    twins = build_twins(path, config, batch, 8, tmp_path)
    assert set(twins) == {WeightFormat.INT, WeightFormat.POST}
    for fmt, twin in twins.items():
        real = quantize(path, dataclasses.replace(config, format=fmt), data)
        assert _structure(onnx.load(twin)) == _structure(real), fmt


def test_the_twins_are_timed_beside_the_written_model(tmp_path):
    """Every twin gets a time, in the order given, and the written model's own time is still the second file's."""
    path, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(conv_bn_relu_gemm(), path)
    onnx.save(quantize(path, QuantizeConfig(bits=4)), out)
    batch = {"x": _samples(8)}
    twins = build_twins(path, QuantizeConfig(bits=4), batch, 8, tmp_path)
    speed = measure_speed(path, out, batch, 8, twins)
    assert [other.format for other in speed.others] == list(twins)
    assert all(other.ms > 0 for other in speed.others) and speed.quantized_ms > 0


def test_no_twins_for_a_model_over_the_limit(tmp_path, monkeypatch):
    import onnxq.analysis.speed as speed

    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_gemm(), path)
    monkeypatch.setattr(speed, "COMPARE_BYTES", path.stat().st_size - 1)
    assert build_twins(path, QuantizeConfig(bits=4), {"x": _samples(8)}, 8, tmp_path) == {}
    assert list(tmp_path.iterdir()) == [path]  # nothing built


def test_post_is_no_twin_at_eight_bits(tmp_path):
    """POST takes 2-4 bits: at -b 8 its twin would be the qdq model, so only int is built."""
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_gemm(), path)
    twins = build_twins(path, QuantizeConfig(bits=8), {"x": _samples(8)}, 8, tmp_path)
    assert set(twins) == {WeightFormat.INT}


def test_the_cli_prints_the_twins_unless_told_not_to(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_gemm(), path)
    for extra, shown in (([], True), (["--no-format-speeds"], False)):
        assert main(["quantize", str(path), "-b", "4", "-o", str(tmp_path / "q.onnx"), *extra]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("speed:")]
        assert len(lines) == 1
        assert ("--format int" in lines[0] and "--format post" in lines[0]) == shown, lines[0]
