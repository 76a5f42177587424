"""The README's opening commands stay true: CI runs the test line, and the quantize line works."""

from __future__ import annotations

import shlex

import onnx
from conftest import REPO

from onnxq.cli import main


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines()]


def test_ci_runs_the_readme_test_command():
    install_and_test = _readme_commands()[1]
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert install_and_test in ci_lines


def test_readme_quantize_command_runs(tmp_path, capsys):
    # "pip install . && onnxq quantize models/... -b 4": run the onnxq part, writing under tmp_path.
    command = _readme_commands()[0].split("&&")[1]
    argv = shlex.split(command)
    assert argv[0] == "onnxq"
    model = REPO / argv[2]
    assert model.exists(), f"the README quantizes {model}, which must be shipped"
    out = tmp_path / "out.onnx"
    assert main([*argv[1:], "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    onnx.checker.check_model(str(out))
