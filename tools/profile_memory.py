"""Where a quantization run's memory peaks: the resident set above the start, stage by stage, on a real model.

    python tools/profile_memory.py --cases pitch minilm orientation

Runs onnxq `-b 4` with the case's 256 calibration samples (tools/eval_real_models.py's setting 0) in a forked child, as
that tool does, while a thread reads the child's resident set every millisecond. The pipeline's stages
(onnxq/pipeline.py), the calibration session's creation and each shard of the calibration pass are wrapped so that
every reading is filed under the stage running then; the table gives each stage's highest reading, in MB above the
child's resident set before the run (the imports are done before, so they are not counted, unlike in the eval tool).
A stage's peak includes what earlier stages left: the stage where the table peaks is the run's peak.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import multiprocessing
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.real_models import CALIBRATION_SAMPLES, DEFAULT_WORK, Case  # noqa: E402

STAGES = ("load_and_prepare", "plan_quantization", "calibrate", "quantize_weights", "correct_biases", "rewrite", "finish")


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class StagePeaks:
    """The highest resident set seen under each stage name, in the order the stages came."""

    def __init__(self) -> None:
        self.stage = "start"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            value, stage = _resident_mb(), self.stage
            self.peaks[stage] = max(self.peaks.get(stage, 0.0), value)
            time.sleep(0.001)

    def __enter__(self) -> StagePeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.01)
        self._stop.set()
        self._thread.join()

    def wrap(self, owner: Any, name: str, label: str | None = None) -> None:
        """File what runs inside ``owner.name`` under ``label`` (default ``name``), what follows it under "after label"."""
        original: Callable[..., Any] = getattr(owner, name)
        tag = label or name

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.stage = tag
            try:
                return original(*args, **kwargs)
            finally:
                self.stage = f"after {tag}"

        setattr(owner, name, wrapper)


def _child(case: Case) -> None:
    import onnxq
    import onnxq.calibrate.collect as collect
    import onnxq.pipeline as pipeline

    peaks = StagePeaks()
    for stage in STAGES:
        peaks.wrap(pipeline, stage)
    shard = iter(range(1, 1 << 30))
    original_observe = collect.observe_runs

    def observe(*args: Any, **kwargs: Any) -> Any:
        peaks.stage = f"calibrate: shard {next(shard)}"
        result = original_observe(*args, **kwargs)
        peaks.stage = "calibrate: merge"
        return result

    collect.observe_runs = observe
    original_exposing = collect.exposing

    @contextlib.contextmanager
    def exposing(*args: Any, **kwargs: Any) -> Iterator[Any]:
        peaks.stage = "calibrate: session"
        with original_exposing(*args, **kwargs) as session:
            yield session
        peaks.stage = "calibrate: session closed"

    collect.exposing = exposing
    start = _resident_mb()
    with peaks:
        began = time.perf_counter()
        onnxq.quantize(case.model, onnxq.QuantizeConfig(bits=4, samples=CALIBRATION_SAMPLES), case.calibration)
        seconds = time.perf_counter() - began
    print(f"{seconds:.1f} s, resident at start {start:.0f} MB")
    print("| stage | peak MB above start |\n|---|---:|")
    for stage, peak in peaks.peaks.items():
        print(f"| {stage} | {peak - start:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["pitch"], help="tools/real_models cases (default pitch)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"wheels and exports (default {DEFAULT_WORK})")
    args = parser.parse_args()
    import onnxq.pipeline  # noqa: F401  (imported here, before the child forks: their memory is not the run's)

    for name in args.cases:
        case = importlib.import_module(f"tools.real_models.{name}").case(args.work)
        print(f"\n### {case.name}")
        child = multiprocessing.get_context("fork").Process(target=_child, args=(case,))
        child.start()
        child.join()


if __name__ == "__main__":
    main()
