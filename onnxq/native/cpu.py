"""What the CPU running onnxq can do (read from /proc/cpuinfo on Linux; empty elsewhere)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

#: Flags that mean 8-bit dot products run without 16-bit intermediate sums.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})

#: Space-separated flags to treat as absent. tools/avx2_only.py sets it beside its CPUID mask, which hides them from
#: the op library and onnxruntime but cannot change /proc/cpuinfo.
FLAGS_OFF_VARIABLE = "ONNXQ_CPU_FLAGS_OFF"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The feature flags of the first CPU listed in /proc/cpuinfo, less those FLAGS_OFF_VARIABLE names."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    flags = frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return flags - hidden_flags()


def hidden_flags() -> frozenset[str]:
    """The flags FLAGS_OFF_VARIABLE names (empty when it is not set)."""
    return frozenset(os.environ.get(FLAGS_OFF_VARIABLE, "").split())


def cpu_model() -> str:
    """The CPU's model name, or 'unknown'."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "unknown")


def has_vnni() -> bool:
    """Whether the CPU has VNNI (AVX-512 or AVX) dot-product instructions."""
    return bool(VNNI_FLAGS & cpu_flags())
