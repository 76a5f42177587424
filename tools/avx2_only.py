"""Run a command as on an AVX2-only CPU: CPUID hides AVX-512, AMX and AVX-VNNI from it, so float and onnxq's ops run AVX2.

    python tools/avx2_only.py python tools/bench_integer.py --models fmnist_resnet20
    python tools/avx2_only.py python -m pytest tests/test_int_conv_u8.py -rs

The forced-AVX2 columns of the benchmarks (the ops' attribute kernel=2) run onnxq's AVX2 kernels against float's
AVX-512 ones, which an AVX2-only CPU does not have: ResNet-20's int model read 1.25x float there where an AVX2-only EPYC
measured 1.46x at an older, slower build. Under this tool onnxruntime's float kernels (MLAS) pick their AVX2 code too,
as do numpy and onnxq's ops (their default kernel), so the ratios compare AVX2 with AVX2.

How: tools/avx2_only/mask_cpuid.c, compiled here once with the C compiler and preloaded (LD_PRELOAD), turns on Linux's
CPUID faulting for the process and answers each CPUID with the AVX-512, AMX and AVX-VNNI bits cleared. onnxq's Python
side reads /proc/cpuinfo, which the mask cannot change, so the same flags go in ONNXQ_CPU_FLAGS_OFF
(onnxq/native/cpu.py), and every benchmark's CPU line says they are hidden. What it is not: an AVX2-only CPU's cores.
The instructions run on this one's ports, caches and clocks (a Zen 2 core, for one, issues fewer vpmaddubsw per cycle),
so read its ratios as the AVX2 code's against AVX2 float on this machine, a closer proxy than the forced columns.

Needs Linux on x86-64 with CPUID faulting (the cpuid_fault flag) and a C compiler (cc); says which is missing.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "avx2_only" / "mask_cpuid.c"

#: The /proc/cpuinfo names of what the mask clears from CPUID leaf 7 (onnxq's Python side reads these).
HIDDEN_FLAGS = ("avx512f", "avx512dq", "avx512ifma", "avx512pf", "avx512er", "avx512cd", "avx512bw", "avx512vl",
                "avx512vbmi", "avx512_vbmi2", "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_4vnniw",
                "avx512_4fmaps", "avx512_vp2intersect", "amx_bf16", "avx512_fp16", "amx_tile", "amx_int8", "avx_vnni",
                "avx512_bf16")


def unavailable() -> str | None:
    """Why the mask cannot run here, or None."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64, this is {sys.platform} on {platform.machine()}"
    cpuinfo = Path("/proc/cpuinfo").read_text()
    if "cpuid_fault" not in cpuinfo.split():
        return "this CPU or its hypervisor has no CPUID faulting (no cpuid_fault flag in /proc/cpuinfo)"
    if shutil.which("cc") is None:
        return "no C compiler (cc) to build tools/avx2_only/mask_cpuid.c"
    return None


def mask_library() -> Path:
    """The compiled mask, built into the temporary directory once per version of its source."""
    source = SOURCE.read_bytes()
    library = Path(tempfile.gettempdir()) / f"onnxq-mask-cpuid-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if not library.exists():
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(partial), str(SOURCE), "-ldl"], check=True)
        partial.replace(library)
    return library


def masked_environment(library: Path) -> dict[str, str]:
    """os.environ with the mask preloaded (before anything already preloaded) and the hidden flags named for onnxq."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(library), env.get("LD_PRELOAD", "")]))
    env["ONNXQ_CPU_FLAGS_OFF"] = " ".join(HIDDEN_FLAGS)
    return env


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    if (why := unavailable()) is not None:
        print(f"avx2_only: cannot mask the CPU: {why}", file=sys.stderr)
        return 2
    env = masked_environment(mask_library())
    try:
        os.execvpe(args[0], args, env)
    except OSError as error:
        print(f"avx2_only: cannot run {args[0]}: {error.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
