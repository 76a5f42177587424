"""Peak memory and time of ``onnxq quantize`` on a generated ~3 GB model with external data.

Not run in CI. The model (a chain of 8192x8192 MatMuls plus two 3x3 Convs, float32
t-distributed weights, fixed seed) is written tensor by tensor into a temporary folder,
so generating it never holds more than one weight. Each quantization runs as a child
process (``python -m onnxq quantize``) whose own peak RSS comes from ``os.wait4``.
Accuracy is not measured here, only memory and time.

    python -m tools.bench_big_model              # -b 4 and -b 8 on a ~3.2 GB model
    python -m tools.bench_big_model --layers 2   # a quick smaller run
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from tools.machine import cpu_description

OPSET = 17  # what exporters commonly write; -b 4 makes onnxq convert it to 21
WIDTH = 8192
CONV_CHANNELS = 1024


def _external_tensor(name: str, values: np.ndarray, data: Path, handle) -> TensorProto:
    """Append ``values`` to the open data file and return an initializer pointing at them."""
    offset = handle.tell()
    raw = np.ascontiguousarray(values, dtype=np.float32)
    handle.write(raw.tobytes())
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=values.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(raw.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _weights(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """Heavy-tailed weights like trained layers have (Student t, 5 degrees of freedom), He-scaled."""
    return (rng.standard_t(5, size=shape) * np.sqrt(2.0 / fan_in / (5 / 3))).astype(np.float32)


def generate(folder: Path, layers: int) -> Path:
    """Write ``big.onnx`` and ``big.onnx.data`` into ``folder``: ``layers`` MatMul+Relu, then two Conv+Relu on a second input."""
    model_path, data_path = folder / "big.onnx", folder / "big.onnx.data"
    rng = np.random.default_rng(20240607)
    inits, nodes = [], []
    with open(data_path, "wb") as handle:
        x = "tokens"
        for i in range(layers):
            inits.append(_external_tensor(f"fc{i}.weight", _weights(rng, (WIDTH, WIDTH), WIDTH), data_path, handle))
            nodes.append(helper.make_node("MatMul", [x, f"fc{i}.weight"], [f"fc{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Relu", [f"fc{i}"], [f"fc{i}.relu"], name=f"fc{i}.relu"))
            x = f"fc{i}.relu"
        y = "image"
        for i in range(2):
            shape = (CONV_CHANNELS, CONV_CHANNELS, 3, 3)
            inits.append(_external_tensor(f"conv{i}.weight", _weights(rng, shape, CONV_CHANNELS * 9), data_path, handle))
            inits.append(helper.make_tensor(f"conv{i}.bias", TensorProto.FLOAT, [CONV_CHANNELS], rng.normal(0, 0.01, CONV_CHANNELS)))
            nodes.append(helper.make_node("Conv", [y, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
            nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"conv{i}.relu"], name=f"conv{i}.relu"))
            y = f"conv{i}.relu"
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [1, WIDTH]),
         helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, CONV_CHANNELS, 8, 8])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, WIDTH]),
         helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, CONV_CHANNELS, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.save_model(model, os.fspath(model_path))
    return model_path


@dataclass
class Run:
    """One child ``onnxq quantize`` run."""

    bits: int
    seconds: float
    peak_bytes: int
    returncode: int
    output_bytes: int
    stderr: str


def quantize_in_child(model: Path, bits: int, extra: list[str]) -> Run:
    """Run ``python -m onnxq quantize`` as a child; its peak RSS comes from wait4 (this child only)."""
    output = model.with_name(f"big.q{bits}.onnx")
    command = [sys.executable, "-m", "onnxq", "quantize", os.fspath(model), "-b", str(bits), "-o", os.fspath(output), *extra]
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.fspath(repo), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        err.seek(0)
        stderr = err.read().decode(errors="replace").strip()
    written = [output, output.with_name(output.name + ".data")]
    size = sum(p.stat().st_size for p in written if p.exists())
    for p in written:
        p.unlink(missing_ok=True)
    return Run(bits, seconds, usage.ru_maxrss * 1024, child.returncode, size, stderr)


def main(argv: list[str] | None = None) -> int:
    """Generate the model, quantize it at each bit width, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="8192x8192 MatMul layers (256 MiB each; default 12)")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8], help="weight bits to run (default 4 8)")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()), help="where the temporary model goes (default /tmp)")
    parser.add_argument("--label", default="", help="a word for the table's first column (e.g. before/after)")
    parser.add_argument("quantize_options", nargs=argparse.REMAINDER, help="after --: more options for onnxq quantize")
    args = parser.parse_args(argv)
    extra = [o for o in args.quantize_options if o != "--"]
    print(cpu_description())
    print(f"numpy {np.__version__}, onnx {onnx.__version__}, python {sys.version.split()[0]}")
    folder = Path(tempfile.mkdtemp(prefix="onnxq_big_", dir=args.folder))
    try:
        start = time.perf_counter()
        model = generate(folder, args.layers)
        size = model.stat().st_size + (folder / "big.onnx.data").stat().st_size
        print(f"model: {args.layers} MatMul 8192x8192 + 2 Conv 1024x1024x3x3, opset {OPSET}, {size / 2**30:.2f} GiB "
              f"with external data, generated in {time.perf_counter() - start:.0f} s")
        print(f"options: -b N {' '.join(extra)}".rstrip())
        print()
        print("| run | bits | model GiB | peak RSS GiB | peak / model | time s | output GiB | exit |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for bits in args.bits:
            run = quantize_in_child(model, bits, extra)
            status = "ok" if run.returncode == 0 else f"{run.returncode}: {run.stderr.splitlines()[-1] if run.stderr else ''}"
            print(f"| {args.label} | {bits} | {size / 2**30:.2f} | {run.peak_bytes / 2**30:.2f} | {run.peak_bytes / size:.2f}x "
                  f"| {run.seconds:.0f} | {run.output_bytes / 2**30:.2f} | {status} |", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
