"""Sensitivity probes on Dask workers: one model run per (layer, width), each worker with its own probe session.

The probe (the float model with its weights as inputs, and the batches it is measured on) goes to every worker once;
each worker opens it once, runs the float reference once, then measures the quantized weights it is sent, one task
per layer and width. The client quantizes the weights and reads the results in the order it asked for them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from onnxq.analysis.sensitivity import Measurement, Probe
from onnxq.distribute.cluster import worker_threads
from onnxq.errors import OnnxqError, first_line

if TYPE_CHECKING:
    from distributed import Client

#: Probes a worker keeps open.
PROBES_KEPT = 1


def measure_on(client: Client, probe: Probe, weights: list[Mapping[str, np.ndarray]], tensors: list[str | None]) -> list[Measurement]:
    """``probe.run(weights[i], tensors[i])`` for every i, on the client's workers; the measurements in that order."""
    portable = probe.portable()
    key = hashlib.sha256(portable[0]).hexdigest()
    shared = client.scatter(portable, broadcast=True, hash=False)  # the model and batches: once to every worker
    futures = [client.submit(run_probe, shared, key, dict(w), tensor, pure=False) for w, tensor in zip(weights, tensors, strict=True)]
    try:
        return client.gather(futures)
    except OnnxqError:
        raise
    except Exception as e:  # noqa: BLE001  (whatever a worker raised stops the analysis in one line)
        raise OnnxqError(None, f"a Dask worker could not run its sensitivity probe: {first_line(e)}") from e


# On each worker process: probe digest -> the opened probe, most recently used last.
_probes: OrderedDict[str, Probe] = OrderedDict()


def run_probe(portable: tuple, key: str, weights: dict[str, np.ndarray], tensor: str | None) -> Measurement:
    """On a worker: one measurement, from the worker's probe (opened on its first task)."""
    if key not in _probes:
        _probes[key] = Probe.reopen(*portable, threads=worker_threads())
        while len(_probes) > PROBES_KEPT:
            _probes.popitem(last=False)
    _probes.move_to_end(key)
    return _probes[key].run(weights, tensor)
