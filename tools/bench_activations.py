"""W8A8 speed and calibration cost: onnxq's activation quantization beside onnxruntime's quantize_static.

(a) Latency, one thread, batch 1 and 32, on each shipped model: float, onnxq W8A8 (its default
    mse calibration; asq too, whose per-input scales cannot fuse into integer kernels) and
    quantize_static W8A8 (QDQ, per channel, QUInt8 activations, QInt8 weights, MinMax) on the
    same BN-folded model. Repetitions are interleaved (each round runs every model once), and
    a run is timed by the calling thread's CPU time, which other processes on a shared machine
    disturb less than wall time. The optimized graphs onnxruntime runs
    (SessionOptions.optimized_model_filepath) are compared op by op.
(b) Calibration cost: each quantizer calibrates on the same 512 train images and writes its
    model, in a fresh subprocess per run; wall time and peak RSS of that process (os.wait4's
    ru_maxrss, i.e. getrusage(RUSAGE_CHILDREN) for that one child). A baseline subprocess per
    quantizer only imports it and loads the model and data, so the fixed cost can be read off.
    At W8A8, and at W4A8 where onnxq's default bias correction adds its measured passes.

    python tools/bench_activations.py [--rounds 300] [--calibration-runs 3] [--skip-latency] [--skip-calibration] [--weight-bits 8 4] [--models M ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
MODELS = [REPO / "models" / "fmnist_resnet20.onnx", REPO / "models" / "fmnist_mobilenetv2.onnx", REPO / "models" / "fmnist_vit.onnx"]
CALIBRATION = 512
BATCH = 32
ONNXQ_METHODS = ("minmax", "mse", "percentile", "entropy", "asq")
ORT_METHODS = ("MinMax", "Entropy", "Percentile")


def ort_w8a8(model: Path, out: Path, batches: list[dict[str, np.ndarray]], method: str, weight_bits: int = 8) -> None:
    """Run onnxruntime's quantize_static at W8A8 (QDQ, per channel, uint8 x int8; int4 weights with ``weight_bits=4``)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    logging.getLogger().setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(model),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8 if weight_bits == 8 else QuantType.QInt4,
            calibrate_method=getattr(CalibrationMethod, method),
        )


# ---------------------------------------------------------------------------- child processes


def child(kind: str, method: str, model: Path, data: Path, out: Path, weight_bits: int) -> None:
    """One measured run: import a quantizer, load model and data, and (unless a baseline) quantize to ``out``."""
    start = time.perf_counter()
    if kind == "onnxq":
        from onnxq import QuantizeConfig, quantize, save_model
        from onnxq.config import ActivationConfig, CalibrationMethod
    else:
        import onnxruntime.quantization  # noqa: F401  (its import is part of what is measured)
    onnx.load(str(model))
    images = np.load(data)
    loaded = time.perf_counter()
    if method != "baseline" and kind == "onnxq":
        act = ActivationConfig(bits=8, method=CalibrationMethod(method), samples=len(images))
        config = QuantizeConfig(bits=weight_bits, activations=act)
        save_model(quantize(model, config, data), out)
    elif method != "baseline":
        ort_w8a8(model, out, [{"input": images[i : i + BATCH]} for i in range(0, len(images), BATCH)], method, weight_bits)
    print(json.dumps({"setup_s": loaded - start, "quantize_s": time.perf_counter() - loaded}))


#: Starts one child and reaps it with os.wait4, whose rusage is that child's alone. It is a separate,
#: small interpreter because Linux starts a child's peak RSS at its parent's (fork copies the address
#: space and the high-water mark with it), so a parent holding models and data would inflate it.
#: It reports its own high-water mark (VmHWM), which is the floor a child inherits.
LAUNCHER = """
import os, subprocess, sys, time
start = time.perf_counter()
process = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(process.pid, 0)
wall = time.perf_counter() - start
own = next((int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")), 0)
print('{"wall_s": %r, "rss_kib": %d, "launcher_kib": %d, "exit": %d}' % (wall, usage.ru_maxrss, own, os.waitstatus_to_exitcode(status)))
"""


