"""Calibration data in every layout real models take: scalar inputs, recurrent states [2, batch, H], per-run dicts of the
kind onnxruntime's CalibrationDataReader yields, fixed-batch models; through the Python API and the CLI.

Each case is checked against an independent float run: min-max calibration must find exactly the range that
onnxruntime computes for the tensor over all samples, fed the way the model takes them.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import scalar_rate_input, streaming_lstm_in_if
from onnxq.calibrate.samples import InputSpec, input_specs
from onnxq.cli import main
from onnxq.config import ActivationConfig, BiasCorrection, CalibrationMethod, QuantizeConfig
from onnxq.errors import OnnxqError
from onnxq.pipeline import quantize_with_report

MINMAX = QuantizeConfig(
    bits=8, first_last_bits=None, activations=ActivationConfig(method=CalibrationMethod.MINMAX, bias_correction=BiasCorrection.OFF, equalize=False)
)
F32 = np.dtype(np.float32)


@pytest.mark.parametrize(
    ("dims", "names", "axis"),
    [
        ((None, 3, 8, 8), ("N", "", "", ""), 0),
        ((2, None, 128), ("", "batch", ""), 1),  # a recurrent state, its batch named
        ((2, None, 128), ("", "", ""), 1),  # ... or not: axis 0 is fixed at 2, the free axis holds the samples
        ((None, None, 64), ("seq", "batch_size", ""), 1),  # time first: the axis named like a batch wins
        ((None, None), ("", ""), 0),
        ((1, None), ("", "T"), None),  # a batch of one, the free axis a length
        ((), (), None),  # a scalar
        ((4, 3, 8, 8), ("", "", "", ""), None),  # a fixed batch
    ],
)
def test_sample_axis_from_the_declared_dims(dims, names, axis):
    assert InputSpec("x", dims, F32, names).sample_axis == axis


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], name: str) -> np.ndarray:
    """Tensor ``name`` of the float model on ``feeds``, in a plain onnxruntime session (the tensor made an output)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"]).run([name], feeds)[0]


def _expected_params(values: np.ndarray) -> tuple[float, int]:
    """uint8 min-max scale and zero point of ``values``, the range widened to hold 0."""
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    scale = (hi - lo) / 255
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def _params(result, tensor: str) -> tuple[float, int]:
    quant = next(a for a in result.activations if a.tensor == tensor)
    return quant.params.scale, quant.params.zero_point


def _streaming_data(count: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((count, 8)).astype(np.float32), "state": rng.standard_normal((2, count, 16)).astype(np.float32),
            "cond": np.array(True)}


class PerRunReader:
    """onnxruntime's CalibrationDataReader protocol: one dict per run, here one sample each, the state [2, 1, 16]."""

    def __init__(self, data: dict[str, np.ndarray]) -> None:
        self.runs = iter([{"x": data["x"][i : i + 1], "state": data["state"][:, i : i + 1], "cond": data["cond"]} for i in range(len(data["x"]))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.runs, None)


@pytest.mark.parametrize("batch_name", ["batch", ""])
def test_a_streaming_state_keeps_its_samples_on_axis_1(tmp_path, batch_name):
    """[2, batch, 16] states: from an .npz holding all samples (CLI and API) and from a per-run reader, the head's input
    gets the range the float model gives it over all samples."""
    model = streaming_lstm_in_if(batch_name=batch_name)
    data = _streaming_data()
    want = _expected_params(_run(model, data, "h"))
    npz = tmp_path / "cal.npz"
    np.savez(npz, **data)
    from_file = quantize_with_report(model, MINMAX, npz)
    from_reader = quantize_with_report(model, MINMAX, PerRunReader(data))
    assert _params(from_file, "h") == pytest.approx(want, rel=1e-6)
    assert _params(from_reader, "h") == _params(from_file, "h")
    path, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(model, path)
    code = main(["quantize", str(path), "-b", "8", "--calibration", str(npz), "--calibrate", "minmax", "-o", str(out), "-v"])
    assert code == 0 and out.exists()


def test_per_run_dicts_are_fed_as_they_are(tmp_path):
    """Runs of different sizes (1, 3, 5 samples) with their state: nothing is regrouped along axis 0."""
    model = streaming_lstm_in_if()
    data = _streaming_data(9)
    runs = [{"x": data["x"][a:b], "state": data["state"][:, a:b], "cond": data["cond"]} for a, b in ((0, 1), (1, 4), (4, 9))]
    result = quantize_with_report(model, MINMAX, runs)
    assert _params(result, "h") == pytest.approx(_expected_params(_run(model, data, "h")), rel=1e-6)


def test_runs_whose_states_disagree_with_their_inputs_are_refused_naming_both():
    model = streaming_lstm_in_if()
    data = _streaming_data(4)
    bad = [{"x": data["x"][:2], "state": data["state"][:, :3], "cond": data["cond"]}]
    with pytest.raises(OnnxqError, match=r"different numbers of samples.*x 2 \(axis 0\), state 3 \(axis 1\)"):
        quantize_with_report(model, MINMAX, bad)


def test_a_scalar_input_is_fed_to_every_run(tmp_path):
    """A sample-rate scalar stored once in the .npz (it made the file 'hold no samples'), or given in each run's dict."""
    model = scalar_rate_input()
    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    sr = np.array(8000, dtype=np.int64)
    want = _expected_params(_run(model, {"x": x, "sr": sr}, "r"))
    npz = tmp_path / "cal.npz"
    np.savez(npz, x=x, sr=sr)
    assert _params(quantize_with_report(model, MINMAX, npz), "r") == pytest.approx(want, rel=1e-6)
    runs = [{"x": x[i : i + 8], "sr": sr} for i in range(0, 40, 8)]
    assert _params(quantize_with_report(model, MINMAX, runs), "r") == pytest.approx(want, rel=1e-6)


def test_a_scalar_given_per_sample_is_refused_with_what_to_do(tmp_path):
    model = scalar_rate_input()
    npz = tmp_path / "cal.npz"
    np.savez(npz, x=np.zeros((4, 16), np.float32), sr=np.full(4, 8000, np.int64))
    with pytest.raises(OnnxqError, match=r"cal.npz: input 'sr' is a scalar \(sr int64\[\]\): give it as one value"):
        quantize_with_report(model, MINMAX, npz)


def test_verbose_says_where_each_input_keeps_its_samples(tmp_path, capsys):
    model = streaming_lstm_in_if(batch_name="")
    path, npz = tmp_path / "m.onnx", tmp_path / "cal.npz"
    onnx.save(model, path)
    np.savez(npz, **_streaming_data(8))
    assert main(["quantize", str(path), "-b", "8", "--calibration", str(npz), "-o", str(tmp_path / "q.onnx"), "-v"]) == 0
    out = capsys.readouterr().out
    assert "calibration inputs: x along axis 0, state along axis 1, cond the same every run" in out


def test_a_fixed_batch_model_takes_its_batch_several_times_over(tmp_path):
    """A model with batch 2 fixed: 10 samples in the file are 5 runs of 2 (and the range is that of all 10)."""
    model = scalar_rate_input()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    x = np.random.default_rng(1).standard_normal((10, 16)).astype(np.float32)
    assert input_specs(model)[0].sample_axis is None
    npz = tmp_path / "cal.npz"
    np.savez(npz, x=x, sr=np.array(16000, np.int64))
    want = _expected_params(np.concatenate([_run(model, {"x": x[i : i + 2], "sr": np.array(16000)}, "r") for i in range(0, 10, 2)]))
    assert _params(quantize_with_report(model, MINMAX, npz), "r") == pytest.approx(want, rel=1e-6)
