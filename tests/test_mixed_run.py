"""Mixed precision with one calibration pass (onnxq/analysis/mixed_run.py, onnxq/pipeline.py's start_run/finish_run)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from test_proxy_sensitivity import _pointwise_depthwise_pointwise

from onnxq.analysis.proxy import ProxySensitivity
from onnxq.config import QuantizeConfig
from onnxq.pipeline import finish_run, quantize_with_report, start_run


def _data(seed: int = 4) -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(seed).standard_normal((32, 4, 6, 6)).astype(np.float32)}]


@pytest.mark.parametrize(("before", "after"), [({}, {"pw1": 8}), ({"dw": 4}, {}), ({"dw": 4}, {"dw": 4, "pw2": 8})])
def test_a_run_finished_at_other_widths_writes_what_a_run_planned_so_writes(before, after):
    """Planned again after its pass, a run writes the very bytes a run planned with those widths from the start writes.

    ``{"dw": 4}`` then ``{}``: the depthwise layer, 4-bit with H at first, is 8-bit by its rule at the end, which the
    quantizer rounds without H (the sums the pass made for it must be let go, or its codes differ).
    """
    model, config = _pointwise_depthwise_pointwise(), QuantizeConfig(bits=4, first_last_bits=None)
    run = start_run(model, dataclasses.replace(config, tensor_bits=before), _data())
    finished = finish_run(run, after).model
    fresh = quantize_with_report(model, dataclasses.replace(config, tensor_bits=after), _data()).model
    assert finished.SerializeToString() == fresh.SerializeToString()
    assert {layer.tensor: layer.bits for layer in quantize_with_report(model, dataclasses.replace(config, tensor_bits=after), _data()).layers} \
        == {"pw1": after.get("pw1", 4), "dw": after.get("dw", 8), "pw2": after.get("pw2", 4)}


def test_a_run_with_activations_is_not_planned_again():
    model = _pointwise_depthwise_pointwise()
    from onnxq.config import ActivationConfig

    run = start_run(model, QuantizeConfig(bits=4, first_last_bits=None, activations=ActivationConfig(samples=32)), _data())
    with pytest.raises(ValueError, match="planned again"):
        finish_run(run, {"pw1": 8})


def _cli(tmp_path, *extra: str) -> tuple[int, str]:
    from onnxq.cli import main

    path, data = tmp_path / "m.onnx", tmp_path / "x.npy"
    onnx.save(_pointwise_depthwise_pointwise(), path)
    np.save(data, _data()[0]["x"])
    code = main(["quantize", str(path), "-b", "4", "--first-last-bits", "4", "--calibration", str(data), "--activations", "none",
                 "--target-size", "0.5x", "-o", str(tmp_path / "q.onnx"), *extra])
    return code, str(tmp_path / "q.onnx")


def test_cli_mixed_precision_sums_h_once(tmp_path, monkeypatch):
    """The proxy takes the quantizer's H: its own moments pass never runs. With --sensitivity-data it does (other data)."""
    passes: list[int] = []
    original = ProxySensitivity._moments
    monkeypatch.setattr(ProxySensitivity, "_moments", lambda self, client: (passes.append(1), original(self, client))[1])
    code, out = _cli(tmp_path)
    assert code == 0 and passes == []
    onnx.checker.check_model(onnx.load(out))
    np.save(tmp_path / "s.npy", _data(seed=5)[0]["x"])
    assert _cli(tmp_path, "--sensitivity-data", str(tmp_path / "s.npy"))[0] == 0
    assert passes == [1]


def test_the_analysis_leaves_the_run_it_shares_as_it_was():
    """quantize_mixed (the proxy on the run's model and H) writes what a fresh run at the chosen widths writes."""
    from onnxq.analysis.mixed_precision import TargetSize
    from onnxq.analysis.mixed_run import quantize_mixed

    model, config = _pointwise_depthwise_pointwise(), QuantizeConfig(bits=4, first_last_bits=None)
    result, chosen = quantize_mixed(model, config, _data(), TargetSize.parse("0.5x"))
    assert chosen.tensor_bits  # something was raised: the run was planned again
    fresh = quantize_with_report(model, dataclasses.replace(config, tensor_bits=chosen.tensor_bits), _data()).model
    assert result.model.SerializeToString() == fresh.SerializeToString()


def test_the_proxy_measures_on_the_pass_first_runs_against_its_outputs(monkeypatch):
    """Shared, the proxy makes no float run: its runs and reference are the pass's first samples and outputs, which equal a
    float run of its own (onnxruntime, another session) on those samples."""
    from onnxq.analysis.mixed_run import proxy_analysis
    from onnxq.analysis.sensitivity import Probe

    runs = [{"x": np.random.default_rng(seed).standard_normal((8, 4, 6, 6)).astype(np.float32)} for seed in range(12)]  # 96 samples
    float_runs: list[int] = []
    original = Probe._outputs
    monkeypatch.setattr(Probe, "_outputs", lambda self, session: (float_runs.append(1), original(self, session))[1])
    config = QuantizeConfig(bits=4, first_last_bits=None)
    shared, run = proxy_analysis(_pointwise_depthwise_pointwise(), config, runs, samples=64)
    assert float_runs == [] and run is not None and shared.samples == 64
    assert [b["x"] is r["x"] for b, r in zip(shared.probe.batches, runs[:8], strict=True)] == [True] * 8
    own = ProxySensitivity(_pointwise_depthwise_pointwise(), config, runs, samples=64)
    assert float_runs == [1]
    for kept, fresh in zip(shared.probe.reference, own.probe.reference, strict=True):
        np.testing.assert_allclose(kept["y"], fresh["y"], rtol=1e-5, atol=1e-6)


def test_first_outputs_stop_at_the_first_run_past_the_count():
    from onnxq.calibrate.collect import FirstOutputs

    first = FirstOutputs(["y"], samples=10)
    for size in (4, 4, 4, 1):
        first.offer({"x": np.zeros(size)}, {"y": np.ones(size), "other": np.zeros(1)}, size)
    assert first.kept == 8 and len(first.runs) == len(first.outputs) == 2 and first.full
    assert set(first.outputs[0]) == {"y"}


def test_a_pass_shorter_than_the_sensitivity_samples_leaves_the_proxy_its_own_float_run(monkeypatch):
    """With 32 calibration samples and 64 sensitivity samples the pass cannot give the proxy its runs: it runs its own."""
    from onnxq.analysis.mixed_run import proxy_analysis
    from onnxq.analysis.sensitivity import Probe

    runs = [{"x": np.random.default_rng(seed).standard_normal((8, 4, 6, 6)).astype(np.float32)} for seed in range(12)]
    float_runs: list[int] = []
    original = Probe._outputs
    monkeypatch.setattr(Probe, "_outputs", lambda self, session: (float_runs.append(1), original(self, session))[1])
    analysis, _ = proxy_analysis(_pointwise_depthwise_pointwise(), QuantizeConfig(bits=4, first_last_bits=None, samples=32), runs, samples=64)
    assert float_runs == [1] and analysis.samples == 64
