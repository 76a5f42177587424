"""What every benchmark prints first: the CPU model and the SIMD flags that matter to us."""

from __future__ import annotations

import platform
from pathlib import Path

INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_description() -> str:
    """One line: CPU model, logical cores and the SIMD flags present."""
    model, flags = platform.processor() or "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    import os

    present = [f for f in INTERESTING_FLAGS if f in flags]
    return f"CPU: {model}, {os.cpu_count()} logical cores, flags: {' '.join(present) or 'none of ' + ' '.join(INTERESTING_FLAGS)}"
