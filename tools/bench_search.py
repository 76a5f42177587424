"""Benchmark of REQuant's alpha search on ResNet-50-sized weight tensors.

For each layer shape it times, in the same run, onnxq's search (histogram once per
row, then golden-section on cumulative sums, plus the exact polish on short rows)
against a direct golden-section search that quantizes every weight at each step
(the approach the REQuant paper times at ~40 ms per layer). Weights are Student-t
samples: the search cost does not depend on the values.

With --grids it instead compares the bracketing scan's sizes (32 and 8 points) on the shipped
models' real weights, per output channel: time and weight error after the exact polish, which is
how search.grid_points chose 8 points for codebooks of more than 64 levels.

    python tools/bench_search.py [--bits 4] [--repeats 5] [--grids]
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

from onnxq.numerics import uniform  # noqa: E402
from onnxq.numerics.search import REFINE_MAX_ROW, golden_section, refine_alpha, search_alpha  # noqa: E402
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


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "models").glob("*.onnx"))


def searched_error(rows: np.ndarray, bits: int, grid: int) -> float:
    """Squared weight error of ``rows`` after the search with a ``grid``-point scan and the exact polish (as best_alpha)."""
    codebook = uniform.codebook(bits, False)
    alpha = search_alpha(rows, codebook, grid=grid).alpha
    if rows.shape[1] <= REFINE_MAX_ROW:
        alpha = refine_alpha(rows, codebook, alpha)
    return float(np.sum((uniform.quantize_rows(rows, alpha, bits, False).dequantize() - rows) ** 2))


def searched_errors(rows: list[np.ndarray], bits: int, grid: int) -> list[float]:
    """:func:`searched_error` of every tensor's rows."""
    return [searched_error(r, bits, grid) for r in rows]


def compare_grids(repeats: int) -> None:
    """Scan sizes 32 and 8 on the shipped models' weights (per output channel): time and error, side by side."""
    import onnx
    from onnx import numpy_helper

    print("| model | bits | tensors | 32-point ms | 8-point ms | error 8 / 32, total | per tensor, min - max |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for path in SHIPPED:
        weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if len(t.dims) in (2, 4)]
        rows = [w.reshape(w.shape[0], -1).astype(np.float32) for w in weights if w.size > 1]
        for bits in (8, 4):
            ms = [best_ms(partial(searched_errors, rows, bits, g), repeats) for g in (32, 8)]
            errors = np.array([[searched_error(r, bits, g) for g in (32, 8)] for r in rows])
            ratio = errors[:, 1] / np.maximum(errors[:, 0], 1e-30)
            total = errors[:, 1].sum() / errors[:, 0].sum()
            print(f"| {path.stem} | {bits} | {len(rows)} | {ms[0]:.0f} | {ms[1]:.0f} | {total:.4f} | {ratio.min():.3f} - {ratio.max():.3f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--grids", action="store_true", help="compare the scan sizes on the shipped models' weights instead")
    args = parser.parse_args(argv)
    print(cpu_description())
    if args.grids:
        compare_grids(args.repeats)
        return 0
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
