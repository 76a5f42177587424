"""pytest plugin for the run under sanitizers (tests/test_sanitizers.py): onnxq's sessions without onnxruntime's memory arena.

With the arena, tensors are carved out of a few large blocks, so a kernel writing past its output tensor writes into the
next one, unseen; without it each tensor is its own allocation, with AddressSanitizer's red zone right after it.
"""

from __future__ import annotations

import onnxruntime as ort

import onnxq.native.session

_session_options = onnxq.native.session.session_options


def _without_arena(threads: int | None = None, custom_ops: bool = False) -> ort.SessionOptions:
    options = _session_options(threads, custom_ops)
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return options


onnxq.native.session.session_options = _without_arena
