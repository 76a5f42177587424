"""A calibration pass over shards of the data on Dask workers, merged on the client in the order of the data.

The client reads the data (checked runs, as for a local pass), groups whole runs into the shards a local pass uses
(onnxq/calibrate/shards.py) and sends each to a worker. The model goes to every worker once, and each worker opens
one onnxruntime session on it, which later shards (and later passes over the same model) reuse. A shard's statistics
come back as one object (:class:`~onnxq.calibrate.collect.Observed`), and the client merges them in shard order,
whatever order they finish in, as a local pass merges the same shards: a run with workers computes, bit for bit, what a
run without them does. At most a few shards per worker are in flight, so the client never holds the whole data set.

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
from onnxq.distribute.cluster import first_line, worker_count, worker_threads
from onnxq.errors import OnnxqError
from onnxq.model.load import PROTOBUF_LIMIT, tensor_bytes
from onnxq.native.session import session_options

if TYPE_CHECKING:
    from distributed import Client

#: Shards per worker sent ahead of the results (the client holds at most this many shards' data per worker).
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
        for result in _in_order(client, job, model_bytes, shards(batches, job.specs, shard_samples(total)), workers):
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
    """The shards' statistics in shard order, with at most IN_FLIGHT_PER_WORKER shards per worker sent ahead."""
    import dask
    from distributed import as_completed

    running = as_completed()
    done: dict[int, Observed] = {}
    wanted = 0

    def send() -> bool:
        shard = next(stream, None)
        if shard is None:
            return False
        with dask.config.set({"distributed.admin.large-graph-warning-threshold": LARGE_SHARD}):  # a shard of images is MBs
            running.add(client.submit(run_shard, model_bytes, job, shard.index, shard.first_sample, shard.batches, pure=False))
        return True

    for _ in range(IN_FLIGHT_PER_WORKER * workers):
        if not send():
            break
    for future in running:
        try:
            index, observed = future.result()
        except OnnxqError:
            raise
        except Exception as e:  # noqa: BLE001  (whatever a worker raised, it stops the pass in one line)
            raise OnnxqError(None, f"a Dask worker could not run its calibration shard: {first_line(e)}") from e
        done[index] = observed
        send()
        while wanted in done:
            yield done.pop(wanted)
            wanted += 1


# On each worker process: model digest -> an onnxruntime session, most recently used last.
_sessions: OrderedDict[str, ort.InferenceSession] = OrderedDict()


def run_shard(model_bytes: bytes, job: ShardJob, index: int, first_sample: int, batches: list[dict[str, np.ndarray]]) -> tuple[int, Observed]:
    """On a worker: one shard's statistics, from the worker's session of the model (opened on its first shard)."""
    observed = observe_runs(_session(model_bytes, job.model_key), job.task, batches, job.per_sample_bytes, job.specs, first_sample,
                            into=job.task.fresh_copy())
    return index, observed


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
