"""Measure what per-layer sensitivity buys on the shipped models: the numbers in the README's mixed-precision section.

For each model: float, uniform W4, W4 with only the most sensitive layer at 8 bits (and, for
comparison, with the least sensitive of the 4-bit layers at 8 bits), and ``--target-size`` at an average of
5 bits, each as Fashion-MNIST test accuracy, with the stored weight bytes (codes + scales) of
each quantized model. Sensitivity is measured on training images; the four most sensitive layers
are listed with their model-output SQNR.

    python -m tools.eval_mixed_precision [--limit N] [--samples N]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxq.analysis.datasets import FASHION_MNIST_DIR, load_labelled
from onnxq.analysis.evaluate import accuracy
from onnxq.analysis.mixed_precision import TargetSize, choose_bits
from onnxq.analysis.sensitivity import SENSITIVITY_SAMPLES, SensitivityAnalysis, most_sensitive
from onnxq.config import QuantizeConfig
from onnxq.pipeline import quantize_with_report
from tools.machine import cpu_description

MODELS = ("models/fmnist_resnet20.onnx", "models/fmnist_mobilenetv2.onnx")


def _acc(model, test) -> float:
    return accuracy(model.SerializeToString(), test).top1 * 100


def _bytes(result) -> int:
    """Stored weight bytes of a quantize_with_report result: codes plus scales, as --target-size counts them."""
    return sum(layer.quantized_bytes for layer in result.layers)


def evaluate(path: str, test, train, samples: int, target: str) -> None:
    """Print one model's accuracies."""
    config = QuantizeConfig(bits=4)
    started = time.perf_counter()
    analysis = SensitivityAnalysis(path, config, [{"input": train.images[:samples]}], samples)
    layers = analysis.layers()
    seconds = time.perf_counter() - started
    worst = most_sensitive(layers)
    # The least sensitive layer that -b 4 leaves at 4 bits: the first and last layers are 8-bit already, and raising
    # one of them would change nothing.
    best = max((s for s in layers if s.bits == config.bits), key=lambda s: s.model_sqnr_db)
    w4 = quantize_with_report(path, config)
    print(f"{path}: {len(layers)} layers, sensitivity in {seconds:.1f} s on {samples} samples")
    print(f"  most sensitive: {', '.join(worst.nodes)} ({worst.model_sqnr_db:.1f} dB); "
          f"least of the 4-bit layers: {', '.join(best.nodes)} ({best.model_sqnr_db:.1f} dB)")
    ranked = sorted(layers, key=lambda s: s.model_sqnr_db)[:4]
    print("  the four most sensitive: " + "; ".join(f"{', '.join(s.nodes)} {s.model_sqnr_db:.1f} dB" for s in ranked))
    float_acc = accuracy(path, test).top1 * 100
    w4_bytes = _bytes(w4)
    rows = [("float", float_acc), (f"W4 (first/last 8; weights {w4_bytes} B)", _acc(w4.model, test))]
    for label, layer in (("most", worst), ("least", best)):
        raised = quantize_with_report(path, dataclasses.replace(config, node_bits=dict.fromkeys(layer.nodes, 8)))
        extra = _bytes(raised) - w4_bytes
        rows.append((f"W4 + {label} sensitive at 8 (weights {_bytes(raised)} B, {extra:+d} B)", _acc(raised.model, test)))
    mixed = choose_bits(analysis, TargetSize.parse(target))
    for line in mixed.lines():
        print("  " + line)
    result = quantize_with_report(path, dataclasses.replace(config, tensor_bits=mixed.tensor_bits))
    size = _bytes(result)
    weights = sum(layer.float_bytes for layer in result.layers) // 4
    codes = sum(layer.quantized_bytes - 4 * max(len(layer.alpha), 1) for layer in result.layers)
    rows.append((f"--target-size {target} ({size} B, {8 * codes / weights:.2f} code bits per weight)", _acc(result.model, test)))
    w8 = quantize_with_report(path, dataclasses.replace(config, bits=8))
    rows.append((f"W8 (weights {_bytes(w8)} B)", _acc(w8.model, test)))
    for label, value in rows:
        print(f"  {value:6.2f} %  {label}")


def main() -> None:
    """Run the comparison on both shipped models."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=None, help="test samples (default all 10000)")
    parser.add_argument("--samples", type=int, default=SENSITIVITY_SAMPLES, help="sensitivity samples")
    parser.add_argument("--target", default="5bits", help="--target-size value")
    args = parser.parse_args()
    print(cpu_description())
    test = load_labelled(FASHION_MNIST_DIR, "test").head(args.limit)
    train = load_labelled(FASHION_MNIST_DIR, "train")
    for path in MODELS:
        evaluate(path, test, train, args.samples, args.target)


if __name__ == "__main__":
    main()
