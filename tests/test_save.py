"""Writing outputs: a replaced output's external data file goes with it, and sizes count only referenced data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from models import conv_bn_relu_gemm
from onnxq.model.save import referenced_files, save_model
from onnxq.report.summary import file_size


def _big_and_small() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """One model with tensors over 1 KiB (written to external data), one whose tensors all stay inline."""
    return conv_bn_relu_gemm(c=32), conv_bn_relu_gemm(c=2)


def test_an_output_rewritten_without_external_data_takes_its_old_data_file_away(tmp_path: Path):
    big, small = _big_and_small()
    out = tmp_path / "q.onnx"
    save_model(big, out, external_data=True)
    data = tmp_path / "q.onnx.data"
    assert referenced_files(out) == {data.resolve()} and data.is_file()
    save_model(small, out, external_data=True)  # every tensor under the 1 KiB threshold: nothing external
    assert referenced_files(out) == set() and not data.exists()
    assert file_size(out) == out.stat().st_size
    written, wanted = onnx.load(out).graph.initializer[0], small.graph.initializer[0]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(written), onnx.numpy_helper.to_array(wanted))


def test_a_data_file_the_old_output_did_not_use_is_left_alone_and_not_counted(tmp_path: Path):
    _, small = _big_and_small()
    out, data = tmp_path / "q.onnx", tmp_path / "q.onnx.data"
    data.write_bytes(b"someone else's bytes")
    save_model(small, out)
    save_model(small, out)
    assert data.read_bytes() == b"someone else's bytes"
    assert file_size(out) == out.stat().st_size


def test_file_size_counts_every_referenced_data_file(tmp_path: Path):
    big, _ = _big_and_small()
    out = tmp_path / "q.onnx"
    save_model(big, out, external_data=True)
    assert file_size(out) == out.stat().st_size + (tmp_path / "q.onnx.data").stat().st_size
