"""A transformer encoder block (tests/models.py: LayerNorm, attention of two activations, GELU, residuals) in every format.

The weights are random, so these are checks of the rewrite, not of accuracy: each quantized model runs at any
batch size, puts each MatMul where it belongs (weights quantized, the attention products left float, the large
FFN MatMuls as onnxq ops) and stays within a relative error of the float block that a broken scale or layout
would exceed many times over.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import CAST_FORM, decoded_weights, weight_of

from models import transformer_block
from onnxq.config import ActivationConfig, CalibrationMethod, NBitsMode, QuantizeConfig, WeightFormat
from onnxq.native.session import session_options
from onnxq.pipeline import QuantizationResult, quantize_with_report
from onnxq.report.files import build_report, to_markdown
from onnxq.report.summary import summary

TOKENS, WIDTH = 8, 64


def _tokens(samples: int, seed: int) -> np.ndarray:
    """Token batches whose scale varies 4-fold between samples."""
    rng = np.random.default_rng(seed)
    gains = np.geomspace(0.5, 2.0, samples).astype(np.float32)
    return rng.standard_normal((samples, TOKENS, WIDTH)).astype(np.float32) * gains[:, None, None]


CALIBRATION = [{"x": batch} for batch in np.split(_tokens(64, 1), 4)]
X = _tokens(12, 2)


@pytest.fixture(scope="module")
def block() -> onnx.ModelProto:
    return transformer_block()


@pytest.fixture(scope="module")
def reference(block) -> np.ndarray:
    return ort.InferenceSession(block.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]


def _session(model: onnx.ModelProto, optimized: Path | None = None) -> ort.InferenceSession:
    options = session_options(threads=1, custom_ops=True)
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _quantize(block: onnx.ModelProto, config: QuantizeConfig) -> QuantizationResult:
    return quantize_with_report(block, config, CALIBRATION if config.activations else None)


def _relative_error(y: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(y - reference) / np.linalg.norm(reference))


W4A8 = ActivationConfig(bits=8)
SETTINGS = {
    # name: (config, bound on the relative error; measured when written: 0.013, 0.12, 0.12, 0.12, 0.04, 0.13, 0.16, 0.18, 0.15)
    "W8": (QuantizeConfig(bits=8), 0.03),
    "W4": (QuantizeConfig(bits=4), 0.2),
    "W4 int": (QuantizeConfig(bits=4, format=WeightFormat.INT), 0.2),
    "W4 post": (QuantizeConfig(bits=4, format=WeightFormat.POST), 0.2),
    "W8A8": (QuantizeConfig(bits=8, activations=ActivationConfig(bits=8)), 0.08),
    "W4A8 int": (QuantizeConfig(bits=4, format=WeightFormat.INT, activations=W4A8), 0.25),
    "W4A4": (QuantizeConfig(bits=4, activations=ActivationConfig(bits=4)), 0.3),
    "W4A4 asq": (QuantizeConfig(bits=4, activations=ActivationConfig(bits=4, method=CalibrationMethod.ASQ)), 0.3),
    "W4A8 post asq": (QuantizeConfig(bits=4, format=WeightFormat.POST, activations=ActivationConfig(bits=8, method=CalibrationMethod.ASQ)), 0.3),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_format_runs_the_block_close_to_float_at_any_batch(block, reference, name):
    config, bound = SETTINGS[name]
    result = _quantize(block, config)
    session = _session(result.model)
    (y,) = session.run(None, {"x": X})
    assert _relative_error(y, reference) < bound
    for n in (1, 3):
        assert session.run(None, {"x": X[:n]})[0].shape == (n, TOKENS, WIDTH)
    # every weighted MatMul is quantized, the Constant-node weight (o_proj) included; the two attention products are not
    assert {node for layer in result.layers for node in layer.nodes} == {"q_proj", "k_proj", "v_proj", "o_proj", "ffn1", "ffn2"}
    left = {s.node: s.reason for s in result.skipped}
    assert {"scores", "context"} <= set(left) and all("two activations" in left[n] for n in ("scores", "context"))


@pytest.mark.parametrize("nbits", [NBitsMode.AUTO, NBitsMode.ON], ids=lambda mode: mode.value)
@pytest.mark.parametrize(("fmt", "op"), [(WeightFormat.INT, "IntConv"), (WeightFormat.POST, "PostConv")])
def test_op_formats_run_the_large_ffn_matmul_as_an_op_and_small_ones_outside(block, fmt, op, nbits, tmp_path):
    """ffn1 (4-bit, 2^17 weights) runs as the format's op, ffn2 (last layer, 8-bit) as an 8-bit IntConv; the 64 x 64
    projections are under 2^17 weights (the op is no faster than float there): q/k/v are first layers (8 bits), o_proj
    is 4-bit. By default (far under 2^20 values) they are decoded at load; with --matmul-nbits on they run as
    onnxruntime's MatMulNBits. The report and the summary say how o_proj runs and why it is not the op."""
    result = _quantize(block, QuantizeConfig(bits=4, format=fmt, matmul_nbits=nbits))
    by_node = {layer.nodes[0]: layer for layer in result.layers}
    outside = "MatMulNBits" if nbits is NBitsMode.ON else "DequantizeLinear"
    assert by_node["ffn1"].op == op and by_node["ffn2"].op == "IntConv"
    assert all(by_node[node].op == outside and by_node[node].bits == 8 for node in ("q_proj", "k_proj", "v_proj"))
    assert by_node["o_proj"].op == outside and by_node["o_proj"].bits == 4 and "under 131072 weights" in by_node["o_proj"].qdq_reason
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert ops["DequantizeLinear"] == 0
    if nbits is NBitsMode.ON:
        assert ops["MatMul"] == 2 and ops["MatMulNBits"] == 4 and not decoded_weights(result.model)  # the 2 attention products stay float
    else:
        assert ops["MatMul"] == 6 and ops["MatMulNBits"] == 0  # 4 projections + the 2 attention products
        assert {node: weight_of(result.model, node).form for node in ("q_proj", "k_proj", "v_proj", "o_proj")} == dict.fromkeys(
            ("q_proj", "k_proj", "v_proj", "o_proj"), CAST_FORM)
    path = tmp_path / "q.onnx"
    onnx.save_model(result.model, path)
    markdown = to_markdown(build_report(result, QuantizeConfig(bits=4, format=fmt, matmul_nbits=nbits), path)).splitlines()
    section = markdown[markdown.index("## Not run by onnxq's ops"):]
    assert section[2] == "| nodes | runs as | reason |" and section[4].startswith(f"| o_proj | {outside} | 64x64 weight is under 131072 weights")
    shown = "onnxruntime's MatMulNBits" if nbits is NBitsMode.ON else "decoded at load"  # weight-only
    assert f"not run by onnxq's ops: 1 layers (o_proj ({shown}): 64x64 weight is under 131072 weights" in summary(result, None, path)


def test_w8a8_block_runs_its_weight_matmuls_as_integer_kernels(block, tmp_path):
    """onnxruntime fuses each quantized weight MatMul with its activation pairs into QLinearMatMul."""
    result = _quantize(block, SETTINGS["W8A8"][0])
    _session(result.model, tmp_path / "optimized.onnx")
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert ops["QLinearMatMul"] == 6
