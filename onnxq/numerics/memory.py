"""Handing the memory the C library keeps after it is freed back to the system, before a weight's H is made.

glibc keeps freed blocks below its mmap threshold (raised to the largest block freed so far, up to 32 MiB) in its heap
and gives the heap back only from its top. After the calibration pass the heap holds the freed onnxruntime session and
the pass's buffers, often below something still in use, so none of it goes back; a weight's H then comes on top of
it: a 2048-wide H is 32 MiB of float64, which glibc always maps anew. CREPE's added peak (tools/eval_real_models.py
--cases pitch, -b 4 with data) ranged 76-126 MB from run to run by how much the heap kept (up to 50 MB free), 75-84 MB
with the free memory handed back before each H (one-off runs, 2026-12-06; BENCHMARKS.md).

``malloc_trim`` only returns pages that are free: it changes no setting of the allocator of the caller's process and no
number onnxq computes (later allocations fault their pages in again: the 6 and 20 calls on CREPE and orientation cost
3 and 14 ms). Elsewhere (musl, macOS, Windows) this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def _trim() -> Callable[[int], int] | None:
    """The C library's ``malloc_trim`` where this process has one (glibc), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # another C library
        return None


def release_free_memory() -> bool:
    """Give the C library's free heap pages back to the system (glibc); whether it could be asked."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True
