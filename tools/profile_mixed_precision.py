"""Where the time of the real models' mixed-precision row goes, stage by stage (issue 16's 30 s).

    python tools/profile_mixed_precision.py --cases layout          # the row tools/eval_real_models.py --settings 1 times

Runs what that row runs (onnxq -b 4 on the case's 256 calibration samples, --target-size 0.2x with the proxy
sensitivity priced by the calibration pass's H, its runs on 64 of the samples: onnxq/analysis/mixed_run.py) in this
process under cProfile, and prints per stage the seconds it took (cProfile's
cumulative time of the functions named beside it: a stage absent from the code measured prints 0) and how many model
runs onnxruntime made. Then the whole: wall seconds, this process's CPU seconds (all threads: less sensitive to other
jobs on a shared machine than the wall clock) and the load average over the run. The layers raised are printed so
that two trees can be compared: run each checkout's own copy of this tool (it puts its checkout first on the path).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import os
import pstats
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.machine import cpu_description  # noqa: E402
from tools.real_models import CALIBRATION_SAMPLES, DEFAULT_WORK  # noqa: E402

#: (stage, the functions whose cumulative time it is: file name and function name).
STAGES = (
    ("proxy: float reference run", (("sensitivity.py", "_outputs"), ("sensitivity.py", "_open"))),
    ("proxy: its own moments pass (none: the quantizer's)", (("proxy.py", "_moments"),)),
    ("proxy: factor fit (run at planned widths)", (("proxy.py", "_fit_factor"),)),
    ("choice (pricing every rung, the mix's SQNR)", (("mixed_precision.py", "choose_bits"),)),
    ("quantizer: calibration pass (256 samples)", (("pipeline.py", "calibrate"),)),
    ("quantizer: weights", (("pipeline.py", "quantize_weights"),)),
    ("  of all: onnxruntime runs", (("~", "<built-in method onnxruntime.capi.onnxruntime_pybind11_state.run>"),)),
    ("  of all: H sums (moments observe)", (("moments.py", "observe"),)),
)


def _cumulative(stats: pstats.Stats, file: str, function: str) -> tuple[float, int]:
    """(cumulative seconds, calls) of the profiled function ``function`` in a file named ``file``."""
    seconds, calls = 0.0, 0
    for (path, _, name), (_, ncalls, _, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        if name == function and (file == "~" or path.endswith("/" + file)):
            seconds, calls = seconds + cumtime, calls + ncalls
    return seconds, calls


def profile_case(module: str, work: Path, target: str) -> None:
    """Profile the mixed-precision row of one case and print its stages."""
    import onnxq
    from onnxq.analysis.mixed_precision import TargetSize
    from onnxq.analysis.mixed_run import quantize_mixed

    case = importlib.import_module(f"tools.real_models.{module}").case(work)
    config = onnxq.QuantizeConfig(bits=4, samples=CALIBRATION_SAMPLES)
    profile = cProfile.Profile()
    load, cpu, start = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    profile.enable()
    _, chosen = quantize_mixed(case.model, config, case.calibration, TargetSize.parse(target))
    profile.disable()
    wall, used = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    stats = pstats.Stats(profile)
    print(f"\n{case.name}: --target-size {target}, {len(chosen.raises)} of {len(chosen.bits)} layers raised")
    for stage, functions in STAGES:
        found = [_cumulative(stats, *f) for f in functions]
        print(f"  {stage:48s} {sum(s for s, _ in found):7.1f} s  ({sum(c for _, c in found)} calls)")
    cpu_seconds = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
    print(f"  whole: {wall:.1f} s wall, {cpu_seconds:.1f} s CPU; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"  raised: {' '.join(sorted(chosen.tensor_bits))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["layout"], help="tools/real_models cases (default layout)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"wheels, exports and models (default {DEFAULT_WORK})")
    parser.add_argument("--target-size", default="0.2x", help="the mixed-precision budget (default 0.2x, the row's)")
    args = parser.parse_args()
    print(cpu_description())
    for module in args.cases:
        profile_case(module, args.work, args.target_size)


if __name__ == "__main__":
    main()
