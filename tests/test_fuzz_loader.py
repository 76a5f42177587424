"""Mutation fuzzing of the loader and the whole quantize run, with hypothesis.

Starting from the serialized bytes of the tiny test models, bytes are flipped, set,
deleted, inserted or cut off, anywhere or inside a weight's raw data (where the protobuf
stays valid and the damage reaches the numerics). Whatever comes out, ``onnxq quantize``
must either write a model that passes onnx.checker or print one clean error line; it
never raises, never prints a traceback or an 'unexpected' error, never touches the input
and never leaves files behind. Runs are derandomized with a fixed example count, so CI
runs the same examples in bounded time; ONNXQ_FUZZ_EXAMPLES asks for a longer run.

Crashes found this way are fixed and kept as plain tests in test_bad_input.py (NaN/Inf
weight bytes, names that are not UTF-8, tensor data longer than its shape, Constant
values, unfoldable BatchNorms, models onnxruntime refuses).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import conv_bn_relu_gemm, conv_then_if, depthwise_convtranspose, matmul_then_loop, matmul_then_scan, shared_weight_matmuls
from onnxq.cli import main
from onnxq.errors import OnnxqError
from onnxq.pipeline import quantize_with_report

FUZZ = settings(
    max_examples=int(os.environ.get("ONNXQ_FUZZ_EXAMPLES", "250")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _seed(model: onnx.ModelProto) -> tuple[bytes, list[tuple[int, int]]]:
    """A model's bytes and where each initializer's raw data lies in them."""
    data = model.SerializeToString()
    spans = []
    for tensor in model.graph.initializer:
        if tensor.raw_data:
            start = data.index(tensor.raw_data)
            spans.append((start, start + len(tensor.raw_data)))
    return data, spans


SEEDS = {
    "conv_bn_relu_gemm": _seed(conv_bn_relu_gemm(c=4)),
    "constants": _seed(conv_bn_relu_gemm(c=4, as_constants=True)),
    "shared_weight_matmuls": _seed(shared_weight_matmuls()),
    "depthwise_convtranspose": _seed(depthwise_convtranspose()),
    "conv_then_if": _seed(conv_then_if()),
    "matmul_then_loop": _seed(matmul_then_loop()),
    "matmul_then_scan": _seed(matmul_then_scan()),
}

MUTATIONS = ("flip", "set", "delete", "insert", "truncate", "flip in tensor", "set in tensor")


@st.composite
def mutated_models(draw: st.DrawFn) -> bytes:
    """The bytes of one seed model after one to three mutations."""
    data, spans = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        if not out:
            break
        kind = draw(st.sampled_from(MUTATIONS))
        if kind.endswith("in tensor") and spans:
            start, end = draw(st.sampled_from(spans))
            at = min(draw(st.integers(start, end - 1)), len(out) - 1)
        else:
            at = draw(st.integers(0, len(out) - 1))
        if kind.startswith("flip"):
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind.startswith("set"):
            out[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
        elif kind == "delete":
            del out[at : at + draw(st.integers(1, 8))]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            del out[at:]
    return bytes(out)


def _quantize_cli(model: Path, output: Path) -> tuple[int, str]:
    """Exit status and stderr of ``onnxq quantize``; numpy's RuntimeWarnings count as failures, not as noise."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        status = main(["quantize", str(model), "-b", "4", "-o", str(output)])
    return status, err.getvalue()


@FUZZ
@given(data=mutated_models())
def test_mutated_model_bytes_give_a_checked_model_or_one_clean_error(data: bytes):
    with tempfile.TemporaryDirectory() as folder:
        model, output = Path(folder) / "in.onnx", Path(folder) / "out.onnx"
        model.write_bytes(data)
        status, err = _quantize_cli(model, output)
        assert model.read_bytes() == data
        if status == 0:
            assert sorted(p.name for p in Path(folder).iterdir()) == ["in.onnx", "out.onnx"]
            onnx.checker.check_model(str(output))
        else:
            assert status == 1
            lines = err.splitlines()
            assert len(lines) == 1, err
            assert lines[0].startswith("onnxq: error: ") and "unexpected" not in lines[0], lines[0]
            assert [p.name for p in Path(folder).iterdir()] == ["in.onnx"]


@FUZZ
@given(data=mutated_models())
def test_mutated_models_in_memory_raise_only_onnxq_errors(data: bytes):
    """The API on a ModelProto (no file): a result or an OnnxqError, nothing else."""
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # not protobuf at all: the caller's parse, not onnxq's, fails
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            result = quantize_with_report(proto)
        except OnnxqError as e:
            assert str(e).startswith("<model>: ") and "\n" not in str(e)
        else:
            assert result.layers
