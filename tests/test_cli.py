"""The onnxq command line: help, outputs, summaries and one-line errors that leave inputs alone."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import onnx
import pytest
from conftest import CAST_FORM, decoded_weight_counts, decoded_weights, random_feeds, run

from models import conv_bn_relu_gemm
from onnxq import NBitsMode, QuantizeConfig, quantize
from onnxq.cli import build_parser, config_from_args, main


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save_model(conv_bn_relu_gemm(c=32), path)
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--bits", "--output", "--granularity", "--sqrt", "--first-last-bits", "--exclude", "--range", "--external-data", "--matmul-nbits"):
        assert option in text


def test_quantize_writes_default_output_and_summary(model_path, capsys):
    assert main(["quantize", str(model_path), "-b", "4"]) == 0
    out = capsys.readouterr().out
    output = model_path.with_name("net.q4.onnx")
    assert output.exists()
    assert "quantized 3 weight tensors: 1 at 4 bits, 2 at 8 bits" in out
    assert f"wrote {output}" in out and "size:" in out
    feeds = random_feeds(onnx.load(model_path))
    assert run(output, feeds).shape == run(model_path, feeds).shape
    # the file holds the model the API gives for -b 4 (the other options at their defaults)
    assert onnx.load(output).SerializeToString() == quantize(model_path, QuantizeConfig(bits=4)).SerializeToString()


def test_options_reach_the_config(model_path, tmp_path, capsys):
    out_path = tmp_path / "custom.onnx"
    args = ["quantize", str(model_path), "-b", "3", "-o", str(out_path), "--granularity", "tensor", "--sqrt", "off", "--first-last-bits", "3"]
    assert main([*args, "--exclude", "fc", "-v"]) == 0
    text = capsys.readouterr().out
    assert "quantized 2 weight tensors: 2 at 3 bits (0 in sqrt mode)" in text
    assert "fc: excluded by the user" in text
    model = onnx.load(out_path)
    decoded = decoded_weights(model)  # per tensor: scalar scales, no axis
    assert [(w.codes_name, w.scale_shape, w.axis, w.sqrt) for w in decoded] == [("w1_quantized", (), None, False), ("w2_quantized", (), None, False)]


@pytest.mark.parametrize(("flag", "mode"), [
    ([], NBitsMode.AUTO), (["--matmul-nbits", "auto"], NBitsMode.AUTO),
    (["--matmul-nbits", "on"], NBitsMode.ON), (["--matmul-nbits", "off"], NBitsMode.OFF),
])
def test_matmul_nbits_option_reaches_the_config(model_path, tmp_path, flag, mode, capsys):
    """--matmul-nbits picks the NBitsMode (auto by default): with 'on' the small classifier runs as MatMulNBits, else it is decoded at load."""
    args = build_parser().parse_args(["quantize", str(model_path), *flag])
    assert config_from_args(args).matmul_nbits is mode
    out_path = tmp_path / "q.onnx"
    assert main(["quantize", str(model_path), "-o", str(out_path), *flag]) == 0
    written = onnx.load(out_path)
    fc = next(n for n in written.graph.node if n.name == "fc")
    assert fc.op_type == ("MatMulNBits" if mode is NBitsMode.ON else "Gemm")
    assert decoded_weight_counts(written) == {CAST_FORM: 2 if mode is NBitsMode.ON else 3}
    assert ("matrix products: 1 weights run as onnxruntime's MatMulNBits" in capsys.readouterr().out) is (mode is NBitsMode.ON)


def test_matmul_nbits_option_takes_only_its_choices(model_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(model_path), "--matmul-nbits", "yes"])
    assert exit_info.value.code == 2 and "--matmul-nbits" in capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.onnx"
    assert main(["quantize", str(missing)]) == 1
    line = _error_line(capsys)
    assert str(missing) in line and "no such file" in line


def test_not_an_onnx_file(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    digest = _digest(bad)
    assert main(["quantize", str(bad)]) == 1
    assert str(bad) in _error_line(capsys)
    assert _digest(bad) == digest
    assert not (tmp_path / "bad.q4.onnx").exists()


def test_output_equal_to_input_is_refused(model_path, capsys):
    digest = _digest(model_path)
    assert main(["quantize", str(model_path), "-o", str(model_path)]) == 1
    assert "output path is the input" in _error_line(capsys)
    assert _digest(model_path) == digest


def test_output_in_missing_folder(model_path, tmp_path, capsys):
    assert main(["quantize", str(model_path), "-o", str(tmp_path / "missing" / "out.onnx")]) == 1
    assert "does not exist" in _error_line(capsys)


def test_unknown_exclude_name(model_path, capsys):
    assert main(["quantize", str(model_path), "--exclude", "no_such_node"]) == 1
    assert "no_such_node" in _error_line(capsys)
    assert not model_path.with_name("net.q4.onnx").exists()


def test_unsupported_bits_is_a_usage_error(model_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(model_path), "-b", "9"])
    assert exit_info.value.code == 2
    line = _error_line(capsys)
    assert "-b/--bits" in line and "invalid choice: 9" in line


def test_existing_output_is_replaced_only_when_the_new_one_is_good(model_path, tmp_path):
    out_path = tmp_path / "out.onnx"
    out_path.write_bytes(b"old")
    assert main(["quantize", str(model_path), "-o", str(out_path)]) == 0
    assert onnx.load(out_path).graph.node  # replaced by a real model
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.onnx")]  # no temporary left behind


def test_console_entry_point_runs_as_module(model_path):
    proc = subprocess.run([sys.executable, "-m", "onnxq", "quantize", str(model_path), "-b", "8"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