def run_child(kind: str, method: str, model: Path, data: Path, out: Path, weight_bits: int) -> dict[str, float]:
    """Run ``child`` in a fresh interpreter (through LAUNCHER): wall time, peak RSS (MiB) and the child's own timings."""
    command = [sys.executable, "-c", LAUNCHER, sys.executable, __file__, "--child", kind, method, str(model), str(data), str(out), str(weight_bits)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    launcher = json.loads(lines[-1]) if lines else {"exit": done.returncode}
    if done.returncode != 0 or launcher["exit"] != 0:
        raise RuntimeError(f"{kind} {method} failed:\n{done.stderr[-2000:]}")
    child_times = json.loads(lines[-2])
    return {"wall_s": launcher["wall_s"], "rss_mib": launcher["rss_kib"] / 1024, "launcher_mib": launcher["launcher_kib"] / 1024, **child_times}


# ---------------------------------------------------------------------------- latency


def one_thread_session(model: bytes, optimized: Path | None = None):
    """A one-thread CPU session (everything runs on the calling thread), optionally saving the optimized graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def interleaved_ms(sessions: dict[str, object], feeds: dict[str, np.ndarray], rounds: int) -> dict[str, float]:
    """Median thread CPU time per run (ms) of each session; each round runs them all, in a fresh random order.

    A run is several per cent faster after a small model than after the float or ASQ model (which
    evict its weights from the caches), so the order must give every model the same predecessors:
    a rotating order does not (the model listed after "float" follows it in 3 of 4 rounds).
    """
    names = list(sessions)
    times: dict[str, list[float]] = {name: [] for name in names}
    order = np.random.default_rng(0)
    for name in names:
        sessions[name].run(None, feeds)  # warm-up
    for _ in range(rounds):
        for name in order.permutation(names):
            start = time.thread_time()
            sessions[name].run(None, feeds)
            times[name].append(time.thread_time() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def quantized_models(model: Path, prepared: Path, calib: list[dict[str, np.ndarray]], tmp: Path) -> dict[str, bytes]:
    """float, onnxq W8A8 (mse, asq) and quantize_static W8A8 (MinMax), serialized."""
    from onnxq import QuantizeConfig, quantize
    from onnxq.config import ActivationConfig
    from onnxq.config import CalibrationMethod as Method

    out = tmp / f"{model.stem}.ort.onnx"
    ort_w8a8(prepared, out, calib, "MinMax")

    def onnxq_w8a8(method: Method) -> bytes:
        return quantize(model, QuantizeConfig(bits=8, activations=ActivationConfig(bits=8, method=method)), calib).SerializeToString()

    return {
        "float": model.read_bytes(),
        "onnxq mse": onnxq_w8a8(Method.MSE),
        "quantize_static": out.read_bytes(),
        "onnxq asq": onnxq_w8a8(Method.ASQ),
    }


def op_counts(model: bytes, path: Path) -> Counter[str]:
    """Op types (domain-qualified where not standard) of the graph onnxruntime runs after its optimizations."""
    one_thread_session(model, path)
    graph = onnx.load(str(path)).graph
    return Counter(f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in graph.node)


def bench_latency(rounds: int, calib: list[dict[str, np.ndarray]], images: np.ndarray, tmp: Path, models: list[Path] = MODELS) -> None:
    from onnxq.model.prepare import prepare

    print("### W8A8 latency, one thread\n")
    print("median thread CPU time per run over interleaved rounds; ratio onnxq/quantize_static < 1 means onnxq is faster\n")
    columns = [
        "float ms",
        "quantize_static ms",
        "onnxq mse ms",
        "onnxq asq ms",
        "onnxq/quantize_static",
        "quantize_static/float",
        "onnxq/float",
        "asq/float",
    ]
    print("| model | batch | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * (len(columns) + 1))
    counts: dict[str, dict[str, Counter[str]]] = {}
    for model in models:
        prepared = tmp / f"{model.stem}.prepared.onnx"
        onnx.save(prepare(onnx.load(str(model))), str(prepared))
        models = quantized_models(model, prepared, calib, tmp)
        counts[model.stem] = {name: op_counts(data, tmp / f"{model.stem}.{name.replace(' ', '_')}.opt.onnx") for name, data in models.items()}
        sessions = {name: one_thread_session(data) for name, data in models.items()}
        for batch in (1, BATCH):
            feeds = {"input": images[:batch]}
            ms = interleaved_ms(sessions, feeds, rounds if batch == 1 else max(rounds // 8, 10))
            f, o, q, a = ms["float"], ms["onnxq mse"], ms["quantize_static"], ms["onnxq asq"]
            print(
                f"| {model.stem} | {batch} | {f:.3f} | {q:.3f} | {o:.3f} | {a:.3f} | {o / q:.2f}x | {q / f:.2f}x | {o / f:.2f}x | {a / f:.2f}x |",
                flush=True,
            )
    print("\n### Op counts in the optimized graphs onnxruntime runs (ORT_ENABLE_ALL)\n")
    for stem, by_model in counts.items():
        names = ["onnxq mse", "quantize_static", "onnxq asq", "float"]
        ops = sorted(set().union(*by_model.values()))
        print(f"| {stem}: op | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for op in ops:
            print(f"| {op} | " + " | ".join(str(by_model[n].get(op, 0)) for n in names) + " |")
        same = by_model["onnxq mse"] == by_model["quantize_static"]
        diff = {op: (by_model["onnxq mse"].get(op, 0), by_model["quantize_static"].get(op, 0)) for op in ops}
        diff = {op: v for op, v in diff.items() if v[0] != v[1]}
        print(f"\nonnxq mse and quantize_static run {'the same ops' if same else 'different ops: ' + str(diff)}\n")


# ---------------------------------------------------------------------------- calibration cost


def bench_calibration(runs: int, images: np.ndarray, tmp: Path, weight_bits: int, models: list[Path] = MODELS) -> None:
    from onnxq.model.prepare import prepare

    data = tmp / "calibration.npy"
    np.save(data, images[:CALIBRATION])
    setting = f"W{weight_bits}A8"
    if weight_bits == 4:
        setting += " (onnxq: first/last layers 8-bit, measured bias correction; quantize_static: every weight int4)"
    print(f"### Calibration cost: {CALIBRATION} images, {setting}, fresh subprocess per run\n")
    print(f"median over {runs} interleaved runs; wall = the whole subprocess (interpreter, imports, load, quantize, write);")
    print("quantize = the quantizer call alone, timed inside the child; peak RSS of the child\n")
    print("| model | quantizer | method | wall s | quantize s | peak RSS MiB | wall - baseline s | RSS - baseline MiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    launcher = 0.0
    for model in models:
        prepared = tmp / f"{model.stem}.prepared.onnx"
        onnx.save(prepare(onnx.load(str(model))), str(prepared))
        jobs = [("onnxq", "baseline", model)] + [("onnxq", m, model) for m in ONNXQ_METHODS]
        jobs += [("quantize_static", "baseline", prepared)] + [("quantize_static", m, prepared) for m in ORT_METHODS]
        results: dict[tuple[str, str], list[dict[str, float]]] = {(k, m): [] for k, m, _ in jobs}
        for _ in range(runs):
            for kind, method, source in jobs:
                out = tmp / f"out.{kind}.{method}.onnx"
                results[(kind, method)].append(run_child(kind, method, source, data, out, weight_bits))
                out.unlink(missing_ok=True)
        for kind, method, _ in jobs:
            wall, quant, rss = (float(np.median([r[k] for r in results[(kind, method)]])) for k in ("wall_s", "quantize_s", "rss_mib"))
            base = results[(kind, "baseline")]
            base_wall, base_rss = float(np.median([r["wall_s"] for r in base])), float(np.median([r["rss_mib"] for r in base]))
            extra = "" if method == "baseline" else f" {wall - base_wall:.2f} | {rss - base_rss:.0f} |"
            print(f"| {model.stem} | {kind} | {method} | {wall:.2f} | {quant:.2f} | {rss:.0f} |" + (extra or " | |"), flush=True)
        launcher = max([launcher] + [r["launcher_mib"] for rs in results.values() for r in rs])
    print(f"\nThe launcher that starts each child peaked at {launcher:.0f} MiB RSS, a floor under every child's figure.")


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, method, model, data, out, weight_bits = sys.argv[2:8]
        child(kind, method, Path(model), Path(data), Path(out), int(weight_bits))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="interleaved rounds at batch 1 (batch 32 runs an eighth as many)")
    parser.add_argument("--calibration-runs", type=int, default=3, help="subprocess runs per quantizer and method")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-calibration", action="store_true")
    parser.add_argument("--weight-bits", type=int, choices=(8, 4), nargs="+", default=[8, 4], help="weight bits of the calibration-cost runs")
    parser.add_argument("--models", nargs="+", type=Path, default=MODELS, help="default: the shipped models")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice to pre-process, once per call
    import onnxruntime

    from onnxq.analysis.datasets import FASHION_MNIST_DIR, load_labelled
    from tools.machine import cpu_description

    images = load_labelled(FASHION_MNIST_DIR, "train").images[:CALIBRATION]
    test = load_labelled(FASHION_MNIST_DIR, "test").images[:BATCH]
    calib = [{"input": images[i : i + BATCH]} for i in range(0, len(images), BATCH)]
    print(cpu_description())
    print(f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, numpy {np.__version__}, Python {sys.version.split()[0]}\n")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_latency:
            bench_latency(args.rounds, calib, test, Path(tmp), args.models)
        if not args.skip_calibration:
            for bits in args.weight_bits:
                bench_calibration(args.calibration_runs, images, Path(tmp), bits, args.models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
