"""Calibration and sensitivity passes against the number of Dask workers, and the cost model they fit.

The model is ResNet-50's graph at 224x224 with random weights (tools/bench_calibration_memory.py builds it: time does
not depend on the weight values), the data random images. Measured, one run each, on this machine:

- the calibration pass of `onnxq quantize -b 4 --calibration DATA` (W4A8, mse: histograms of every activation site and
  the second moments H of every layer's input) in one process, and on 1..W local workers (a LocalCluster, one thread
  each), for several sample counts;
- the passes of mixed precision: the proxy's H pass, and the measured probes of `--sensitivity measured` (one model run
  per layer and width), in one process and on the workers;
- the parts of the cost model, each timed on its own: a worker's time per sample, sending the model to the workers and
  opening their sessions, and the client's merge of one shard's statistics.

The cost model of a pass over n samples on W workers is  T = start + W x send + (n / W) x per_sample + shards x merge,
with shards = SHARDS_PER_WORKER x W (onnxq/distribute/passes.py). The table prints each measured point beside the
model's prediction, then what the model says for ResNet-50 at 224x224 with 10,000 calibration samples on 8 and 64
machines like one worker here (the send and merge terms measured on loopback; a network adds to them).

    python tools/bench_scale.py [--samples 8 16 32] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxq.calibrate.collect import Observed, collect  # noqa: E402
from onnxq.calibrate.moments import MomentCollector, layer_inputs  # noqa: E402
from onnxq.calibrate.placement import activation_sites  # noqa: E402
from onnxq.config import ActivationConfig, CalibrationMethod, QuantizeConfig  # noqa: E402
from onnxq.distribute import passes  # noqa: E402
from onnxq.pipeline import load_and_prepare, plan_quantization  # noqa: E402
from tools.bench_calibration_memory import resnet50  # noqa: E402
from tools.machine import cpu_description  # noqa: E402

RUN = 8  # samples per calibration run


@dataclasses.dataclass
class Point:
    """One measured pass."""

    samples: int
    workers: int  # 0: one process, no Dask
    seconds: float
    merge_seconds: float = 0.0
    shards: int = 0


class Calibration:
    """The calibration pass of a W4A8 run on the prepared model, as the pipeline sets it up."""

    def __init__(self, samples: int) -> None:
        self.config = QuantizeConfig(bits=4, activations=ActivationConfig(bits=8, method=CalibrationMethod.MSE, samples=samples))
        self.loaded = load_and_prepare(resnet50())
        self.plan = plan_quantization(self.loaded, self.config, "data")
        graph = self.loaded.model.graph
        self.sites = [s.tensor for s in activation_sites(graph, self.plan.weights, self.plan.integer_op_nodes, self.config)]
        self.inputs = layer_inputs(graph, self.plan.weights)

    def run(self, images: np.ndarray, client: object | None) -> Point:
        """Time one pass over ``images`` (and the client's merges, when on workers)."""
        merges = [0.0, 0]
        original = Observed.merge

        def timed(self_: Observed, other: Observed) -> None:
            start = time.perf_counter()
            original(self_, other)
            merges[0] += time.perf_counter() - start
            merges[1] += 1

        Observed.merge = timed  # type: ignore[method-assign]
        try:
            batches = [{"x": images[i : i + RUN]} for i in range(0, len(images), RUN)]
            moments = MomentCollector(self.inputs, len(images))
            start = time.perf_counter()
            collect(self.loaded.model, self.sites, batches, total=len(images), moments=moments, client=client)
            seconds = time.perf_counter() - start
        finally:
            Observed.merge = original  # type: ignore[method-assign]
        workers = 0 if client is None else passes.worker_count(client)
        return Point(len(images), workers, seconds, merges[0], merges[1])


def send_seconds(client: object, calibration: Calibration) -> float:
    """Sending the exposed model to every worker and opening a session there (a pass over one sample, less that sample)."""
    from onnxq.calibrate.collect import _with_outputs

    payload = _with_outputs(calibration.loaded.model, calibration.sites).SerializeToString()
    start = time.perf_counter()
    future = client.scatter(payload, broadcast=True, hash=False)
    client.run(lambda: None)
    del future
    return time.perf_counter() - start


def fit(points: list[Point]) -> tuple[float, float, float, float]:
    """(start, send per worker, seconds per sample per worker, merge per shard) by least squares over the worker runs."""
    rows = [(1.0, p.workers, p.samples / p.workers, p.shards) for p in points if p.workers]
    times = [p.seconds for p in points if p.workers]
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(times), rcond=None)
    return tuple(float(c) for c in coef)  # type: ignore[return-value]


def predict(model: tuple[float, float, float, float], samples: int, workers: int) -> float:
    start, send, per_sample, merge = model
    return start + workers * send + samples / workers * per_sample + passes.SHARDS_PER_WORKER * workers * merge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    print(cpu_description())
    rng = np.random.default_rng(0)
    images = rng.random((max(args.samples), 3, 224, 224), dtype=np.float32)
    calibration = Calibration(max(args.samples))
    print(f"ResNet-50 graph at 224x224, random weights; calibration pass of W4A8 mse with output-aware moments "
          f"({len(calibration.sites)} activation sites, {len(calibration.inputs)} weights' H); runs of {RUN} samples\n")
    points = [calibration.run(images[:n], None) for n in args.samples]
    sends = {}
    for workers in args.workers:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
            sends[workers] = send_seconds(client, calibration)
            points += [calibration.run(images[:n], client) for n in args.samples]
    model = fit(points)
    print("| samples | workers | measured s | cost model s | shards | client merges s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for p in points:
        predicted = f"{predict(model, p.samples, p.workers):.1f}" if p.workers else "-"
        print(f"| {p.samples} | {p.workers or 'one process'} | {p.seconds:.1f} | {predicted} | {p.shards or '-'} | {p.merge_seconds:.2f} |")
    start, send, per_sample, merge = model
    print(f"\ncost model: {start:.2f} s + W x {send:.2f} s + n/W x {per_sample:.3f} s + {passes.SHARDS_PER_WORKER}W shards x {merge:.3f} s")
    print("measured alone: send model + open sessions " + ", ".join(f"{w} workers {s:.2f} s" for w, s in sends.items()))
    for machines in (8, 64):
        total = predict(model, 10_000, machines)
        print(f"ResNet-50 224x224, 10,000 samples, {machines} machines (one worker each, like this one): {total / 60:.1f} min "
              f"(compute {10_000 / machines * per_sample / 60:.1f} min, merges {passes.SHARDS_PER_WORKER * machines * merge / 60:.1f} min)")
    print(f"one process, 10,000 samples: {10_000 * per_sample / 60:.0f} min at the workers' per-sample time")


if __name__ == "__main__":
    main()
