"""Handing freed heap memory back to the system (onnxq/numerics/memory.py)."""

from __future__ import annotations

import ctypes
import resource

import numpy as np
import pytest

from onnxq.numerics.memory import release_free_memory

BLOCK = 64 << 10  # below glibc's smallest mmap threshold: these blocks come from its heap


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "malloc_trim")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc_trim only")
def test_freed_heap_below_a_live_block_goes_back():
    """64 MB freed under a block still in use stays resident until it is handed back."""
    blocks = [np.ones(BLOCK // 8) for _ in range(1024)]
    pin = np.ones(BLOCK // 8)  # above them in the heap: glibc cannot shrink the heap past it
    del blocks
    before = _resident_mb()
    assert release_free_memory()
    assert before - _resident_mb() > 32
    assert pin.sum() == BLOCK // 8
