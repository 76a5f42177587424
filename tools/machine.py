"""What every benchmark prints first: the CPU model and the SIMD flags that matter to us."""

from __future__ import annotations

import os

from onnxq.native.cpu import cpu_flags, cpu_model

INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_description() -> str:
    """One line: CPU model, logical cores and the SIMD flags present."""
    present = [f for f in INTERESTING_FLAGS if f in cpu_flags()]
    return f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, flags: {' '.join(present) or 'none of ' + ' '.join(INTERESTING_FLAGS)}"
