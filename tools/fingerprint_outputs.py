"""Fingerprints of what onnxq writes, to show that a refactoring changed no output.

Runs a fixed matrix of ``onnxq quantize`` command lines (the README's among them) over the shipped models, and of
Python API calls over the tiny models of ``tests/models.py``, and records for each the SHA-256 of the written model
(and external data), of the report JSON where one is written, and the text the command printed. Run it before a change
with ``--write before.json`` and after it with ``--compare before.json``: it lists every case whose output differs and
exits non-zero if any does. Compare on the same machine (reduce-range follows the CPU's VNNI flag).

    python tools/fingerprint_outputs.py --write /tmp/before.json
    python tools/fingerprint_outputs.py --compare /tmp/before.json

It runs the onnxq of the checkout it sits in (its compiled libraries from the installed package), reads Fashion-MNIST
itself (IDX files) and uses only onnxq's command line and its public API, so the same script runs on both sides of a
change that moves modules.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's onnxq, in this process and (PYTHONPATH) in the commands it runs
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
SHIPPED = ("fmnist_resnet20", "fmnist_mobilenetv2", "fmnist_vit")
FASHION = Path("/usr/share/datasets/fashion-mnist")
WORK = Path("/tmp/onnxq_fingerprints")  # a fixed folder: printed paths are part of the fingerprint

#: Command-line cases: a name and the options after ``onnxq quantize MODEL -o OUT``. CAL and SENS stand for data files.
CLI_CASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("b4", ("-b", "4")),  # the README's first command
    ("b8", ("-b", "8")),
    ("b2_tensor_sqrt", ("-b", "2", "--granularity", "tensor", "--sqrt", "on")),
    ("b3_absmax_plain", ("-b", "3", "--sqrt", "off", "--range", "absmax", "-v")),
    ("b6_fl4", ("-b", "6", "--first-last-bits", "4")),
    ("int4", ("-b", "4", "--format", "int", "-v")),
    ("int8", ("-b", "8", "--format", "int")),
    ("post3", ("-b", "3", "--format", "post")),
    ("w4a8", ("-b", "4", "--calibration", "CAL", "--calibration-size", "128", "--report", "REPORT")),
    ("w8a8", ("-b", "8", "--calibration", "CAL", "--calibration-size", "128")),
    ("w8a8_minmax", ("-b", "8", "--calibration", "CAL", "--calibration-size", "64", "--calibrate", "minmax", "--reduce-range", "on")),
    ("w4a8_entropy", ("-b", "4", "--calibration", "CAL", "--calibration-size", "64", "--calibrate", "entropy")),
    ("w4a8_percentile_measured", ("-b", "4", "--calibration", "CAL", "--calibration-size", "64", "--calibrate", "percentile",
                                  "--bias-correction", "measured")),
    ("w4a8_asq", ("-b", "4", "--calibration", "CAL", "--calibration-size", "128", "--calibrate", "asq")),
    ("w4a8_asq_int", ("-b", "4", "--calibration", "CAL", "--calibration-size", "128", "--calibrate", "asq", "--format", "int")),
    ("w4a8_int", ("-b", "4", "--calibration", "CAL", "--calibration-size", "64", "--format", "int", "--bias-correction", "off")),
    ("w3a8_post", ("-b", "3", "--calibration", "CAL", "--calibration-size", "64", "--format", "post")),
    ("w4a4", ("-b", "4", "--calibration", "CAL", "--calibration-size", "64", "--activations", "4")),
    ("target_size", ("-b", "4", "--sensitivity-data", "SENS", "--sensitivity-size", "32", "--target-size", "5bits", "--report", "REPORT")),
    ("max_drop", ("-b", "2", "--sensitivity-data", "SENS", "--sensitivity-size", "32", "--max-drop", "6")),
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


def fashion_images(count: int, offset: int = 0) -> np.ndarray:
    """The first test images of Fashion-MNIST as float32 (N, 1, 28, 28) in [0, 1], read from the IDX file directly."""
    path = next(p for p in FASHION.iterdir() if p.name.startswith("t10k-images"))
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    return (images[offset : offset + count].astype(np.float32) / 255.0).copy()


def files_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path.exists():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def cli_case(model: str, name: str, options: tuple[str, ...]) -> dict[str, str]:
    source = WORK / f"{model}.onnx"
    out = WORK / f"{model}.{name}.onnx"
    report = WORK / f"{model}.{name}.report.json"
    substitutes = {"CAL": str(WORK / "cal.npy"), "SENS": str(WORK / "sens.npy"), "REPORT": str(report)}
    args = [substitutes.get(o, o) for o in options]
    done = subprocess.run([sys.executable, "-m", "onnxq", "quantize", str(source), "-o", str(out), *args],
                          capture_output=True, text=True, cwd=WORK, env=ENV)
    text = done.stdout + done.stderr
    entry = {"rc": str(done.returncode), "model": files_digest([out, out.with_name(out.name + ".data")]), "printed": sha(text.encode())}
    if report.exists():
        entry["report"] = sha(report.read_bytes())
        entry["report_md"] = sha(report.with_suffix(".md").read_bytes())
    if done.returncode == 0:
        shown = subprocess.run([sys.executable, "-m", "onnxq", "inspect", str(out)], capture_output=True, text=True, cwd=WORK, env=ENV)
        entry["inspect"] = sha((shown.stdout + shown.stderr).encode())
    entry["text"] = text
    return entry


def api_cases() -> dict[str, dict[str, str]]:
    """The Python API over tests/models.py's models: weight-only, int format, and W8A8 with random data."""
    sys.path.insert(0, str(REPO / "tests"))
    import models  # tests/models.py
    import onnxq
    from onnxq.config import ActivationConfig, CalibrationMethod, QuantizeConfig, WeightFormat

    builders = {name: getattr(models, name) for name in ("conv_bn_relu_gemm", "shared_weight_matmuls", "depthwise_convtranspose",
                                                          "conv_then_if", "matmul_then_loop", "matmul_then_scan", "residual_block",
                                                          "transformer_block")}
    configs = {
        "b4": QuantizeConfig(bits=4),
        "b8": QuantizeConfig(bits=8),
        "int4": QuantizeConfig(bits=4, format=WeightFormat.INT),
        "w8a8": QuantizeConfig(bits=8, activations=ActivationConfig(samples=32)),
        "w4a8_asq": QuantizeConfig(bits=4, activations=ActivationConfig(samples=32, method=CalibrationMethod.ASQ)),
    }
    out: dict[str, dict[str, str]] = {}
    for model_name, build in builders.items():
        model = build()
        for config_name, config in configs.items():
            key = f"api/{model_name}/{config_name}"
            data = None
            if config.activations is not None:
                rng = np.random.default_rng(0)
                specs = [(i.name, [d.dim_value or 4 for d in i.type.tensor_type.shape.dim]) for i in model.graph.input]
                data = [{name: rng.random(shape, dtype=np.float32) for name, shape in specs} for _ in range(8)]
            try:
                written = onnxq.quantize(model, config, data)
                out[key] = {"model": sha(written.SerializeToString())}
            except Exception as error:  # a case that fails must fail the same way
                out[key] = {"error": f"{type(error).__name__}: {error}"}
    return out


