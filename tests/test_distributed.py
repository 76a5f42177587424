"""The calibration passes on Dask workers write the model a single process writes (issue 18).

Single process, a LocalCluster of two worker processes (``--workers 2``), and a scheduler with two workers started as
separate ``dask`` commands (``--scheduler``) quantize the shipped ResNet-20 on Fashion-MNIST images: the written models
must hold identical integer codes and float tensors equal to 1e-6 relative, also when a worker dies mid-pass. The
reference is the single-process model; the comparison is a plain walk over the two models' tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS
from onnx import numpy_helper

from onnxq import QuantizeConfig
from onnxq.analysis.datasets import FASHION_MNIST_DIR, load_idx_split
from onnxq.calibrate import shards as shards_module
from onnxq.cli import main
from onnxq.config import ActivationConfig, CalibrationMethod
from onnxq.errors import OnnxqError
from onnxq.pipeline import quantize_with_report

distributed = pytest.importorskip("distributed", reason="the scale-out tests need Dask: pip install '.[distributed]'")

RESNET = MODELS / "fmnist_resnet20.onnx"
SAMPLES = 96
RUN = 8  # samples per calibration run: the passes get 6 shards of 16 samples on two workers

CONFIGS = {
    "weights with data": QuantizeConfig(bits=4),  # second moments, GPTQ, the mean shift into the biases
    "W4A8 mse": QuantizeConfig(bits=4, activations=ActivationConfig(bits=8, method=CalibrationMethod.MSE, samples=SAMPLES)),
    "W8A8 asq": QuantizeConfig(bits=8, activations=ActivationConfig(bits=8, method=CalibrationMethod.ASQ, samples=SAMPLES)),
}


@pytest.fixture(scope="module", autouse=True)
def small_shards():
    """Shards of a run or two (the client decides them): many shards to merge, as a pass of thousands of samples has."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shards_module, "MIN_SHARD_SAMPLES", 1)
        yield


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    assert FASHION_MNIST_DIR.is_dir(), "install Debian's dataset-fashion-mnist (the README's test command does)"
    return load_idx_split(FASHION_MNIST_DIR, "train").images[:SAMPLES]


def runs(images: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"input": images[i : i + RUN]} for i in range(0, len(images), RUN)]


@pytest.fixture(scope="module")
def local_client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with distributed.Client(cluster) as client:
            yield client


@pytest.fixture(scope="module")
def single(images) -> dict[str, onnx.ModelProto]:
    return {name: quantize_with_report(RESNET, config, runs(images)).model for name, config in CONFIGS.items()}


def assert_same_model(expected: onnx.ModelProto, got: onnx.ModelProto) -> None:
    """Same nodes; integer tensors equal, float tensors equal to 1e-6 of their largest magnitude."""
    assert [(n.op_type, n.name, list(n.input)) for n in got.graph.node] == [(n.op_type, n.name, list(n.input)) for n in expected.graph.node]
    want = {t.name: numpy_helper.to_array(t) for t in expected.graph.initializer}
    have = {t.name: numpy_helper.to_array(t) for t in got.graph.initializer}
    assert have.keys() == want.keys()
    for name, a in want.items():
        b = have[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * float(np.abs(a).max(initial=0.0)), err_msg=name)
        else:
            np.testing.assert_array_equal(b, a, err_msg=name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_local_workers_write_the_single_process_model(images, single, local_client, name):
    got = quantize_with_report(RESNET, CONFIGS[name], runs(images), local_client).model
    assert_same_model(single[name], got)


@pytest.mark.parametrize("model", ["fmnist_mobilenetv2.onnx", "fmnist_vit.onnx"])
def test_the_other_shipped_models_too(images, local_client, model):
    """Depthwise convolutions (one H per group) and a transformer's MatMuls (H shared by q, k, v), W4A8 mse with moments."""
    config = QuantizeConfig(bits=4, activations=ActivationConfig(bits=8, method=CalibrationMethod.MSE, samples=SAMPLES))
    alone = quantize_with_report(MODELS / model, config, runs(images)).model
    assert_same_model(alone, quantize_with_report(MODELS / model, config, runs(images), local_client).model)


@pytest.mark.parametrize("flags", ["the branch kept", "left after the first runs"])
def test_calibration_through_an_if_on_workers(local_client, flags):
    """A network inside an If (its taken branch inlined for calibration): the same H on workers, and a run in a later
    shard that takes the other branch drops that branch's H there too (the guard's verdict merges across shards)."""
    from models import network_in_if

    rng = np.random.default_rng(0)
    taken = [True] * 24 if flags == "the branch kept" else [True] * 20 + [False] * 4
    data = [{"x": rng.standard_normal((4, 16)).astype(np.float32), "cond": np.array(flag)} for flag in taken]
    config = QuantizeConfig(bits=4, first_last_bits=None)
    alone = quantize_with_report(network_in_if(), config, data)
    assert_same_model(alone.model, quantize_with_report(network_in_if(), config, data, local_client).model)


def test_the_comparison_can_fail(single):
    """A code moved by one step, or a scale by 1e-5, is caught."""
    model = onnx.ModelProto()
    model.CopyFrom(single["weights with data"])
    ints = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)]
    assert ints
    values = numpy_helper.to_array(ints[0]).copy()
    values.flat[0] = values.flat[0] + 1 if values.flat[0] < 7 else values.flat[0] - 1
    ints[0].CopyFrom(numpy_helper.from_array(values, ints[0].name)) if ints[0].data_type == onnx.TensorProto.INT8 else \
        ints[0].CopyFrom(onnx.helper.make_tensor(ints[0].name, onnx.TensorProto.INT4, values.shape, values.ravel().tolist()))
    with pytest.raises(AssertionError):
        assert_same_model(single["weights with data"], model)


