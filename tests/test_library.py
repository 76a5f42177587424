"""onnxq's C++ op library (libonnxq_ops.so): it loads, QuantizeDynamicU8 equals onnxruntime and numpy, its kernels agree.

The library exists only once onnxq is built (``pip install .``); see onnxq.native.library.get_library_path.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import KERNELS, kernel_params, kernel_really_supported
from onnx import TensorProto, helper

from onnxq.errors import OnnxqError
from onnxq.native.domain import DOMAIN
from onnxq.native.library import get_library_path
from onnxq.native.session import session


def _model(op_type: str, domain: str, x_type: int = TensorProto.FLOAT, **attributes: int) -> bytes:
    """One node, any-shaped X in:

    X ─► op_type ─► Y (uint8), scale (float), zero_point (uint8)
    """
    node = helper.make_node(op_type, ["X"], ["Y", "scale", "zero_point"], domain=domain, **attributes)
    outputs = [("Y", TensorProto.UINT8), ("scale", TensorProto.FLOAT), ("zero_point", TensorProto.UINT8)]
    graph = helper.make_graph(
        [node],
        op_type,
        [helper.make_tensor_value_info("X", x_type, None)],
        [helper.make_tensor_value_info(name, elem, None) for name, elem in outputs],
    )
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


@functools.cache
def _onnxq_session(kernel: str) -> ort.InferenceSession:
    """QuantizeDynamicU8 with the given kernel, through onnxq's session helper (which registers the library)."""
    return session(_model("QuantizeDynamicU8", DOMAIN, kernel=KERNELS[kernel]))


@functools.cache
def _standard_session() -> ort.InferenceSession:
    """onnxruntime's own DynamicQuantizeLinear."""
    return ort.InferenceSession(_model("DynamicQuantizeLinear", ""), providers=["CPUExecutionProvider"])


def _run(x: np.ndarray, kernel: str = "auto") -> list[np.ndarray]:
    return _onnxq_session(kernel).run(None, {"X": x})


