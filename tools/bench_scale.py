"""Calibration and sensitivity passes against the number of Dask workers, and the cost model they fit.

The model is ResNet-50's graph at 224x224 with random weights (tools/bench_calibration_memory.py builds it: time does
not depend on the weight values), the data random images. Measured on this machine, each pass once:

- the calibration pass of `onnxq quantize -b 4 --calibration DATA` (W4A8 mse: histograms of every activation site
  and the second moments H of every layer's input), for several sample counts, in one process (onnxruntime and BLAS
  on every core) and on 1..W local workers (a LocalCluster, one thread each);
- the measured sensitivity probes of `--sensitivity measured` (one model run per layer, on a few samples), in one
  process and on the workers;
- on their own: sending the model to the workers and opening a session on each, fetching one shard's statistics from
  a worker (H of every layer at full size), and the client's merge of a shard (counted inside the passes). Each
  cluster first runs one pass untimed for the table (printed apart): fresh workers open their sessions and first
  allocate their sums then, which a quantization run pays once.

Cost model of a calibration pass over n samples on W workers (shards: onnxq/calibrate/shards.py):

    T = start + W x send + (n x forward + hwork(n) x per_h) x ceil(S / W) / S + S x (fetch + merge)

with S shards (equal shards: each worker runs ceil(S / W) of them one after another)
where hwork(n) = sum over layers of the rows kept for H times K^2 (the moments' planned thinning bounds the rows, so
it stops growing past a few hundred samples; computed from the planner). forward and per_h are measured on one thread
in this process (what a worker runs: the same code), the H sums timed apart, and send alone; start and the cost of a
shard fetched and merged by the client (one after another; on this 2-core machine it shares the cores with the
workers) are fitted by least squares on the worker runs (the fetch and merge of a shard measured alone are printed
beside).
The table prints each measured point beside the model, then what the model says for ResNet-50 at 224x224 with 10,000
calibration samples on 8 and 64 machines with one such worker each (send and fetch measured over loopback; a network
adds to them).

    python tools/bench_scale.py [--samples 16 32 64] [--workers 1 2] [--probe-samples 4]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxq.analysis.sensitivity import SensitivityAnalysis  # noqa: E402
from onnxq.calibrate import shards as shards_module  # noqa: E402
from onnxq.calibrate.collect import Observed, _with_outputs, collect  # noqa: E402
from onnxq.calibrate.moments import LayerInput, MomentCollector, Moments, layer_inputs, packed_size  # noqa: E402
from onnxq.calibrate.placement import activation_sites  # noqa: E402
from onnxq.calibrate.samples import input_specs  # noqa: E402
from onnxq.calibrate.shards import shard_samples, shards  # noqa: E402
from onnxq.config import ActivationConfig, CalibrationMethod, QuantizeConfig  # noqa: E402
from onnxq.pipeline import load_and_prepare, plan_quantization  # noqa: E402
from tools.bench_calibration_memory import resnet50  # noqa: E402
from tools.machine import cpu_description  # noqa: E402

RUN = 4  # samples per calibration run (shards are whole runs)
SIZE = 224
TARGET_SAMPLES = 10_000


@dataclasses.dataclass
class Point:
    """One measured calibration pass."""

    samples: int
    workers: int  # 0: one process, no Dask
    seconds: float
    merge_seconds: float
    shards: int
    hwork: float  # sum of kept rows x K^2 over the readers


class CalibrationPass:
    """The calibration pass of a W4A8 run on the prepared ResNet-50, set up as the pipeline sets it up."""

    def __init__(self) -> None:
        self.config = QuantizeConfig(bits=4, activations=ActivationConfig(bits=8, method=CalibrationMethod.MSE))
        self.loaded = load_and_prepare(resnet50())
        self.plan = plan_quantization(self.loaded, self.config, "data")
        graph = self.loaded.model.graph
        self.sites = [s.tensor for s in activation_sites(graph, self.plan.weights, self.plan.integer_op_nodes, self.config)]
        self.inputs = layer_inputs(graph, self.plan.weights)
        self.rows_per_sample: dict[LayerInput, tuple[int, int]] = {}  # reader -> (rows a sample, K^2 x groups), from a run
        self.shapes: dict[LayerInput, tuple[int, int]] = {}  # reader -> (groups, K) of its H

    def run(self, images: np.ndarray, client: object | None, workers: int, timers: dict[str, float] | None = None) -> Point:
        """Time one pass over ``images``, and the client's merges of the shards (``timers`` also gets the moments' time)."""
        timers = timers if timers is not None else {}
        batches = [{"x": images[i : i + RUN]} for i in range(0, len(images), RUN)]
        moments = MomentCollector(self.inputs, len(images))
        with _timed(Observed, "merge", timers, "merge"), _timed(MomentCollector, "observe", timers, "moments"):
            start = time.perf_counter()
            collect(self.loaded.model, self.sites, batches, total=len(images), moments=moments, client=client)
            seconds = time.perf_counter() - start
        for reader, m in moments.moments.items():
            groups, k = (reader.groups, reader.length) if m.sums is not None else (0, 0)
            self.rows_per_sample[reader] = (m.count // len(images), k * k * groups)
            self.shapes[reader] = (groups, k)
        per_shard = shard_samples(len(images), moments.sums_bytes)
        count = sum(1 for _ in shards(batches, input_specs(self.loaded.model), per_shard))
        return Point(len(images), workers, seconds, timers.get("merge", 0.0), count, self.hwork(len(images)))

    def hwork(self, samples: int) -> float:
        """Sum over readers of the rows the planned thinning keeps of ``samples`` samples times K^2 (times groups)."""
        total = 0.0
        for rows, k2 in self.rows_per_sample.values():
            if not k2:
                continue
            m = Moments()
            expected = rows * samples
            m.plan_stride(expected, int(math.isqrt(k2)))
            total += expected / m.stride * k2
        return total

    def send_seconds(self, client: object) -> float:
        """Sending the exposed model to every worker and opening a session on each (what a pass does first)."""
        payload = _with_outputs(self.loaded.model, self.sites).SerializeToString()
        start = time.perf_counter()
        future = client.scatter(payload, broadcast=True, hash=False)
        opened = [client.submit(_open_session, future, workers=[address], pure=False) for address in client.scheduler_info()["workers"]]
        client.gather(opened)
        return time.perf_counter() - start


    def transfer_seconds(self, client: object) -> float:
        """Fetching one shard's statistics from a worker (serialized, sent, read back), with H of every layer's full size."""
        from distributed import wait

        future = client.submit(_full_result, self.inputs, self.shapes, self.sites, pure=False)
        wait(future)
        start = time.perf_counter()
        future.result()
        return time.perf_counter() - start


def _full_result(inputs: dict, shapes: dict, sites: list[str]) -> Observed:
    """On a worker: a shard's statistics as large as a real one (H sums of every layer's (groups, K), histograms of every site)."""
    from onnxq.calibrate.collect import PassTask

    moments = MomentCollector(inputs)
    observed = PassTask(tuple(sites), tuple(sites), False, True, moments).fresh(moments)
    for reader, m in moments.moments.items():
        groups, k = shapes[reader]
        m.sums, m.linear, m.count = np.zeros((groups, packed_size(k)), dtype=np.float32), np.zeros((groups, k)), 1
    return observed


@contextlib.contextmanager
def _timed(owner: type, name: str, timers: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds spent in ``owner.name`` (in this process) to ``timers[key]`` while the block runs."""
    original = getattr(owner, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            timers[key] = timers.get(key, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run onnxruntime and BLAS on one thread in this process: what a worker of the LocalCluster runs with."""
    from threadpoolctl import threadpool_limits

    import onnxq.calibrate.collect as collect_module

    original = collect_module.session_options
    collect_module.session_options = lambda *args, **kwargs: original(1)  # type: ignore[assignment]
    try:
        with threadpool_limits(1):
            yield
    finally:
        collect_module.session_options = original  # type: ignore[assignment]


def _open_session(payload: bytes) -> bool:
    """On a worker: open a session on the model, as its first shard does."""
    from onnxq.distribute.passes import _session

    return _session(payload, "bench-send") is not None


@dataclasses.dataclass(frozen=True)
class CostModel:
    """The pass's cost: ``start`` fitted, the rest measured alone."""

    start: float
    send: float  # per worker: the model sent and a session opened
    forward: float  # per sample on one worker: the model run, histograms, per-sample statistics, the rows' gathering
    per_h: float  # per unit of H work (a kept row times K^2) on one worker
    per_shard: float  # fetching a shard's statistics to the client and merging them there

    def predict(self, samples: int, workers: int, hwork: float, shard_count: int) -> float:
        """Seconds of a pass over ``samples`` samples in ``shard_count`` equal shards on ``workers`` workers."""
        return self.start + workers * self.send + self.compute(samples, workers, hwork, shard_count) + shard_count * self.per_shard

    def compute(self, samples: int, workers: int, hwork: float, shard_count: int) -> float:
        """The workers' part: each runs ceil(shards / workers) shards of the pass's work one after another."""
        return (samples * self.forward + hwork * self.per_h) * math.ceil(shard_count / workers) / shard_count


def probes(images: np.ndarray, workers: list[int]) -> list[tuple[str, float, int]]:
    """Seconds of the measured probes of every layer at its planned width: one process, then on each worker count."""
    from distributed import Client, LocalCluster

    data = [{"x": images}]
    config = QuantizeConfig(bits=4)
    out = []
    analysis = SensitivityAnalysis(resnet50(), config, data, len(images), nodes=False)
    for plan in analysis.plans:  # quantized before the clock starts: the probes are what is measured
        analysis.dequantized(plan.tensor, plan.bits)
    start = time.perf_counter()
    analysis.layers()
    out.append(("one process", time.perf_counter() - start, len(analysis.plans)))
    for w in workers:
        with LocalCluster(n_workers=w, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
            spread = SensitivityAnalysis(resnet50(), config, data, len(images), nodes=False, client=client)
            for plan in spread.plans:
                spread.dequantized(plan.tensor, plan.bits)
            start = time.perf_counter()
            spread.layers()
            out.append((f"{w} workers", time.perf_counter() - start, len(spread.plans)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--probe-samples", type=int, default=4)
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    print(cpu_description())
    shards_module.MIN_SHARD_SAMPLES = 1  # shards of one run, as a pass of thousands of samples is cut: the scaling on few samples
    images = np.random.default_rng(0).random((max(args.samples), 3, SIZE, SIZE), dtype=np.float32)
    calibration = CalibrationPass()
    print(f"ResNet-50 graph at {SIZE}x{SIZE}, random weights. Calibration pass of W4A8 mse with output-aware moments: "
          f"{len(calibration.sites)} activation sites, {len(calibration.inputs)} weights' H; runs of {RUN} samples\n")
    points = [calibration.run(images[:n], None, 0) for n in args.samples]
    timers: dict[str, float] = {}
    with one_thread():  # the components, as one worker runs them
        alone = calibration.run(images, None, 0, timers)
    send: dict[int, float] = {}
    cold: dict[int, float] = {}
    transfer: list[float] = []
    for workers in args.workers:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
            send[workers] = calibration.send_seconds(client)
            cold[workers] = calibration.run(images[: args.samples[0]], client, workers).seconds  # sessions opened, H first allocated
            points += [calibration.run(images[:n], client, workers) for n in args.samples]
            transfer.append(calibration.transfer_seconds(client))
    merge = float(np.sum([p.merge_seconds for p in points if p.workers]) / np.sum([p.shards for p in points if p.workers]))
    per_h = timers["moments"] / alone.hwork
    forward = (alone.seconds - timers["moments"] - timers["merge"]) / alone.samples
    partial = CostModel(0.0, float(np.mean([s / w for w, s in send.items()])), forward, per_h, 0.0)
    used = [p for p in points if p.workers]
    rest = np.array([p.seconds - partial.predict(p.samples, p.workers, p.hwork, p.shards) for p in used])
    (start, per_shard), *_ = np.linalg.lstsq(np.array([(1.0, p.shards) for p in used]), rest, rcond=None)
    model = dataclasses.replace(partial, start=float(start), per_shard=float(per_shard))
    h_bytes = sum(g * k * k * 8 for g, k in calibration.shapes.values())
    print(f"one thread in this process (a worker's setting), {alone.samples} samples: {alone.seconds:.1f} s, of which H sums "
          f"{timers['moments']:.1f} s and shard merges {timers['merge']:.1f} s\n")
    first = next((p for p in points if p.workers and p.samples == args.samples[0]), None)
    if first is not None:
        print("the first pass on fresh workers (their sessions opened, their sums first allocated) took "
              + ", ".join(f"{w} workers {c:.1f} s" for w, c in cold.items()) + f" for {args.samples[0]} samples; "
              f"the same pass again {', '.join(f'{p.seconds:.1f} s' for p in points if p.workers and p.samples == args.samples[0])}\n")
    print("| samples | workers | shards | measured s | cost model s | client merges s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for p in points:
        predicted = f"{model.predict(p.samples, p.workers, p.hwork, p.shards):.1f}" if p.workers else "-"
        print(f"| {p.samples} | {p.workers or 'one process'} | {p.shards} | {p.seconds:.1f} | {predicted} | {p.merge_seconds:.2f} |")
    print(f"\ncost model: {model.start:.2f} s (fitted) + W x {model.send:.2f} s (send) + (n x {model.forward:.3f} s + hwork(n) x "
          f"{model.per_h * 1e9:.3f} s per 1e9) x ceil(S/W)/S + S x {model.per_shard:.2f} s (fitted: a shard fetched and merged by the "
          f"client in a pass; alone, with the client idle: fetch {np.mean(transfer):.2f} + merge {merge:.2f} s; a shard's H is "
          f"{h_bytes / 2**20:.0f} MB); send, forward and H measured alone")
    print("hwork(n) / 1e9: " + ", ".join(f"n={n}: {calibration.hwork(n) / 1e9:.1f}" for n in [*args.samples, 256, TARGET_SAMPLES]))
    sums_bytes = MomentCollector(calibration.inputs).sums_bytes
    hwork, count = calibration.hwork(TARGET_SAMPLES), math.ceil(TARGET_SAMPLES / shard_samples(TARGET_SAMPLES, sums_bytes))
    for machines in (1, 8, 64):
        total = model.predict(TARGET_SAMPLES, machines, hwork, count)
        compute = model.compute(TARGET_SAMPLES, machines, hwork, count)
        print(f"ResNet-50 {SIZE}x{SIZE}, {TARGET_SAMPLES:,} samples, {machines} machine(s) of one such worker: {total / 60:.1f} min "
              f"(compute {compute / 60:.1f} min, {count} shards fetched and merged on the client {count * model.per_shard / 60:.1f} min, "
              f"send {machines * model.send:.0f} s)")
    print(f"\nMeasured sensitivity probes: every layer at its planned width, {args.probe_samples} samples a run")
    print("| where | layers | seconds |")
    print("|---|---:|---:|")
    for where, seconds, layers in probes(images[: args.probe_samples], args.workers):
        print(f"| {where} | {layers} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
