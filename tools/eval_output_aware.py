"""Weight-only quantization with and without data on the shipped models, judged on the 10,000 test images.

Printed per model, bits and setting: top-1, top-1 agreement with float, and output SQNR against float.

    python tools/eval_output_aware.py                          # -b 4 and -b 3, 256 train images as data
    python tools/eval_output_aware.py --bits 4 --samples 512

"data" runs `quantize(model, QuantizeConfig(bits=B), data)` (ranges by output error and GPTQ's compensated rounding on
each layer's input second moments, onnxq/numerics/output_error.py); "no data" the same without data (ranges by
weight error, rounding to nearest). The data are the first train images; the measures use the test images only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxq  # noqa: E402
from onnxq.analysis.datasets import FASHION_MNIST_DIR, load_idx_split  # noqa: E402
from onnxq.config import QuantizeConfig  # noqa: E402
from tools.machine import cpu_description  # noqa: E402

MODELS = ("resnet20", "mobilenetv2", "vit")


def logits(model: str | object, images: np.ndarray) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": images[i : i + 500]})[0] for i in range(0, len(images), 500)])


def compare_sqrt(args: argparse.Namespace) -> None:
    """Without data: output SQNR on the test images of sqrt-or-plain by weight MSE, plain, and plain absmax."""
    from onnxq.config import RangeMethod, SqrtMode
    from onnxq.numerics import weights

    test = load_idx_split(FASHION_MNIST_DIR, "test")
    print("| model | bits | sqrt or plain by weight MSE | plain | plain absmax |")
    print("|---|---:|---:|---:|---:|")
    kept = weights.SQRT_AUTO_MAX_BITS
    weights.SQRT_AUTO_MAX_BITS = 8  # the old AUTO, at every width
    try:
        for name in args.models:
            path = str(Path(__file__).resolve().parents[1] / "models" / f"fmnist_{name}.onnx")
            reference = logits(path, test.images).astype(np.float64)
            for bits in args.bits:
                cells = []
                for config in (QuantizeConfig(bits=bits), QuantizeConfig(bits=bits, sqrt=SqrtMode.OFF),
                               QuantizeConfig(bits=bits, sqrt=SqrtMode.OFF, range=RangeMethod.ABSMAX)):
                    out = logits(onnxq.quantize(path, config), test.images)
                    cells.append(f"{10 * np.log10(np.sum(reference**2) / np.sum((reference - out) ** 2)):.1f}")
                print(f"| {name} | {bits} | " + " | ".join(cells) + " |", flush=True)
    finally:
        weights.SQRT_AUTO_MAX_BITS = kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--samples", type=int, default=256, help="train images used as data (default 256)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--compare-sqrt", action="store_true",
                        help="instead: without data, output SQNR of sqrt codes tried (--sqrt on), plain codes and plain absmax, per bits")
    args = parser.parse_args()
    print(cpu_description())
    if args.compare_sqrt:
        compare_sqrt(args)
        return
    train, test = load_idx_split(FASHION_MNIST_DIR, "train"), load_idx_split(FASHION_MNIST_DIR, "test")
    data = [{"input": train.images[i : i + 32]} for i in range(0, args.samples, 32)]
    print(f"data: the first {args.samples} train images; measured on the {len(test.labels)} test images")
    print("| model | bits | data | top-1 % (float) | top-1 agreement % | output SQNR dB | quantize s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name in args.models:
        path = str(Path(__file__).resolve().parents[1] / "models" / f"fmnist_{name}.onnx")
        reference = logits(path, test.images)
        float_top1 = 100 * np.mean(reference.argmax(1) == test.labels)
        for bits in args.bits:
            for label, source in (("no data", None), ("data", data)):
                start = time.perf_counter()
                model = onnxq.quantize(path, QuantizeConfig(bits=bits), source)
                seconds = time.perf_counter() - start
                out = logits(model, test.images)
                top1 = 100 * np.mean(out.argmax(1) == test.labels)
                agree = 100 * np.mean(out.argmax(1) == reference.argmax(1))
                ref64 = reference.astype(np.float64)
                sqnr = 10 * np.log10(np.sum(ref64**2) / np.sum((ref64 - out) ** 2))
                print(f"| {name} | {bits} | {label} | {top1:.2f} ({float_top1:.2f}) | {agree:.2f} | {sqnr:.1f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
