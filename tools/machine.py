"""What every benchmark prints first: the CPU model and the SIMD flags that matter to us."""

from __future__ import annotations

import os

from onnxq.native.cpu import cpu_flags, cpu_model, hidden_flags

INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_description() -> str:
    """One line: CPU model, logical cores and the SIMD flags present (and those tools/avx2_only.py hides, if it ran us)."""
    present = [f for f in INTERESTING_FLAGS if f in cpu_flags()]
    line = f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, flags: {' '.join(present) or 'none of ' + ' '.join(INTERESTING_FLAGS)}"
    if hidden := [f for f in INTERESTING_FLAGS if f in hidden_flags()]:
        line += f" (hidden by tools/avx2_only.py's CPUID mask: {' '.join(hidden)}; float and onnxq's ops run their AVX2 code)"
    return line
