"""Weight-only quantization with data: the weights chosen for their layers' outputs (second moments of the inputs,
compensated rounding), through the Python API and the CLI (--activations none), judged on held-out inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import decoded_weights

from models import conv_bn_relu_gemm, depthwise_convtranspose, transformer_block
from onnxq.cli import main
from onnxq.config import QuantizeConfig
from onnxq.pipeline import quantize, quantize_with_report


def _inputs(model: onnx.ModelProto, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Correlated inputs (smooth images or token rows), ``count`` samples in runs of 8."""
    rng = np.random.default_rng(seed)
    value = model.graph.input[0]
    dims = [d.dim_value if d.dim_value else 8 for d in value.type.tensor_type.shape.dim]
    runs = []
    for _ in range(count // 8):
        x = rng.standard_normal(dims).astype(np.float32)
        x = (x + np.roll(x, 1, axis=-1) + np.roll(x, 1, axis=-2)) / 3  # neighbouring features correlate, as in real data
        runs.append({value.name: x.astype(np.float32)})
    return runs


def _sqnr(reference: onnx.ModelProto, quantized: onnx.ModelProto, runs: list[dict[str, np.ndarray]]) -> float:
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (reference, quantized)]
    ref = np.concatenate([sessions[0].run(None, r)[0] for r in runs]).astype(np.float64)
    out = np.concatenate([sessions[1].run(None, r)[0] for r in runs]).astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2)))


@pytest.mark.parametrize("build", [conv_bn_relu_gemm, depthwise_convtranspose, transformer_block])
@pytest.mark.parametrize("bits", [3, 4])
def test_data_makes_the_held_out_output_closer(build, bits):
    """Calibrated on one set of inputs, judged on another: never worse, and better by 1 dB (0.5 on the random-weight
    transformer block, whose error is mostly its activations' spread, not the weights')."""
    model = build()
    config = QuantizeConfig(bits=bits, first_last_bits=None)
    blind = _sqnr(model, quantize(model, config), _inputs(model, 64, seed=2))
    informed = _sqnr(model, quantize(model, config, _inputs(model, 64, seed=1)), _inputs(model, 64, seed=2))
    assert informed >= blind - 0.1, (blind, informed)
    if build is not depthwise_convtranspose:  # (its ConvTranspose keeps the weight-error codes: no H for it)
        assert informed >= blind + (0.5 if build is transformer_block else 1.0), (blind, informed)


def test_output_aware_off_gives_the_data_free_model():
    model = conv_bn_relu_gemm()
    data = _inputs(model, 16, seed=1)
    off = quantize(model, QuantizeConfig(bits=4, output_aware=False), data)
    # a run with data rounds to nearest where it chooses no codes for the output (balanced rounding is for runs without)
    assert off.SerializeToString() == quantize(model, QuantizeConfig(bits=4, balanced_rounding=False)).SerializeToString()


def _codes(model: onnx.ModelProto) -> dict[str, bytes]:
    """Each decoded weight's codes and scale, as bytes, by the codes' name."""
    return {w.codes_name: w.codes.tobytes() + w.scale.tobytes() for w in decoded_weights(model)}


def test_depthwise_layers_the_rule_keeps_at_8_bits_keep_the_data_free_codes():
    """With data, the depthwise layer at 8 bits by the depthwise rule is quantized as without data; at 4 bits it is not,
    and neither are the 8-bit first/last layers."""
    model = depthwise_convtranspose()
    data = _inputs(model, 16, seed=1)
    for depthwise_bits, same in ((8, True), (None, False)):
        config = QuantizeConfig(bits=4, first_last_bits=None, depthwise_bits=depthwise_bits)
        blind, informed = _codes(quantize(model, config)), _codes(quantize(model, config, data))
        (dw,) = [name for name in blind if name.startswith("dw")]
        assert (blind[dw] == informed[dw]) is same, depthwise_bits
    model = conv_bn_relu_gemm()
    blind, informed = _codes(quantize(model, QuantizeConfig(bits=4))), _codes(quantize(model, QuantizeConfig(bits=4), _inputs(model, 16, seed=1)))
    assert len(blind) == 3 and all(blind[name] != informed[name] for name in blind)  # conv1 and fc at 8 bits (first/last), conv2 at 4


def test_weight_only_with_data_quantizes_no_activation():
    model = conv_bn_relu_gemm()
    result = quantize_with_report(model, QuantizeConfig(bits=4), _inputs(model, 16, seed=1))
    assert result.activations == [] and result.calibration is None
    assert not any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)


def test_cli_activations_none(tmp_path, capsys):
    model = conv_bn_relu_gemm()
    path, data = tmp_path / "m.onnx", tmp_path / "cal.npy"
    onnx.save(model, path)
    np.save(data, np.concatenate([r["x"] for r in _inputs(model, 32, seed=1)]))
    assert main(["quantize", str(path), "-b", "4", "--calibration", str(data), "--activations", "none"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "m.q4.onnx" in out and "activation tensors" not in out
    assert main(["quantize", str(path), "-b", "4", "--calibration", str(data), "--activations", "none", "--calibrate", "asq"]) == 1
    assert "--calibrate is about quantized activations, and --activations none keeps them float" in capsys.readouterr().err
