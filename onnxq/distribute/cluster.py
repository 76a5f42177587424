"""A Dask client for the calibration passes: N local worker processes, or a running cluster, with one-line errors.

Local runs use a ``dask.distributed`` LocalCluster, so local and cluster runs share one code path. Each worker has one
thread (its onnxruntime session and BLAS then use one core each; Dask's nanny sets OMP/MKL/OpenBLAS threads to 1).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from onnxq.errors import OnnxqError, first_line

if TYPE_CHECKING:
    from distributed import Client

#: What to install for --workers/--scheduler.
INSTALL_HINT = 'pip install "onnxq[distributed]" (Dask\'s distributed scheduler)'

#: Seconds to wait for a scheduler to answer, and for a cluster to have a worker.
CONNECT_SECONDS = 10


def require_distributed(option: str) -> None:
    """Fail in one line, saying what to install, when ``dask.distributed`` is missing."""
    try:
        import distributed  # noqa: F401
    except ImportError as e:
        raise OnnxqError(None, f"{option} needs {INSTALL_HINT}") from e


@contextlib.contextmanager
def cluster(workers: int | None = None, scheduler: str | None = None) -> Iterator[Client | None]:
    """A client for ``workers`` local processes or the scheduler at ``scheduler``; None (run here) without either."""
    if workers is None and scheduler is None:
        yield None
        return
    if workers is not None and scheduler is not None:
        raise OnnxqError(None, "--workers starts local workers and --scheduler uses a running cluster: give one of them")
    if workers is not None and workers < 1:
        raise OnnxqError(None, f"--workers must be a positive number of processes, got {workers}")
    require_distributed("--workers" if workers is not None else "--scheduler")
    with quiet_dask():
        if scheduler is not None:
            with _connect(scheduler) as client:
                yield client
            return
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=logging.ERROR) as local, Client(local) as client:
            yield client


@contextlib.contextmanager
def quiet_dask() -> Iterator[None]:
    """Dask's own log lines (its INFO on starting, stopping and closed connections) kept off the terminal, unless debugging.

    Dask's loggers log at INFO and pass their records up to the handler the CLI installs, whatever its level.
    """
    logger = logging.getLogger("distributed")
    level = logger.level
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _connect(address: str) -> Iterator[Client]:
    """A client of the running scheduler at ``address`` that has at least one worker."""
    from distributed import Client

    try:
        client = Client(address, timeout=CONNECT_SECONDS)
    except (OSError, TimeoutError, ValueError) as e:
        raise OnnxqError(None, f"cannot reach the Dask scheduler at {address}: {first_line(e)}") from e
    with client:
        try:
            client.wait_for_workers(1, timeout=CONNECT_SECONDS)
        except (OSError, TimeoutError) as e:
            raise OnnxqError(None, f"the Dask scheduler at {address} has no workers (waited {CONNECT_SECONDS} s)") from e
        yield client


def worker_count(client: Client) -> int:
    """How many workers the client's cluster has now."""
    return max(1, len(client.scheduler_info().get("workers", {})))


def worker_threads() -> int | None:
    """The threads of the Dask worker this runs on (None outside a worker: onnxruntime's default)."""
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return None
