"""The op library under AddressSanitizer and UBSan: the op tests run again against a sanitized build; any report fails.

CMake builds libonnxq_ops.so with ``-DONNXQ_SANITIZE=ON`` (CMakeLists.txt) into build/sanitize, which is git-ignored
and kept, so later runs rebuild only what changed; it reuses the onnxruntime headers that ``pip install .`` fetched into
build/<wheel tag>/ (or ``ONNXQ_ORT_INCLUDE_DIR``), else fetches them itself. The op tests (OP_TESTS) then run in a child
Python with the sanitizer runtimes preloaded (AddressSanitizer must come before every other library), ONNXQ_OPS_LIBRARY
pointing at the sanitized build (onnxq.native.library.get_library_path) and sessions without onnxruntime's memory arena
(tests/sanitized_sessions.py). The child stops at the first report: a read or write out of bounds, a use after free, or
undefined behaviour such as a signed overflow or an out-of-range shift. Its JUnit report says which tests ran: each kernel
(scalar, avx2, avx512) must have run there, or be a skip here that names what the CPU lacks.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
from conftest import REPO, kernel_params

pytestmark = pytest.mark.sanitize

BUILD = REPO / "build" / "sanitize"
OP_TESTS = ["tests/test_int_conv.py", "tests/test_int_conv_u8.py", "tests/test_library.py", "tests/test_op_errors.py", "tests/test_max_pool_q.py"]
RUNTIMES = ["libasan.so", "libubsan.so"]
SANITIZER_OPTIONS = {
    "ASAN_OPTIONS": "detect_leaks=0",  # Python never frees some of its memory, by design
    "UBSAN_OPTIONS": "print_stacktrace=1",
}
# The first line of a report, from each of the sanitizers (UBSan's is "file:line:column: runtime error: ...").
REPORT = re.compile(r"ERROR: (AddressSanitizer|LeakSanitizer)|: runtime error: |SUMMARY: \w+Sanitizer")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: the sanitized build of the op library needs cmake, ninja and a C++ compiler")
    return path


def _check(command: list[str], what: str) -> None:
    """Run a build step; its output only when it fails."""
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"{what} failed ({' '.join(command)}):\n{(result.stdout + result.stderr)[-6000:]}")


def _ort_header_options() -> list[str]:
    """The onnxruntime headers a `pip install .` already fetched, if any and none are given (see cmake/OrtHeaders.cmake)."""
    if os.environ.get("ONNXQ_ORT_INCLUDE_DIR"):
        return []
    fetched = sorted(REPO.glob("build/*/ort-headers/root/usr/include/onnxruntime/onnxruntime_lite_custom_op.h"))
    return [f"-DONNXQ_ORT_INCLUDE_DIR={fetched[0].parent}"] if fetched else []


def _compiler() -> str:
    """The C++ compiler CMake chose for the build."""
    cache = (BUILD / "CMakeCache.txt").read_text()
    match = re.search(r"^CMAKE_CXX_COMPILER:\w+=(.+)$", cache, re.MULTILINE)
    assert match, f"no CMAKE_CXX_COMPILER in {BUILD / 'CMakeCache.txt'}"
    return match.group(1)


def _runtime(compiler: str, name: str) -> str:
    """Where the compiler's sanitizer runtime is; a clear failure where it has none."""
    path = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.isfile(path):
        pytest.fail(
            f"{compiler} has no sanitizer runtime {name}: install it (Debian/Ubuntu: the libasan and libubsan packages that "
            "match the compiler, which `apt-get install g++` brings) to build and test the op library under sanitizers"
        )
    return os.path.realpath(path)


