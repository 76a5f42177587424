"""Activation quantization on the models we ship: 512 train images calibrate, the full test split judges (marker: slow)."""

from __future__ import annotations

import collections

import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS

from onnxq import QuantizeConfig, quantize
from onnxq.analysis.datasets import FASHION_MNIST_DIR, load_idx_split
from onnxq.analysis.evaluate import accuracy
from onnxq.config import ActivationConfig, CalibrationMethod

pytestmark = pytest.mark.slow

SHIPPED = {"resnet20": MODELS / "fmnist_resnet20.onnx", "mobilenetv2": MODELS / "fmnist_mobilenetv2.onnx", "vit": MODELS / "fmnist_vit.onnx"}
CALIBRATION_SAMPLES = 512


@pytest.fixture(scope="module")
def splits():
    assert FASHION_MNIST_DIR.is_dir(), "install Debian's dataset-fashion-mnist (the README's test command does)"
    train = load_idx_split(FASHION_MNIST_DIR, "train")
    return train.images[:CALIBRATION_SAMPLES], load_idx_split(FASHION_MNIST_DIR, "test")


@pytest.fixture(scope="module")
def float_top1(splits):
    return {name: accuracy(path, splits[1]).top1 for name, path in SHIPPED.items()}


@pytest.mark.parametrize("name", list(SHIPPED))
@pytest.mark.parametrize("weight_bits, max_drop_pp", [(8, 0.2), (4, 1.0)])
def test_activations_at_8_bits_keep_accuracy(splits, float_top1, name, weight_bits, max_drop_pp):
    calibration, test = splits
    config = QuantizeConfig(bits=weight_bits, activations=ActivationConfig(bits=8, method=CalibrationMethod.MSE))
    q = quantize(SHIPPED[name], config, [{"input": calibration[i : i + 64]} for i in range(0, len(calibration), 64)])
    top1 = accuracy(q.SerializeToString(), test).top1
    assert float_top1[name] - top1 <= max_drop_pp / 100, (name, float_top1[name], top1)


def _top1_w4a4(splits, method: CalibrationMethod, equalize: bool = True) -> float:
    calibration, test = splits
    config = QuantizeConfig(bits=4, activations=ActivationConfig(bits=4, method=method, equalize=equalize))
    q = quantize(SHIPPED["vit"], config, [{"input": calibration[i : i + 32]} for i in range(0, len(calibration), 32)])
    return accuracy(q.SerializeToString(), test).top1


def test_asq_beats_the_fixed_mse_range_on_the_transformer_at_w4a4(splits):
    """LayerNorm outputs carry outlier channels: ASQ's per-channel steps win back most of what one fixed step per
    tensor loses (measured at f1faaa1: mse without equalization 84.70, asq 86.31 against 86.80 float)."""
    assert _top1_w4a4(splits, CalibrationMethod.ASQ) - _top1_w4a4(splits, CalibrationMethod.MSE, equalize=False) >= 0.005


def test_equalization_wins_back_most_of_that_with_fixed_steps(splits):
    """Equalizing the outlier channels against the weights does the same for the fixed MSE range (a one-off run at
    f1faaa1: 84.70 -> 86.16, ASQ 86.31; with the weights also chosen on the data, tools/eval_activations.py gives mse
    86.04, ASQ 86.10)."""
    assert _top1_w4a4(splits, CalibrationMethod.MSE) - _top1_w4a4(splits, CalibrationMethod.MSE, equalize=False) >= 0.005


def test_w8a8_resnet_runs_on_integer_kernels_only(splits, tmp_path):
    config = QuantizeConfig(bits=8, activations=ActivationConfig(bits=8))
    q = quantize(SHIPPED["resnet20"], config, [{"input": splits[0][:128]}])
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(q.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == 21 and ops["QGemm"] == 1 and ops["QLinearAdd"] == 9, ops
    assert ops["Conv"] == ops["Gemm"] == ops["Add"] == 0, ops
