"""tools/avx2_only.py: under its CPUID mask, onnxq's op library and its Python side see an AVX2-only CPU.

The probe runs in a child process under the tool: the op library must refuse its AVX-512 kernels (kernel=3) and run
its AVX2 ones, onnxq must read no VNNI, and the benchmarks' CPU line must say what is hidden. Where the real CPU has no
AVX-512 VNNI the refusal proves nothing, so that part is skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools import avx2_only  # noqa: E402

REASON = avx2_only.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"tools/avx2_only.py cannot mask this CPU: {REASON}")

PROBE = """
import json, sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from onnxq.native.cpu import cpu_flags, has_vnni
from onnxq.native.domain import DOMAIN, DOMAIN_VERSION
from onnxq.native.session import session
from onnxq.rewrite.ops import pack_rows
from tools.machine import cpu_description

def run(kernel):
    codes = np.random.default_rng(0).integers(-7, 8, size=(16, 16))
    inits = [numpy_helper.from_array(pack_rows(codes, 4), "w"), numpy_helper.from_array(np.full(16, 0.1, np.float32), "s")]
    node = helper.make_node("IntConv", ["x", "w", "s"], ["y"], domain=DOMAIN, bits=4, kernel_shape=[1, 1], kernel=kernel)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    try:
        session(model.SerializeToString()).run(None, {"x": np.ones((1, 16, 4, 4), np.float32)})
        return "ran"
    except Exception as error:
        return str(error)

print(json.dumps({"avx2": run(2), "avx512": run(3), "vnni": has_vnni(), "avx512f": "avx512f" in cpu_flags(),
                  "line": cpu_description()}))
"""


def _probe() -> dict:
    done = subprocess.run([sys.executable, str(REPO / "tools" / "avx2_only.py"), sys.executable, "-c", PROBE],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_under_the_mask_the_ops_run_avx2_and_onnxq_reads_no_avx512():
    seen = _probe()
    assert seen["avx2"] == "ran"
    assert seen["vnni"] is False and seen["avx512f"] is False
    assert "hidden by tools/avx2_only.py's CPUID mask" in seen["line"] and "avx512_vnni" in seen["line"]


def test_under_the_mask_the_op_library_refuses_its_avx512_kernels():
    flags = Path("/proc/cpuinfo").read_text().split()
    if not {"avx512f", "avx512bw", "avx512_vnni"} <= set(flags):
        pytest.skip("the CPU has no AVX-512 VNNI: kernel=3 is refused with or without the mask")
    assert "kernel=3 asks for the AVX-512 kernel, which this CPU does not support" in _probe()["avx512"]


def test_the_tool_says_what_is_missing_for_a_command_it_cannot_run():
    done = subprocess.run([sys.executable, str(REPO / "tools" / "avx2_only.py"), "no-such-command-here"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2 and "cannot run no-such-command-here" in done.stderr


def test_the_activation_tests_pass_as_on_an_avx2_only_cpu():
    """onnxruntime's own kernels change under the mask too (its uint8 x int8 pair sums saturate without VNNI): the W8A8
    and chain tests must hold there as they do here (the whole suite: docs/building.md)."""
    done = subprocess.run([sys.executable, str(REPO / "tools" / "avx2_only.py"), sys.executable, "-m", "pytest", "-q",
                           "-p", "no:cacheprovider", "tests/test_activations.py", "tests/test_chains.py"],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