@pytest.fixture(scope="module")
def sanitized() -> dict[str, str]:
    """Build the sanitized library; the environment for a child process that loads it under the sanitizers."""
    cmake = _tool("cmake")
    ninja = _tool("ninja")
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(REPO / "build" / "sanitize.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest runs of other checkouts' users share build/sanitize
        configure = [cmake, "-S", str(REPO), "-B", str(BUILD), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}", "-DONNXQ_SANITIZE=ON"]
        _check(configure + _ort_header_options(), "configuring the sanitized op library")
        runtimes = [_runtime(_compiler(), name) for name in RUNTIMES]
        _check([cmake, "--build", str(BUILD)], "building the sanitized op library")
    library = BUILD / "libonnxq_ops.so"
    assert library.is_file()
    preload = " ".join(runtimes + [os.environ["LD_PRELOAD"]] if os.environ.get("LD_PRELOAD") else runtimes)
    return dict(os.environ, LD_PRELOAD=preload, ONNXQ_OPS_LIBRARY=str(library), **SANITIZER_OPTIONS)


def _run(env: dict[str, str], args: list[str]) -> tuple[int, str]:
    """A child Python in the sanitizers' environment: exit status and all its output."""
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return result.returncode, result.stdout + result.stderr


def _excerpt(output: str) -> str:
    """The first sanitizer report and what follows, or the end of the output."""
    report = REPORT.search(output)
    return output[max(0, report.start() - 1500) : report.start() + 4000] if report else output[-6000:]


def test_harness_sees_a_heap_overflow(sanitized):
    """The preloaded runtime watches the child: a write one byte past a malloc'd buffer is reported, and fails the child."""
    overflow = "import ctypes; b = ctypes.create_string_buffer(4096); ctypes.memset(b, 1, 4097)"
    code, output = _run(sanitized, ["-c", overflow])
    assert code != 0 and re.search(r"ERROR: AddressSanitizer: heap-buffer-overflow", output), _excerpt(output)
    assert REPORT.search(output)


@pytest.fixture(scope="module")
def op_tests(sanitized, tmp_path_factory) -> tuple[int, str, dict[str, tuple[str, str]]]:
    """The op tests run once in the sanitized child: its exit status, its output, and each test's outcome and message."""
    env = dict(sanitized, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    junit = tmp_path_factory.mktemp("sanitized") / "op_tests.xml"
    options = ["-q", "-rs", "--capture=sys", "-p", "no:cacheprovider", "-p", "sanitized_sessions", f"--junitxml={junit}"]
    code, output = _run(env, ["-m", "pytest", *options, *OP_TESTS])
    outcomes = {}
    if junit.is_file():
        for case in ElementTree.parse(junit).iter("testcase"):
            kinds = [(child.tag, child.get("message", "")) for child in case if child.tag in ("skipped", "failure", "error")]
            outcomes[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else ("passed", "")
    return code, output, outcomes


def test_op_tests_under_sanitizers(op_tests):
    code, output, outcomes = op_tests
    if REPORT.search(output):
        pytest.fail(f"a sanitizer report from the op tests:\n{_excerpt(output)}", pytrace=False)
    if code != 0:
        pytest.fail(f"the op tests failed against the sanitized library (exit {code}):\n{_excerpt(output)}", pytrace=False)
    assert re.search(r"\d+ passed", output), output[-3000:]
    assert outcomes, f"the child wrote no JUnit report of its tests:\n{output[-3000:]}"


@pytest.mark.parametrize("kernel", kernel_params())
def test_each_kernel_ran_under_sanitizers(op_tests, kernel):
    """The child ran this kernel's op tests, and skipped none of them for want of an ISA: a kernel the CPU lacks is a
    skip here, so the run under sanitizers does not drop kernels without a word."""
    _, output, outcomes = op_tests
    mine = {name: outcome for name, outcome in outcomes.items() if kernel in re.split(r"[\[\]-]", name.split("::")[-1])}
    passed = [name for name, (kind, _) in mine.items() if kind == "passed"]
    lacking = [name for name, (kind, message) in mine.items() if kind == "skipped" and "CPU lacks" in message]
    failed = [name for name, (kind, _) in mine.items() if kind in ("failure", "error")]
    assert not failed and not lacking, (failed, lacking, output[-3000:])
    assert len(passed) > 100, (len(passed), output[-3000:])


def test_library_path_comes_from_the_environment(sanitized):
    """The child loads the sanitized build, not the installed library."""
    code, output = _run(sanitized, ["-c", "from onnxq.native.library import get_library_path; print(get_library_path())"])
    assert code == 0 and output.strip() == sanitized["ONNXQ_OPS_LIBRARY"], output
    assert Path(output.strip()).parent == BUILD
