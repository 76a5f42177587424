"""How many BLAS threads a layer's matrix work gets: one below a width where threads pay.

OpenBLAS's threads cost more than they bring on the small matrices of most layers (GPTQ's block updates, the Cholesky
factors of a few hundred features) and on the calibration pass's sums of H, whose calls come between onnxruntime's
runs with a few hundred rows each. On 2 cores, one-off runs 2026-12-05: MiniLM's weights (K 384 and 1536) 12.0 s with
two threads, 9.2 s with one; CREPE's calibration sums (K 256-2048) 1.3 s against 0.6 s; its 2048-wide layer's weights
faster with two (a lone ssyrk of 4096 rows: 1.4x faster with two threads at K 2048, 1.7x at 4608).
"""

from __future__ import annotations

import contextlib

from threadpoolctl import threadpool_limits

#: Features (K) from which a layer's matrix work lets BLAS use all its threads.
PARALLEL_FEATURES = 2048


def one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """BLAS on one thread inside the ``with`` block (about 0.1 ms to enter: fine around any matrix product)."""
    return threadpool_limits(1, user_api="blas")


def blas_threads(features: int | None) -> contextlib.AbstractContextManager[object]:
    """One BLAS thread for a layer of fewer than PARALLEL_FEATURES features (None: no matrix work), else BLAS's own."""
    if features is not None and features >= PARALLEL_FEATURES:
        return contextlib.nullcontext()
    return one_blas_thread()