def _reference(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """DynamicQuantizeLinear in float32 numpy, with onnxruntime's scale 1 for an all-zero or empty X."""
    lo = np.float32(min(0.0, x.min())) if x.size else np.float32(0)
    hi = np.float32(max(0.0, x.max())) if x.size else np.float32(0)
    scale = np.float32(1) if hi == lo else (hi - lo) / np.float32(255)
    zero_point = np.rint(np.clip(np.float32(0) - lo / scale, 0, 255))  # rint: half to even
    y = np.clip(np.rint(x / scale) + zero_point, 0, 255)
    return y.astype(np.uint8), np.float32(scale), np.uint8(zero_point)


def _assert_same(actual: list[np.ndarray], expected: list[np.ndarray] | tuple) -> None:
    """Bit for bit: shapes, dtypes and bytes of Y, scale and zero_point."""
    for got, want in zip(actual, expected):
        want = np.asarray(want)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


SHAPES = [(1,), (7,), (8,), (31,), (32,), (33,), (100,), (3, 5, 7), (2, 3, 17, 65), (0,), (2, 0, 3), (1, 1, 1, 1), (4099,)]


def _inputs() -> list[tuple[str, np.ndarray]]:
    """Random and special inputs on odd and empty shapes."""
    rng = np.random.default_rng(0)
    cases = []
    for shape in SHAPES:
        cases.append((f"normal{shape}", (rng.standard_normal(shape) * 3 + rng.uniform(-2, 2)).astype(np.float32)))
        cases.append((f"positive{shape}", rng.uniform(0.1, 5, shape).astype(np.float32)))
        cases.append((f"negative{shape}", rng.uniform(-5, -0.1, shape).astype(np.float32)))
    for value in (0.0, 2.5, -7.0, 1e-30, 3e38):
        cases.append((f"constant{value}", np.full((5, 9), value, np.float32)))
    cases.append(("tiny", (rng.standard_normal(77) * 1e-36).astype(np.float32)))
    cases.append(("huge", (rng.standard_normal(77) * 1e37).astype(np.float32)))
    return cases


INPUTS = _inputs()


def test_library_is_installed_and_exports_only_register_custom_ops():
    path = Path(get_library_path())
    assert path.is_file() and path.name == "libonnxq_ops.so"
    assert ctypes.CDLL(str(path)).RegisterCustomOps  # the symbol onnxruntime looks up
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
    assert [line.split()[-1] for line in symbols.splitlines()] == ["RegisterCustomOps"]


def test_environment_variable_names_another_build(monkeypatch, tmp_path):
    """ONNXQ_OPS_LIBRARY: sessions load that file (here a copy of the library); a missing one is a one-line error."""
    copy = tmp_path / "other" / "libonnxq_ops.so"
    copy.parent.mkdir()
    shutil.copyfile(get_library_path(), copy)
    monkeypatch.setenv("ONNXQ_OPS_LIBRARY", str(copy))
    assert get_library_path() == str(copy)
    _assert_same(session(_model("QuantizeDynamicU8", DOMAIN)).run(None, {"X": INPUTS[0][1]}), _reference(INPUTS[0][1]))
    monkeypatch.setenv("ONNXQ_OPS_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(OnnxqError, match=r"^\S+/missing.so: no such op library file \(named by the environment variable ONNXQ_OPS_LIBRARY\)$"):
        get_library_path()
    with pytest.raises(OnnxqError, match="missing.so: no such op library file"):
        session(_model("QuantizeDynamicU8", DOMAIN))


@pytest.mark.parametrize("name,x", INPUTS, ids=[name for name, _ in INPUTS])
def test_equals_onnxruntime_and_numpy(name, x):
    expected = _standard_session().run(None, {"X": x})
    _assert_same(expected, _reference(x))  # the numpy reference is right...
    _assert_same(_run(x), expected)  # ...and so is the op


@pytest.mark.parametrize("kernel", kernel_params())
def test_each_kernel_equals_numpy(kernel):
    for _, x in INPUTS:
        _assert_same(_run(x, kernel), _reference(x))


def test_rounds_half_to_even_by_hand():
    # Range [0, 255]: scale 1, zero point 0, so Y is X rounded: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
    y, scale, zero_point = _run(np.array([0, 0.5, 1.5, 2.5, 255], np.float32))
    assert y.tolist() == [0, 0, 2, 2, 255] and scale == 1 and zero_point == 0
    # Range [-2.5, 252.5]: scale 1, zero point round(2.5) = 2; -2.5 -> -2 + 2, 252.5 -> 252 + 2.
    x = np.array([-2.5, 252.5], np.float32)
    y, scale, zero_point = _run(x)
    assert y.tolist() == [0, 254] and scale == 1 and zero_point == 2
    _assert_same([y, scale, zero_point], _standard_session().run(None, {"X": x}))


@pytest.mark.parametrize("kernel", kernel_params("avx2", "avx512"))
def test_simd_kernel_equals_scalar_kernel(kernel):
    """Every length up to 100 (all loop tails), and NaN and infinities, which onnxruntime does not define."""
    rng = np.random.default_rng(1)
    cases = [rng.standard_normal(n).astype(np.float32) * 10 for n in range(101)]
    for special in (np.nan, np.inf, -np.inf):
        for n in (1, 9, 40, 67):
            x = rng.standard_normal(n).astype(np.float32)
            x[rng.integers(0, n, 1 + n // 8)] = special
            cases.append(x)
    for x in cases:
        _assert_same(_run(x, kernel), _run(x, "scalar"))


def test_int32_input_is_an_onnxruntime_error():
    with pytest.raises(Exception, match=r"tensor\(int32\).*QuantizeDynamicU8"):
        session(_model("QuantizeDynamicU8", DOMAIN, x_type=TensorProto.INT32))


def test_scalar_input_is_an_onnxruntime_error():
    with pytest.raises(Exception, match=r"QuantizeDynamicU8: input X must have rank >= 1"):
        _run(np.array(1.5, np.float32))


def test_bad_kernel_attribute_is_an_onnxruntime_error():
    bad = session(_model("QuantizeDynamicU8", DOMAIN, kernel=7))
    with pytest.raises(Exception, match=r"attribute kernel must be 0 \(auto\), 1 \(scalar\), 2 \(AVX2\) or 3 \(AVX-512\), not 7"):
        bad.run(None, {"X": np.ones(3, np.float32)})


@pytest.mark.parametrize("kernel", ["avx2", "avx512"])
def test_kernel_the_cpu_lacks_is_an_onnxruntime_error(kernel):
    """The op library checks the real CPU (ONNXQ_TEST_CPU_FLAGS does not reach it): only a CPU without the kernel can test this."""
    if kernel_really_supported(kernel):
        pytest.skip(f"this CPU has {kernel}: the op library runs it, so there is no refusal to see")
    with pytest.raises(Exception, match="which this CPU does not support"):
        _run(np.ones(3, np.float32), kernel)
