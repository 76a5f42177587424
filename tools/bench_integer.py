"""Integer execution end to end: the shipped models quantized W4A8 with calibration, their speed against float and accuracy.

Per shipped Fashion-MNIST model: float; onnxq W4A8 in the qdq format (onnxruntime's own integer kernels), in the int
format (onnxq's IntConv ops, uint8 chains between them, onnxq/rewrite/chains.py) and the post format, each with its
default mse calibration and with ASQ (steps per sample); the int/post models again with the ops' AVX2 kernels forced
(attribute kernel=2: a proxy for AVX2-only CPUs on a machine with AVX-512 VNNI), written as onnxq writes them on such a
CPU (--reduce-range auto cuts the 8-bit first/last weights to 7 bits, which the AVX2 kernels keep whole). Speed: one onnxruntime thread, batch
1 and 8, the median over interleaved rounds of each round's ratio to float (tools/bench_ops.py's Rounds: thread CPU
time, the least of several runs per round). Accuracy: top-1 on the first test images, and agreement with float's top-1.
The summary's chain line says where a model's uint8 chain breaks. With --baseline-library, the int mse columns again
with that op library (e.g. a build of main) in the same rounds: a change's before and after side by side in one run.

    python tools/bench_integer.py [--models fmnist_resnet20 ...] [--rounds 5] [--repeats 20] [--test-images 2000]
                                  [--baseline-library /tmp/build-main/libonnxq_ops.so]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxq import QuantizeConfig, WeightFormat  # noqa: E402
from onnxq.analysis.datasets import FASHION_MNIST_DIR, load_idx_split  # noqa: E402
from onnxq.config import ActivationConfig, CalibrationMethod, ReduceRange  # noqa: E402
from onnxq.pipeline import quantize_with_report  # noqa: E402
from tools.bench_ops import Rounds, has_avx512_vnni, one_thread_session, with_kernel  # noqa: E402
from tools.machine import cpu_description  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = ("fmnist_resnet20", "fmnist_mobilenetv2", "fmnist_vit")
CALIBRATION = 512


@dataclass(frozen=True)
class Setting:
    """One column: a name, the format and calibration method, and whether onnxq's ops run their AVX2 kernels forced."""

    name: str
    format: WeightFormat
    method: CalibrationMethod
    avx2: bool = False
    baseline: bool = False  # the ops from --baseline-library


def settings(proxy: bool, baseline: bool = False) -> list[Setting]:
    """The columns, with the forced-AVX2 twins where this CPU has AVX-512 VNNI (else the default kernels are AVX2's).

    With ``baseline``, each int mse column's twin on the baseline library right after it.
    """
    out = []
    for method, label in ((CalibrationMethod.MSE, "mse"), (CalibrationMethod.ASQ, "ASQ")):
        out.append(Setting(f"qdq {label}", WeightFormat.QDQ, method))
        for fmt in (WeightFormat.INT, WeightFormat.POST):
            twins = [False, True] if baseline and fmt == WeightFormat.INT and method == CalibrationMethod.MSE else [False]
            for avx2 in [False, True] if proxy else [False]:
                for twin in twins:
                    name = f"{fmt.value} {label}" + (" AVX2" if avx2 else "") + (" (baseline)" if twin else "")
                    out.append(Setting(name, fmt, method, avx2=avx2, baseline=twin))
    return out


def top1(session, images: np.ndarray, batch: int = 500) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0].argmax(1) for i in range(0, len(images), batch)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per row (the cells are medians over them)")
    parser.add_argument("--repeats", type=int, default=20, help="runs per model in a round (its time: the least of them)")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--baseline-library", help="an op library file (another build) that runs twins of the int mse columns, "
                        "timed in the same interleaved rounds")
    args = parser.parse_args(argv)
    print(cpu_description())
    train = load_idx_split(FASHION_MNIST_DIR, "train").images[:CALIBRATION]
    test = load_idx_split(FASHION_MNIST_DIR, "test")
    images, labels = test.images[: args.test_images], test.labels[: args.test_images]
    columns = settings(has_avx512_vnni(), args.baseline_library is not None)
    rounds = Rounds(args.repeats, args.rounds, interleave=True)
    print(f"onnxq W4A8 ({CALIBRATION} calibration images), one onnxruntime thread; speed cells: {rounds.describe()}\n")
    print("| model | batch | float ms | " + " | ".join(c.name for c in columns) + " |")
    print("|---|---:|---:|" + "---:|" * len(columns))
    notes = []
    for name in args.models:
        float_model = onnx.load(REPO / "models" / f"{name}.onnx")
        models = []
        for column in columns:
            if column.baseline:  # (the column before it: the same model)
                models.append(models[-1])
                continue
            # the AVX2 twins as an AVX2-only machine writes them: 8-bit (first/last) weights cut to 7 bits (--reduce-range auto)
            reduce = ReduceRange.ON if column.avx2 else ReduceRange.AUTO
            config = QuantizeConfig(bits=4, format=column.format, activations=ActivationConfig(method=column.method), reduce_range=reduce)
            result = quantize_with_report(float_model, config, [{"input": train[i:i + 64]} for i in range(0, CALIBRATION, 64)])
            models.append(with_kernel(result.model, 2) if column.avx2 else result.model)
            if result.chains is not None and not column.avx2:
                notes.append(f"{name}, {column.name}: {result.chains.line()}")
        libraries = [args.baseline_library if column.baseline else None for column in columns]
        sessions = [one_thread_session(float_model)] + [one_thread_session(m, lib) for m, lib in zip(models, libraries, strict=True)]
        reference = top1(sessions[0], images)
        for batch in (1, 8):
            feeds = {"input": images[:batch]}
            base, speedups = rounds.row([(s, feeds) for s in sessions])
            print(f"| {name} | {batch} | {base:.2f} | " + " | ".join(f"{r:.2f}x" for r in speedups) + " |", flush=True)
        accuracy = [f"{np.mean(top1(s, images) == labels) * 100:.2f}" for s in sessions]
        agreement = [f"{np.mean(top1(s, images) == reference) * 100:.2f}" for s in sessions[1:]]
        print(f"| {name} | top-1 % | {accuracy[0]} | " + " | ".join(accuracy[1:]) + " |")
        print(f"| {name} | agrees with float % | | " + " | ".join(agreement) + " |", flush=True)
    print()
    for note in notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