def fingerprints(models: tuple[str, ...], api: bool) -> dict[str, dict[str, str]]:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    for model in models:
        shutil.copy(REPO / "models" / f"{model}.onnx", WORK / f"{model}.onnx")
    np.save(WORK / "cal.npy", fashion_images(256))
    np.save(WORK / "sens.npy", fashion_images(64, offset=1000))
    out: dict[str, dict[str, str]] = {}
    for model in models:
        for name, options in CLI_CASES:
            out[f"cli/{model}/{name}"] = cli_case(model, name, options)
            print(f"cli/{model}/{name}: {out[f'cli/{model}/{name}']['model']}", flush=True)
    if api:
        out.update(api_cases())
    return out


def compare(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]], partial: bool = False) -> int:
    """Print the cases whose fingerprints differ; ``partial``: cases this run did not compute are not counted."""
    differ = 0
    for key in sorted(before.keys() & after.keys() if partial else before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if old is None or new is None:
            print(f"{key}: only {'after' if old is None else 'before'}")
            differ += 1
            continue
        fields = sorted(k for k in old.keys() | new.keys() if k != "text" and old.get(k) != new.get(k))
        if fields:
            differ += 1
            print(f"{key}: differs in {', '.join(fields)}")
            if "printed" in fields:
                print("  before:\n    " + old.get("text", "").replace("\n", "\n    "))
                print("  after:\n    " + new.get("text", "").replace("\n", "\n    "))
    print(f"{len(before)} cases before, {len(after)} after{' (a partial run)' if partial else ''}; {differ} differ")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, help="write the fingerprints to this JSON file")
    group.add_argument("--compare", type=Path, help="compute the fingerprints and compare them with this JSON file")
    parser.add_argument("--models", nargs="+", default=list(SHIPPED), help="shipped models to run (default: all three)")
    parser.add_argument("--no-api", action="store_true", help="skip the Python API cases over tests/models.py")
    args = parser.parse_args()
    found = fingerprints(tuple(args.models), not args.no_api)
    if args.write:
        args.write.write_text(json.dumps(found, indent=1, sort_keys=True))
        print(f"wrote {len(found)} fingerprints to {args.write}")
        return 0
    partial = args.no_api or set(args.models) != set(SHIPPED)
    return compare(json.loads(args.compare.read_text()), found, partial)


if __name__ == "__main__":
    raise SystemExit(main())
