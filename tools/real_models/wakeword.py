"""openWakeWord's speech embedding model on windows of synthesised voiced audio.

Model: ``openwakeword/resources/models/embedding_model.onnx`` of the ``openwakeword==0.4.0`` wheel (Apache-2.0), a
TensorFlow model converted by tf2onnx 1.9.3 (opset 13): 20 convolutions behind leaky Relus (written as Max(x, a x)),
max-pools and one BatchNormalization, with a channels-last input ``input_1`` [batch, 76, 32, 1] (76 frames of a 32-band
log-mel spectrogram) and one 96-value embedding per window. openWakeWord's wake-word classifiers read 16 consecutive
embeddings; this is the shared front of all of them. It is the only tf2onnx export among the real-model cases, which
is why it is here: another exporter's conventions (Transpose pairs around NHWC, leaky Relus as Max, Pad nodes).

Inputs: 2.5-second clips of synthesised voiced sounds at 16 kHz (harmonic sources whose fundamental glides and
vibrates between 90 and 300 Hz, shaped by three moving formant resonances, voiced stretches and pauses, white noise
at 10-40 dB SNR, levels of int16 audio from -30 to 0 dB of full scale), turned into features exactly as openWakeWord
does: the wheel's own ``melspectrogram.onnx`` (float, not quantized here) over the int16-valued samples, then
``mel / 10 + 2``, windows of 76 frames every 8 frames.

Calibration: 256 windows from clips of one seed; evaluation: ``evaluation`` windows from clips of another; ``run`` returns
per window [its embedding].

Metric: the mean cosine similarity of each window's quantized embedding with the float one (the classifiers downstream
read the embeddings themselves); target 0.99, the same as MiniLM's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import lfilter

from tools.real_models import CALIBRATION_SAMPLES, Case, Feeds, fetch_wheel, make_session

PACKAGE, VERSION = "openwakeword", "0.4.0"
SAMPLE_RATE = 16000
CLIP_SECONDS = 2.5
WINDOW_FRAMES, WINDOW_STEP = 76, 8
EVALUATION_BATCH = 64


def _formant_filter(signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``signal`` through three two-pole resonances whose centres drift slowly (vowel-like colouring), summed."""
    out = np.zeros_like(signal)
    blocks = np.array_split(np.arange(len(signal)), 10)
    for low, high in ((300, 900), (900, 2500), (2200, 3500)):
        start, end = rng.uniform(low, high, size=2)
        for index, block in enumerate(blocks):
            centre = start + (end - start) * index / (len(blocks) - 1)
            radius = np.exp(-np.pi * rng.uniform(60, 200) / SAMPLE_RATE)
            pole = 2 * radius * np.cos(2 * np.pi * centre / SAMPLE_RATE)
            out[block] += lfilter([1.0 - radius], [1.0, -pole, radius * radius], signal[block])
    return out


def voiced_clip(rng: np.random.Generator) -> np.ndarray:
    """One clip of synthesised voiced audio, int16-valued float32 samples."""
    t = np.arange(int(CLIP_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = rng.uniform(90, 300) * 2 ** (rng.uniform(-0.5, 0.5) * t / CLIP_SECONDS)
    f0 = f0 * (1 + 0.01 * np.sin(2 * np.pi * rng.uniform(4, 7) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    slope = rng.uniform(0.6, 1.2)
    harmonics = int(0.45 * SAMPLE_RATE // f0.max())  # all under Nyquist
    source = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k**slope for k in range(1, harmonics + 1))
    voiced = _formant_filter(source, rng)
    gate = np.convolve((rng.uniform(size=len(t) // 800 + 1) > 0.3).repeat(800)[: len(t)].astype(float), np.hanning(801) / 400, "same")
    voiced *= np.clip(gate, 0, 1)
    voiced /= np.abs(voiced).max() + 1e-9
    noise = rng.standard_normal(len(t)) * 10 ** (-rng.uniform(10, 40) / 20)
    level = 32767 * 10 ** (-rng.uniform(0, 30) / 20)
    return ((voiced + noise) / (1 + np.abs(noise).max()) * level).astype(np.float32)


def windows(mel_session: Any, clips: list[np.ndarray]) -> np.ndarray:
    """Embedding-model inputs [n, 76, 32, 1]: each clip's log-mel frames as openWakeWord makes them, in windows."""
    out = []
    for clip in clips:
        mel = mel_session.run(None, {mel_session.get_inputs()[0].name: clip[None]})[0].squeeze() / 10 + 2
        out += [mel[i : i + WINDOW_FRAMES] for i in range(0, len(mel) - WINDOW_FRAMES + 1, WINDOW_STEP)]
    return np.stack(out)[..., None].astype(np.float32)


def _windows_from(seed: int, count: int, mel_session: Any) -> np.ndarray:
    """At least ``count`` windows from clips of ``seed``, cut to ``count``."""
    rng = np.random.default_rng(seed)
    found: list[np.ndarray] = []
    while sum(len(w) for w in found) < count:
        found.append(windows(mel_session, [voiced_clip(rng) for _ in range(4)]))
    return np.concatenate(found)[:count]


def mean_cosine(reference: list[list[np.ndarray]], approx: list[list[np.ndarray]]) -> float:
    """Mean cosine similarity of the approximate embeddings with the reference ones."""
    values = []
    for (ref,), (out,) in zip(reference, approx, strict=True):
        a, b = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
        values.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    return float(np.mean(values))


def case(work: Path, evaluation: int = 400) -> Case:
    """OpenWakeWord's embedding model on ``evaluation`` windows, calibrated on 256 others."""
    folder = fetch_wheel(PACKAGE, VERSION, work) / "openwakeword" / "resources" / "models"
    mel_session = make_session(folder / "melspectrogram.onnx")
    calibration = _windows_from(1, CALIBRATION_SAMPLES, mel_session)
    held_out = _windows_from(2, evaluation, mel_session)
    feeds: list[Feeds] = [{"input_1": calibration[i : i + 32]} for i in range(0, len(calibration), 32)]

    def run(session: Any) -> list[list[np.ndarray]]:
        """Every evaluation window through ``session`` in batches; per window [its embedding (96,)]."""
        out = [session.run(None, {"input_1": held_out[i : i + EVALUATION_BATCH]})[0] for i in range(0, len(held_out), EVALUATION_BATCH)]
        return [[row.reshape(-1)] for row in np.concatenate(out)]

    return Case(
        name="wakeword_embedding",
        field="audio: speech embedding (tf2onnx export)",
        source=f"{PACKAGE}=={VERSION} openwakeword/resources/models/embedding_model.onnx (Apache-2.0)",
        model=folder / "embedding_model.onnx",
        calibration=feeds,
        run=run,
        metric=mean_cosine,
        metric_name="embedding cosine with float",
        target=0.99,
        notes=f"{evaluation} windows of 76 log-mel frames from synthesised voiced clips",
    )
