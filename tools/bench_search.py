"""Benchmark of REQuant's alpha search on ResNet-50-sized weight tensors.

For each layer shape it times, in the same run, onnxq's search (histogram once per
row, then golden-section on cumulative sums, plus the exact polish on short rows)
against a direct golden-section search that quantizes every weight at each step
(the approach the REQuant paper times at ~40 ms per layer). Weights are Student-t
samples: the search cost does not depend on the values.

    python tools/bench_search.py [--bits 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxq.formats import uniform  # noqa: E402
from onnxq.search import golden_section  # noqa: E402
from tools.machine import cpu_description  # noqa: E402

# Conv/FC weight shapes of ResNet-50 (each appears in one or more blocks).
RESNET50_SHAPES = [
    (64, 3, 7, 7),
    (64, 64, 1, 1),
    (64, 64, 3, 3),
    (256, 64, 1, 1),
    (128, 128, 3, 3),
    (512, 128, 1, 1),
    (256, 256, 3, 3),
    (1024, 256, 1, 1),
    (512, 512, 3, 3),
    (2048, 512, 1, 1),
    (1000, 2048),
]


def direct_golden_section(rows: np.ndarray, bits: int, iterations: int = 30) -> np.ndarray:
    """Golden-section on alpha in (0, 1] where every evaluation quantizes all the weights (the baseline)."""

    def err(a: np.ndarray) -> np.ndarray:
        return np.sum((uniform.quantize_rows(rows, a, bits, False).dequantize() - rows) ** 2, axis=1)

    return golden_section(err, np.full(len(rows), 1e-3), np.ones(len(rows)), iterations)


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` runs in milliseconds (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(cpu_description())
    print(f"{args.bits}-bit weights, best of {args.repeats} runs, numpy {np.__version__}\n")
    print("| layer shape | weights | per tensor ms | per tensor, sqrt ms | per channel ms | direct GSS per tensor ms | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    totals = np.zeros(4)
    for shape in RESNET50_SHAPES:
        w = (rng.standard_t(5, size=shape) * 0.02).astype(np.float32)
        tensor_rows, channel_rows = w.reshape(1, -1), w.reshape(shape[0], -1)
        ms = np.array([
            best_ms(partial(uniform.quantize_best, tensor_rows, args.bits, False), args.repeats),
            best_ms(partial(uniform.quantize_best, tensor_rows, args.bits, True), args.repeats),
            best_ms(partial(uniform.quantize_best, channel_rows, args.bits, False), args.repeats),
            best_ms(partial(direct_golden_section, tensor_rows, args.bits), max(1, args.repeats // 3)),
        ])
        totals += ms
        name = "x".join(map(str, shape))
        print(f"| {name} | {w.size:,} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | {ms[3]:.1f} | {ms[3] / ms[0]:.0f}x |")
    mean = totals / len(RESNET50_SHAPES)
    print(f"| mean over shapes | | {mean[0]:.2f} | {mean[1]:.2f} | {mean[2]:.2f} | {mean[3]:.1f} | {mean[3] / mean[0]:.0f}x |")
    print("\nms include building the histogram and writing the codes (quantize_best end to end).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
