"""End to end on the models we ship, with the real Fashion-MNIST test split (marker: slow)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import CAST_FORM, MODELS, decoded_weight_counts

from onnxq import Granularity, QuantizeConfig, SqrtMode, quantize, save_model
from onnxq.analysis.datasets import FASHION_MNIST_DIR, load_idx_split
from onnxq.analysis.evaluate import accuracy
from onnxq.model.graph import constant_initializers, to_array
from onnxq.model.load import load
from onnxq.model.prepare import prepare
from onnxq.numerics import uniform
from onnxq.numerics.weights import to_rows
from onnxq.plan.weights import find_weight_uses

pytestmark = pytest.mark.slow

RESNET = MODELS / "fmnist_resnet20.onnx"
MOBILENET = MODELS / "fmnist_mobilenetv2.onnx"
VIT = MODELS / "fmnist_vit.onnx"


@pytest.fixture(scope="module")
def test_split():
    assert FASHION_MNIST_DIR.is_dir(), "install Debian's dataset-fashion-mnist (the README's test command does)"
    return load_idx_split(FASHION_MNIST_DIR, "test")


@pytest.fixture(scope="module")
def resnet_float_top1(test_split):
    return accuracy(RESNET, test_split).top1


@pytest.mark.parametrize("bits, max_drop_pp", [(8, 0.1), (4, 0.5)])
def test_resnet20_accuracy_drop(test_split, resnet_float_top1, bits, max_drop_pp, tmp_path):
    out = save_model(quantize(RESNET, QuantizeConfig(bits=bits)), tmp_path / f"r.q{bits}.onnx")
    top1 = accuracy(out, test_split).top1
    assert resnet_float_top1 - top1 <= max_drop_pp / 100, (resnet_float_top1, top1)


def test_resnet20_w4_file_is_small(tmp_path):
    out = save_model(quantize(RESNET, QuantizeConfig(bits=4)), tmp_path / "r.q4.onnx")
    assert out.stat().st_size <= 0.2 * RESNET.stat().st_size


def test_mobilenet_quantizes_and_stays_usable(test_split, tmp_path):
    base = accuracy(MOBILENET, test_split).top1
    out = save_model(quantize(MOBILENET, QuantizeConfig(bits=8)), tmp_path / "m.q8.onnx")
    assert base - accuracy(out, test_split).top1 <= 0.005


@pytest.mark.parametrize("bits, max_drop_pp", [(8, 0.1), (4, 0.6)])
def test_vit_weights_keep_accuracy(test_split, bits, max_drop_pp):
    """The transformer's 24 weight MatMuls sit behind Transpose nodes (TorchScript export): they must be quantized."""
    base = accuracy(VIT, test_split).top1
    q = quantize(VIT, QuantizeConfig(bits=bits))
    # 24 MatMuls, the patch Conv, the classifier, all decoded at load: no weight reaches AUTO's 2^20 values for MatMulNBits
    assert decoded_weight_counts(q) == {CAST_FORM: 26}
    assert sum(n.op_type == "MatMulNBits" for n in q.graph.node) == 0
    assert base - accuracy(q.SerializeToString(), test_split).top1 <= max_drop_pp / 100


def _exact_mse(rows: np.ndarray, alpha: float, bits: int, sqrt: bool) -> float:
    """Quantize-dequantize written out here, independent of onnxq's formats module."""
    q = 2 ** (bits - 1) - 1
    x = np.sign(rows) * np.sqrt(np.abs(rows)) if sqrt else rows
    step = alpha * np.abs(x).max() / q
    y = np.clip(np.round(x / step), -q, q) * step
    y = y * np.abs(y) if sqrt else y
    return float(np.mean((rows.astype(np.float64) - y) ** 2))


@pytest.mark.parametrize("sqrt", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_alpha_matches_dense_scan_on_real_layers(bits, sqrt):
    # Per-tensor alpha of every layer of the shipped ResNet-20 (BN folded), against 2,000 alphas.
    model = prepare(load(RESNET).model)
    ratios = []
    scan = np.linspace(1 / 2000, 1.0, 2000)
    consts = constant_initializers(model.graph)
    for name in find_weight_uses(model.graph)[0]:
        w = to_array(consts[name])
        rows = to_rows(w, None)
        found = uniform.quantize_best(rows, bits, sqrt).alpha[0]
        best = min(_exact_mse(rows, a, bits, sqrt) for a in scan)
        ratios.append(_exact_mse(rows, found, bits, sqrt) / best)
    assert len(ratios) == 22
    assert np.median(ratios) <= 1.01, sorted(ratios)


def test_per_channel_beats_per_tensor_at_4_bits(test_split, tmp_path):
    per_channel = accuracy(quantize(RESNET, QuantizeConfig(bits=4, first_last_bits=4)).SerializeToString(), test_split).top1
    per_tensor = quantize(RESNET, QuantizeConfig(bits=4, first_last_bits=4, granularity=Granularity.TENSOR, sqrt=SqrtMode.OFF))
    assert per_channel >= accuracy(per_tensor.SerializeToString(), test_split).top1


def test_shipped_models_have_batchnorm_to_fold():
    for path in (RESNET, MOBILENET):
        ops = {n.op_type for n in onnx.load(path).graph.node}
        assert "BatchNormalization" in ops and "Conv" in ops


def _as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every initializer moved into a Constant node, as some exporters write it."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants = [onnx.helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in out.graph.initializer]
    nodes = constants + list(out.graph.node)
    del out.graph.initializer[:]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def test_cli_on_constant_node_and_external_data_variants(tmp_path, capsys):
    from conftest import run

    from onnxq.cli import main

    original = onnx.load(RESNET)
    const_path = tmp_path / "const.onnx"
    onnx.save_model(_as_constant_nodes(original), const_path)
    ext_path = tmp_path / "ext.onnx"
    onnx.save_model(original, ext_path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    outputs = {}
    for name, path in (("plain", RESNET), ("const", const_path), ("ext", ext_path)):
        out = tmp_path / f"{name}.q4.onnx"
        assert main(["quantize", str(path), "-b", "4", "-o", str(out)]) == 0
        outputs[name] = out
    assert "quantized 22 weight tensors" in capsys.readouterr().out
    assert (tmp_path / "ext.q4.onnx.data").exists() and not (tmp_path / "plain.q4.onnx.data").exists()
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    results = {name: run(path, {"input": x}) for name, path in outputs.items()}
    np.testing.assert_array_equal(results["const"], results["plain"])
    np.testing.assert_array_equal(results["ext"], results["plain"])


@pytest.mark.parametrize("fmt", ["post", "int"])
def test_resnet20_custom_op_formats_lose_at_most_1pp(test_split, resnet_float_top1, fmt):
    from onnxq import WeightFormat

    model = quantize(RESNET, QuantizeConfig(bits=4, format=WeightFormat(fmt)))
    assert sum(n.domain == "ai.onnxq" for n in model.graph.node) == 21  # 19 convs at 4 bits, the first at 8
    top1 = accuracy(model.SerializeToString(), test_split).top1
    assert resnet_float_top1 - top1 <= 0.01, (resnet_float_top1, top1)
