"""Measure what per-layer sensitivity buys on the shipped models: the numbers in the README's mixed-precision section.

For each model: float, uniform W4, W4 with only the most sensitive layer at 8 bits (and, for
comparison, with the least sensitive one at 8 bits), and ``--target-size`` at an average of
5 bits, each as Fashion-MNIST test accuracy. Sensitivity is measured on training images.

    python -m tools.eval_mixed_precision [--limit N] [--samples N]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from onnxq.analysis.datasets import FASHION_MNIST_DIR, load_labelled
from onnxq.analysis.evaluate import accuracy
from onnxq.analysis.mixed_precision import TargetSize, choose_bits
from onnxq.analysis.sensitivity import SENSITIVITY_SAMPLES, SensitivityAnalysis, most_sensitive
from onnxq.config import QuantizeConfig
from onnxq.pipeline import quantize_with_report

MODELS = ("models/fmnist_resnet20.onnx", "models/fmnist_mobilenetv2.onnx")


def _acc(model, test) -> float:
    return accuracy(model.SerializeToString(), test).top1 * 100


def evaluate(path: str, test, train, samples: int, target: str) -> None:
    """Print one model's accuracies."""
    config = QuantizeConfig(bits=4)
    started = time.perf_counter()
    analysis = SensitivityAnalysis(path, config, [{"input": train.images[:samples]}], samples)
    layers = analysis.layers()
    seconds = time.perf_counter() - started
    worst = most_sensitive(layers)
    best = max(layers, key=lambda s: s.model_sqnr_db)
    w4 = quantize_with_report(path, config).model
    print(f"{path}: {len(layers)} layers, sensitivity in {seconds:.1f} s on {samples} samples")
    print(f"  most sensitive: {', '.join(worst.nodes)} ({worst.model_sqnr_db:.1f} dB); least: {', '.join(best.nodes)} ({best.model_sqnr_db:.1f} dB)")
    float_acc = accuracy(path, test).top1 * 100
    rows = [("float", float_acc), ("W4 (first/last 8)", _acc(w4, test))]
    for label, layer in (("most", worst), ("least", best)):
        raised = dataclasses.replace(config, node_bits=dict.fromkeys(layer.nodes, 8))
        rows.append((f"W4 + {label} sensitive at 8", _acc(quantize_with_report(path, raised).model, test)))
    mixed = choose_bits(analysis, TargetSize.parse(target))
    for line in mixed.lines():
        print("  " + line)
    result = quantize_with_report(path, dataclasses.replace(config, tensor_bits=mixed.tensor_bits))
    size = sum(layer.quantized_bytes for layer in result.layers)
    weights = sum(layer.float_bytes for layer in result.layers) // 4
    codes = sum(layer.quantized_bytes - 4 * max(len(layer.alpha), 1) for layer in result.layers)
    rows.append((f"--target-size {target} ({size} B, {8 * codes / weights:.2f} code bits per weight)", _acc(result.model, test)))
    w8 = quantize_with_report(path, dataclasses.replace(config, bits=8)).model
    rows.append(("W8", _acc(w8, test)))
    for label, value in rows:
        print(f"  {value:6.2f} %  {label}")


def main() -> None:
    """Run the comparison on both shipped models."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=None, help="test samples (default all 10000)")
    parser.add_argument("--samples", type=int, default=SENSITIVITY_SAMPLES, help="sensitivity samples")
    parser.add_argument("--target", default="5bits", help="--target-size value")
    args = parser.parse_args()
    test = load_labelled(FASHION_MNIST_DIR, "test").head(args.limit)
    train = load_labelled(FASHION_MNIST_DIR, "train")
    for path in MODELS:
        evaluate(path, test, train, args.samples, args.target)


if __name__ == "__main__":
    main()