class KillOnce(distributed.WorkerPlugin):
    """Ends the worker process the moment it starts its second calibration shard, once in the whole cluster."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.started = 0

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish != "executing" or "run_shard" not in str(key):
            return
        self.started += 1
        if self.started < 2:
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        os._exit(1)


def test_a_worker_killed_mid_pass_changes_nothing(images, single, tmp_path):
    """Its shards run again on a worker (Dask retries them) and each shard's statistics are merged once."""
    marker = tmp_path / "killed"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with distributed.Client(cluster) as client:
            client.register_plugin(KillOnce(str(marker)))
            got = quantize_with_report(RESNET, CONFIGS["weights with data"], runs(images), client).model
    assert marker.exists(), "no worker was killed: the test did not test"
    assert_same_model(single["weights with data"], got)


@pytest.mark.parametrize("kind", ["measured", "proxy"])
def test_sensitivity_on_workers_measures_what_one_process_measures(images, local_client, kind):
    """Each layer's probe run on a worker (measured), or the H pass on the workers (proxy): the same numbers, the same mixed precision."""
    from onnxq.analysis.mixed_precision import TargetSize, choose_bits
    from onnxq.analysis.proxy import ProxySensitivity
    from onnxq.analysis.sensitivity import SensitivityAnalysis

    make = ProxySensitivity if kind == "proxy" else SensitivityAnalysis
    config, data = QuantizeConfig(bits=4), runs(images[:32])
    alone, spread = make(RESNET, config, data, 32), make(RESNET, config, data, 32, client=local_client)
    want, got = alone.layers(), spread.layers()
    assert [(s.tensor, s.bits) for s in got] == [(s.tensor, s.bits) for s in want]
    for a, b in zip(want, got):
        assert b.model_sqnr_db == pytest.approx(a.model_sqnr_db, rel=1e-6, abs=1e-9), a.tensor
        assert b.noise == pytest.approx(a.noise, rel=1e-5, abs=1e-12), a.tensor
    target = TargetSize.parse("0.2x")
    assert choose_bits(spread, target, None).tensor_bits == choose_bits(alone, target, None).tensor_bits


class BrokenOnnxruntime(distributed.WorkerPlugin):
    """Makes onnxruntime on the worker refuse every model, as a worker with a broken or too old onnxruntime would."""

    def setup(self, worker) -> None:
        import onnxruntime

        def refuse(*args, **kwargs):
            raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : this onnxruntime cannot load the model\nsecond line")

        onnxruntime.InferenceSession = refuse


