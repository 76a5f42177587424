"""Accuracy table for README: model x bits x method x granularity, beside onnxruntime's own quantizer.

Every row is measured in this run on the full Fashion-MNIST test split (10,000 images)
with onnxruntime. Methods (weights only; first and last layers at 8 bits in all, depthwise convolutions at 8 bits in
the QDQ columns, as onnxq's --depthwise-bits default does):
  absmax       round-to-nearest over the full range max|w| (alpha = 1)
  REQuant      alpha searched for the least weight MSE
  REQuant+sqrt REQuant in the sqrt domain for every layer
  REQuant auto REQuant, plain or sqrt per layer by weight MSE (onnxq's default)
  int / post   --format int / post: Conv layers in onnxq's IntConv / PostConv ops, which also
               quantize their input activations to uint8 (dynamic range); per channel only
onnxruntime's weight quantizers for Conv exist only at 8 bits (quantize_dynamic, which also
quantizes activations on the fly); its 4-bit weight-only tool (MatMulNBits) covers MatMul only.

    python tools/eval_table.py models/fmnist_resnet20.onnx [more models] [--bits 8 6 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxq import Granularity, QuantizeConfig, RangeMethod, SqrtMode, WeightFormat, quantize  # noqa: E402
from onnxq.analysis.datasets import FASHION_MNIST_DIR, LabelledImages, load_idx_split  # noqa: E402
from onnxq.analysis.evaluate import accuracy  # noqa: E402
from tools.machine import cpu_description  # noqa: E402

METHODS = {
    "absmax": dict(range=RangeMethod.ABSMAX, sqrt=SqrtMode.OFF),
    "REQuant": dict(range=RangeMethod.SEARCH, sqrt=SqrtMode.OFF),
    "REQuant+sqrt": dict(range=RangeMethod.SEARCH, sqrt=SqrtMode.ON),
    "REQuant auto": dict(range=RangeMethod.SEARCH, sqrt=SqrtMode.AUTO),
    "int (IntConv)": dict(format=WeightFormat.INT),
    "post (PostConv)": dict(format=WeightFormat.POST),
}
#: The op formats quantize activations too and run per channel; POST exists at 2-4 bits.
OP_FORMATS = {"int (IntConv)": 8, "post (PostConv)": 4}


def onnxq_top1(model: Path, data: LabelledImages, bits: int, method: str, granularity: Granularity) -> float | None:
    if method in OP_FORMATS and (bits > OP_FORMATS[method] or granularity is Granularity.TENSOR):
        return None
    config = QuantizeConfig(bits=bits, granularity=granularity, **METHODS[method])
    return accuracy(quantize(model, config).SerializeToString(), data).top1


def ort_dynamic_top1(model: Path, data: LabelledImages, per_channel: bool) -> float:
    """onnxruntime.quantization.quantize_dynamic at int8 (its only weight quantizer that covers Conv)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dyn.onnx"
        quantize_dynamic(model, out, weight_type=QuantType.QInt8, per_channel=per_channel)
        return accuracy(out, data).top1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4])
    parser.add_argument("--data", type=Path, default=FASHION_MNIST_DIR)
    args = parser.parse_args(argv)
    data = load_idx_split(args.data, "test")
    print(cpu_description())
    print(f"Fashion-MNIST test split, {len(data.labels)} images; top-1 % (change vs float in pp)\n")
    header = "| model | bits | granularity | " + " | ".join(METHODS) + " | onnxruntime quantize_dynamic |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for model in args.models:
        base = accuracy(model, data).top1
        print(f"| {model.stem} | float | | {100 * base:.2f} |" + " |" * len(METHODS))
        for bits in args.bits:
            for granularity in (Granularity.CHANNEL, Granularity.TENSOR):
                cells = [onnxq_top1(model, data, bits, m, granularity) for m in METHODS]
                ort = ort_dynamic_top1(model, data, granularity is Granularity.CHANNEL) if bits == 8 else None
                text = ["n/a" if c is None else f"{100 * c:.2f} ({100 * (c - base):+.2f})" for c in cells]
                text.append(f"{100 * ort:.2f} ({100 * (ort - base):+.2f}) W8A8-dyn" if ort is not None else "n/a")
                print(f"| {model.stem} | {bits} | {granularity.value} | " + " | ".join(text) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
