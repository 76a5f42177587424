"""How many BLAS threads a layer's matrix work gets: one below a width where threads pay.

OpenBLAS's threads cost more than they bring on the small matrices of most layers (GPTQ's block updates, the Cholesky
factors of a few hundred features) and on the calibration pass's sums of H, whose calls come between onnxruntime's
runs with a few hundred rows each. On 2 cores, one-off runs 2026-12-05: MiniLM's weights (K 384 and 1536) 12.0 s with
two threads, 9.2 s with one; CREPE's calibration sums (K 256-2048) 1.3 s against 0.6 s. On an idle machine two threads
were faster for a 2048-wide layer (a lone ssyrk of 4096 rows: 1.4x at K 2048, 1.7x at 4608), but with anything else
running on the second core OpenBLAS's waiting threads collapse: the Cholesky factor and inverse of a 2048-wide H took
4.9 s on two threads against 0.2 s on one (one-off, another build running beside it). The width from which threads
are allowed is therefore far above the real models' (8192).
"""

from __future__ import annotations

import contextlib
import functools

import numpy  # noqa: F401  (numpy's OpenBLAS and scipy's, loaded before the controller looks for libraries)
import scipy.linalg  # noqa: F401
from threadpoolctl import ThreadpoolController

#: Features (K) from which a layer's matrix work lets BLAS use all its threads.
PARALLEL_FEATURES = 8192


@functools.cache
def _controller() -> ThreadpoolController:
    """The BLAS libraries loaded in this process (numpy's and scipy's), found once.

    threadpoolctl's threadpool_limits looks them up again on every call, reading the process's memory map: 0.7 ms a
    call, 13 s of the layout detector's mixed-precision run (19088 calls from the calibration pass's sums of H).
    """
    return ThreadpoolController()


def one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """BLAS on one thread inside the ``with`` block (a few microseconds to enter: fine around any matrix product)."""
    return _controller().limit(limits=1, user_api="blas")


def blas_threads(features: int | None) -> contextlib.AbstractContextManager[object]:
    """One BLAS thread for a layer of fewer than PARALLEL_FEATURES features (None: no matrix work), else BLAS's own."""
    if features is not None and features >= PARALLEL_FEATURES:
        return contextlib.nullcontext()
    return one_blas_thread()
