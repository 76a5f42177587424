"""A calibration pass over shards of the data on Dask workers, merged on the client in the order of the data.

The client reads the data (checked runs, as for a local pass), groups whole runs into the shards a local pass uses
(onnxq/calibrate/shards.py) and sends each to a worker. The model goes to every worker once, and each worker opens
one onnxruntime session on it, which later shards (and later passes over the same model) reuse. A shard's statistics
come back as one object (:class:`~onnxq.calibrate.collect.Observed`), and the client merges them in shard order,
whatever order they finish in, as a local pass merges the same shards: a run with workers computes, bit for bit, what a
run without them does. At most two shards per worker are sent and not yet merged, and a shard's result stays on its
worker until it is merged, so the client holds neither the whole data set nor more than one shard's statistics.

A worker that dies mid-pass loses only the shards it held: the scheduler keeps each shard's data with its task (not
on a worker, where it would die with it) and Dask runs the task again elsewhere; a shard's statistics are merged once,
when its result arrives, so nothing is counted twice.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.calibrate.collect import Observed, PassTask, _with_outputs, observe_runs, progress, sample_bytes
from onnxq.calibrate.samples import InputSpec, input_specs
from onnxq.calibrate.shards import Shard, shard_samples, shards
from onnxq.distribute.cluster import worker_count, worker_threads
from onnxq.errors import OnnxqError, first_line
from onnxq.model.load import PROTOBUF_LIMIT, tensor_bytes
from onnxq.native.session import session_options

if TYPE_CHECKING:
    from distributed import Client

#: Shards per worker sent and not yet merged (their data waits in the scheduler, their results on the workers).
IN_FLIGHT_PER_WORKER = 2
#: Shard data sent with a task without Dask's warning about large task graphs (its default threshold is 10 MB).
LARGE_SHARD = "4GB"
#: Sessions a worker keeps open (a pass of moments only, then the calibration pass, use two exposed models).
SESSIONS_KEPT = 2


def collect_on(client: Client, model: onnx.ModelProto, task: PassTask, batches: Iterable[Mapping[str, np.ndarray]],
               total: int | None, into: Observed) -> None:
    """Add the statistics ``task`` asks for over ``batches`` to ``into``: shard by shard on the client's workers, merged in order."""
    exposed = _with_outputs(model, list(task.fetched))
    if tensor_bytes(exposed) >= PROTOBUF_LIMIT:
        raise OnnxqError(None, "models over 2 GB are not sent to Dask workers yet: quantize without --workers/--scheduler")
    payload = exposed.SerializeToString()
    job = ShardJob(hashlib.sha256(payload).hexdigest(), task, sample_bytes(model, list(task.fetched)), input_specs(model))
    workers = worker_count(client)
    model_bytes = client.scatter(payload, broadcast=True, hash=False)  # once to every worker
    with progress(total) as bar:
        for result in _in_order(client, job, model_bytes, shards(batches, job.specs, shard_samples(total, task.statistics_bytes)), workers):
            into.merge(result)
            bar.update(result.samples)


@dataclass(frozen=True)
class ShardJob:
    """What every shard of a pass runs: the model (by the digest of its bytes), the pass, and how to size its runs."""

    model_key: str
    task: PassTask
    per_sample_bytes: float | None
    specs: list[InputSpec]


def _in_order(client: Client, job: ShardJob, model_bytes: object, stream: Iterator[Shard], workers: int) -> Iterator[Observed]:
    """The shards' statistics in shard order, with at most IN_FLIGHT_PER_WORKER shards per worker not yet merged.

    A shard's result stays on its worker until every shard before it has been merged: the client holds one shard's
    statistics at a time (a ResNet-50's H is about 1 GB), however the shards finish.
    """
    import dask
    from distributed import as_completed

    running = as_completed()
    waiting: dict[int, object] = {}  # shard index -> its future, sent and not yet merged
    finished: set[int] = set()
    index_of: dict[str, int] = {}
    wanted = 0
    exhausted = False

    def fill() -> None:
        nonlocal exhausted
        while not exhausted and len(waiting) < IN_FLIGHT_PER_WORKER * workers:
            shard = next(stream, None)
            if shard is None:
                exhausted = True
                return
            with dask.config.set({"distributed.admin.large-graph-warning-threshold": LARGE_SHARD}):  # a shard of images is MBs
                future = client.submit(run_shard, model_bytes, job, shard.first_sample, shard.batches, pure=False)
            waiting[shard.index], index_of[future.key] = future, shard.index
            running.add(future)

    fill()
    for future in running:
        if future.status == "error":
            _fetch(future)  # raises what the shard raised, in one line
        finished.add(index_of.pop(future.key))
        while wanted in finished:
            observed = _fetch(waiting.pop(wanted))
            finished.discard(wanted)
            wanted += 1
            fill()
            yield observed


def _fetch(future: object) -> Observed:
    """A finished shard's statistics, fetched from its worker."""
    try:
        return future.result()  # type: ignore[attr-defined]
    except OnnxqError:
        raise
    except Exception as e:  # noqa: BLE001  (whatever a worker raised stops the pass in one line)
        raise OnnxqError(None, f"a Dask worker could not run its calibration shard: {first_line(e)}") from e


# On each worker process: model digest -> an onnxruntime session, most recently used last.
_sessions: OrderedDict[str, ort.InferenceSession] = OrderedDict()


def run_shard(model_bytes: bytes, job: ShardJob, first_sample: int, batches: list[dict[str, np.ndarray]]) -> Observed:
    """On a worker: one shard's statistics, from the worker's session of the model (opened on its first shard)."""
    return observe_runs(_session(model_bytes, job.model_key), job.task, batches, job.per_sample_bytes, job.specs, first_sample,
                        into=job.task.fresh_copy())


def _session(model_bytes: bytes, key: str) -> ort.InferenceSession:
    """This worker's session of the model ``key`` names, opened once (one thread per worker thread)."""
    if key in _sessions:
        _sessions.move_to_end(key)
        return _sessions[key]
    try:
        sess = ort.InferenceSession(model_bytes, session_options(threads=worker_threads()), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's exception types are not public
        raise OnnxqError(None, f"onnxruntime on a Dask worker cannot load the model: {first_line(e)}") from e
    _sessions[key] = sess
    while len(_sessions) > SESSIONS_KEPT:
        _sessions.popitem(last=False)
    return sess