def test_a_model_the_workers_cannot_load_is_one_line_and_writes_nothing(images, tmp_path, capsys, monkeypatch):
    from onnxq.distribute import cluster as cluster_module

    real = cluster_module.cluster

    @contextlib.contextmanager
    def broken(workers=None, scheduler=None):
        with real(workers, scheduler) as client:
            client.register_plugin(BrokenOnnxruntime())
            yield client

    monkeypatch.setattr(cluster_module, "cluster", broken)
    data = tmp_path / "calibration.npy"
    np.save(data, images[:16])
    out = tmp_path / "out.onnx"
    assert main(["quantize", str(RESNET), "--calibration", str(data), "-o", str(out), "--workers", "1", "--no-speed"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert not out.exists() and len(err) == 1
    assert str(RESNET) in err[0] and "onnxruntime on a Dask worker cannot load the model" in err[0] and "INVALID_GRAPH" in err[0]


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """A ``dask scheduler`` and two ``dask worker`` processes, as a user starts them; yields the scheduler's address."""
    folder = tmp_path_factory.mktemp("dask")
    file = folder / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    procs = [subprocess.Popen([*dask, "--scheduler-file", str(file), "--port", "0", "--dashboard-address", ":0", "--no-dashboard"],
                              cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert file.exists(), "the dask scheduler did not start"
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(file),
                                           "--nthreads", "1", "--no-dashboard"], cwd=folder, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = json.loads(file.read_text())["address"]
        with distributed.Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def test_the_cli_on_a_running_scheduler_writes_the_single_process_model(images, scheduler, tmp_path):
    data = tmp_path / "calibration.npy"
    np.save(data, images)
    alone, spread = tmp_path / "alone.onnx", tmp_path / "spread.onnx"
    common = [str(RESNET), "-b", "4", "--calibration", str(data), "--activations", "none", "--no-speed"]
    assert main(["quantize", *common, "-o", str(alone)]) == 0
    assert main(["quantize", *common, "-o", str(spread), "--scheduler", scheduler]) == 0
    assert_same_model(onnx.load(alone), onnx.load(spread))


def test_the_cli_with_local_workers_writes_the_single_process_model(images, tmp_path):
    data = tmp_path / "calibration.npy"
    np.save(data, images)
    alone, spread = tmp_path / "alone.onnx", tmp_path / "spread.onnx"
    common = [str(RESNET), "-b", "4", "--calibration", str(data), "--activations", "8", "--no-speed"]
    assert main(["quantize", *common, "-o", str(alone)]) == 0
    assert main(["quantize", *common, "-o", str(spread), "--workers", "2"]) == 0
    assert_same_model(onnx.load(alone), onnx.load(spread))


def test_an_unreachable_scheduler_is_one_line_and_writes_nothing(images, tmp_path, capsys):
    data = tmp_path / "calibration.npy"
    np.save(data, images[:8])
    out = tmp_path / "out.onnx"
    code = main(["quantize", str(RESNET), "--calibration", str(data), "-o", str(out), "--scheduler", "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and not out.exists()
    assert len(err) == 1 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in err[0] and str(RESNET) in err[0]


@pytest.mark.parametrize("argv, problem", [
    (["--workers", "2"], "give --calibration DATA"),
    (["--workers", "0", "--calibration", "DATA"], "--workers must be a positive number"),
    (["--workers", "2", "--scheduler", "tcp://127.0.0.1:9", "--calibration", "DATA"], "give one of them"),
])
def test_scale_out_options_are_checked(images, tmp_path, capsys, argv, problem):
    data = tmp_path / "calibration.npy"
    np.save(data, images[:8])
    out = tmp_path / "out.onnx"
    argv = [str(data) if a == "DATA" else a for a in argv]
    assert main(["quantize", str(RESNET), "-o", str(out), *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0] and not out.exists()


def test_without_dask_the_options_say_what_to_install(monkeypatch):
    from onnxq.distribute.cluster import cluster

    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed now raises ImportError
    with pytest.raises(OnnxqError, match=r'pip install "onnxq\[distributed\]"'):
        with cluster(workers=2):
            pass


def test_errors_cross_process_boundaries_whole():
    """A worker's OnnxqError is pickled to the client: it must come back with its file and problem."""
    import pickle

    error = pickle.loads(pickle.dumps(OnnxqError("model.onnx", "something is wrong")))
    assert isinstance(error, OnnxqError) and (error.path, error.problem) == ("model.onnx", "something is wrong")
    assert str(error) == "model.onnx: something is wrong"


def test_a_run_with_workers_prints_only_onnxq_lines(images, tmp_path):
    """Dask logs its cluster's start and stop at INFO: none of it reaches the terminal (a fresh process, as a user runs it)."""
    data = tmp_path / "calibration.npy"
    np.save(data, images[:16])
    out = tmp_path / "out.onnx"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "onnxq", "quantize", str(RESNET), "--calibration", str(data), "-o", str(out),
                           "--workers", "1", "--no-speed"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and out.exists()
    assert done.stdout.splitlines()[0].startswith("quantized ")
