"""Silero VAD, a streaming voice-activity detector, on synthesised speech-like and non-speech audio.

Model: ``silero_vad/data/silero_vad.onnx`` from the ``silero-vad==6.2.3`` wheel (MIT licence, Silero Team), the file
the package's own ``load_silero_vad(onnx=True)`` loads. Inputs: ``input`` [batch, samples] float audio, ``state``
[2, batch, 128] float (the recurrent state) and ``sr`` an int64 scalar; outputs: ``output`` [batch, 1], the speech
probability of the chunk, and ``stateN``, the next state. The graph is an ``If`` on ``sr`` (16 kHz or 8 kHz) whose two
branches each hold an STFT-like conv front end, a conv encoder, an LSTM cell and a conv decoder; their weights are
``Constant`` nodes inside the branches, not graph initializers.

Streaming (read off the wheel's ``OnnxWrapper``): at 16 kHz the model takes chunks of 512 new samples, each with the
last 64 samples of the previous chunk prepended (zeros before the first), so one run sees 576 samples; the state
starts at zeros and each run's ``stateN`` is fed to the next. :func:`stream` is our own loop doing that.

Inputs: clips of a few seconds at 16 kHz that alternate speech-like and non-speech segments (0.4-1.4 s each), with a
low noise floor throughout. Speech-like: a glottal pulse train with jitter, shimmer and a pitch contour (a base in
90-250 Hz, declination and slow wobble) through a spectral-tilt filter and three formant resonators whose targets move
between vowels every 80-200 ms, under syllable envelopes (4-7 syllables a second) with fricative noise bursts
(high-passed noise) between some syllables. Non-speech: near silence, stationary white, pink or brown noise, mains hum
with harmonics, and music-like notes (struck harmonic tones, single or triads, decaying). Each 512-sample chunk
is labelled speech when most of its samples lie in a speech segment. Alone, each non-speech kind stays below 0.5 on
nearly every chunk (music-like notes on 0-16 % of chunks) and speech-like segments are above it on 82-100 %. In the 40
evaluation clips (5000 chunks) the float model's decisions match the labels on 84.6 % of chunks; leaving out the 10
chunks (0.32 s) after each speech offset and the 2 after each onset, 92.7 % (speech recall 92.5 %, false alarms 7.0 %).
Most misses are Silero's hangover: after speech its state keeps the probability high, for a few chunks over silence
and for up to a second over pink noise or music; that is the model, not the inputs.

Calibration: 256 runs of (one 576-sample chunk, the float model's own state before it, sr = 16000) drawn at random from
the streams of 16 calibration clips, the way a quantizer sees the model in use. Evaluation: ``evaluation`` clips from
another seed, each streamed chunk by chunk through the session under test with that session's own state, so state
errors accumulate as they would in use; ``run`` returns per clip [the chunks' speech probabilities].

Metric: the percentage of chunks whose speech decision (probability > 0.5, the package's default threshold) is the
float model's. Target 99.0, the issue's "within 1 pp of float" read on the decisions a user acts on: the float model's
own probability lies in 0.3-0.7 on about 10 % of chunks (hangover tails and onsets), where a small shift flips a
decision, so 99 % lets a quantized model move about one in ten of those borderline chunks and almost no decision inside
a segment. The float model is its own reference, so the metric measures quantization damage, not VAD quality. The
target is tight for this model: 8-bit weights (onnxq, no data) flip 64 of 5000 decisions (98.72 %), most of them on
chunks whose float probability is within 0.2 of the threshold, because state errors carry from chunk to chunk; with
the calibration data 26 (99.48 %).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import lfilter

from tools.real_models import CALIBRATION_SAMPLES, Case, Feeds, fetch_wheel, make_session

PACKAGE, VERSION = "silero-vad", "6.2.3"
SAMPLE_RATE = 16000
CHUNK = 512
CONTEXT = 64
CLIP_SECONDS = 4.0
CALIBRATION_CLIPS = 16
VOWELS = {  # F1, F2, F3 in Hz (adult averages)
    "a": (730, 1090, 2440),
    "e": (530, 1840, 2480),
    "i": (270, 2290, 3010),
    "o": (570, 840, 2410),
    "u": (300, 870, 2240),
    "ae": (660, 1720, 2410),
    "er": (490, 1350, 1690),
}
BANDWIDTHS = (80.0, 100.0, 140.0)
NON_SPEECH = {"silence": 0.3, "white": 0.1, "pink": 0.15, "brown": 0.1, "hum": 0.15, "music": 0.2}
BLOCK = 80  # samples per formant-filter update (5 ms)


def model_path(work: Path) -> Path:
    """The wheel's silero_vad.onnx, fetched under ``work``."""
    return fetch_wheel(PACKAGE, VERSION, work) / "silero_vad" / "data" / "silero_vad.onnx"


def _pitch_contour(rng: np.random.Generator, n: int) -> np.ndarray:
    """A per-sample f0 contour in Hz: a base in 90-250 Hz with declination, slow wobble and jitter."""
    t = np.arange(n) / SAMPLE_RATE
    base = rng.uniform(90, 250)
    decline = 1 - rng.uniform(0.0, 0.25) * t / max(t[-1], 1e-9)
    wobble = 1 + rng.uniform(0.03, 0.12) * np.sin(2 * np.pi * rng.uniform(1.0, 4.0) * t + rng.uniform(0, 2 * np.pi))
    jitter = 1 + 0.01 * rng.standard_normal(n // BLOCK + 1).repeat(BLOCK)[:n]
    return np.clip(base * decline * wobble * jitter, 70, 300)


def _glottal_source(rng: np.random.Generator, f0: np.ndarray) -> np.ndarray:
    """A glottal pulse train following ``f0``, with shimmer and the -12 dB/octave tilt of glottal flow."""
    phase = np.cumsum(f0 / SAMPLE_RATE)
    pulses = np.zeros(len(f0))
    starts = np.nonzero(np.diff(np.floor(phase)) > 0)[0] + 1
    pulses[starts] = 1 + 0.1 * rng.standard_normal(len(starts))
    flow = lfilter([1.0], [1.0, -1.9, 0.9025], pulses)  # double pole at 0.95: glottal flow shape
    return np.diff(flow, prepend=0.0)  # radiation at the lips: +6 dB/octave


def _formant_track(rng: np.random.Generator, n: int) -> np.ndarray:
    """Formant targets per filter block: vowels held 80-200 ms with smooth 30 ms transitions, shape [blocks, 3]."""
    blocks = n // BLOCK + 1
    track = np.zeros((blocks, 3))
    names = list(VOWELS)
    i = 0
    while i < blocks:
        length = int(rng.uniform(0.08, 0.2) * SAMPLE_RATE / BLOCK)
        track[i : i + length] = np.array(VOWELS[names[rng.integers(len(names))]]) * rng.uniform(0.9, 1.15)
        i += length
    smooth = np.ones(6) / 6
    return np.stack([np.convolve(np.pad(track[:, k], 3, mode="edge"), smooth, mode="same")[3:-3] for k in range(3)], axis=1)


def _resonate(x: np.ndarray, track: np.ndarray) -> np.ndarray:
    """Pass ``x`` through three cascaded two-pole resonators whose centre frequencies follow ``track``."""
    y = x.copy()
    for k, bandwidth in enumerate(BANDWIDTHS):
        out = np.zeros_like(y)
        state = np.zeros(2)
        radius = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
        for b in range(len(track)):
            segment = slice(b * BLOCK, min((b + 1) * BLOCK, len(y)))
            if segment.start >= len(y):
                break
            a = [1.0, -2 * radius * np.cos(2 * np.pi * track[b, k] / SAMPLE_RATE), radius**2]
            out[segment], state = lfilter([sum(a)], a, y[segment], zi=state)
        y = out
    return y


def _syllable_envelope(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Syllable-rate amplitude envelope (4-7 syllables a second) and the gaps between syllables."""
    envelope = np.zeros(n)
    gaps = []
    position = int(rng.uniform(0.0, 0.05) * SAMPLE_RATE)
    while position < n:
        length = int(rng.uniform(0.12, 0.25) * SAMPLE_RATE)
        end = min(position + length, n)
        envelope[position:end] = np.sin(np.pi * np.arange(end - position) / length) ** 0.6 * rng.uniform(0.5, 1.0)
        gap = int(rng.uniform(0.02, 0.08) * SAMPLE_RATE)
        gaps.append((end, min(end + gap, n)))
        position = end + gap
    return envelope, gaps


def _fricative(rng: np.random.Generator, n: int) -> np.ndarray:
    """An unvoiced fricative burst: noise high-passed at 2.5-5 kHz under a smooth envelope."""
    noise = rng.standard_normal(n)
    cutoff = rng.uniform(2500, 5000) / (SAMPLE_RATE / 2)
    shaped = lfilter([1, -1], [1, -(1 - cutoff)], noise)  # first-order high-pass
    return shaped * np.hanning(n)


def speech_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` samples of speech-like audio: voiced syllables through moving formants, with fricatives between some."""
    voiced = _resonate(_glottal_source(rng, _pitch_contour(rng, n)), _formant_track(rng, n))
    envelope, gaps = _syllable_envelope(rng, n)
    out = voiced / (np.std(voiced) + 1e-12) * envelope
    for start, _ in gaps:
        if rng.random() < 0.4:
            length = min(int(rng.uniform(0.05, 0.12) * SAMPLE_RATE), n - start)
            if length > 16:
                out[start : start + length] += 0.35 * _fricative(rng, length)
    return out


def _pink(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Coloured noise with power spectrum ~ 1 / f**exponent (1: pink, 2: brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    spectrum[1:] /= f[1:] ** (exponent / 2)
    spectrum[0] = 0
    return np.fft.irfft(spectrum, n)


def _music(rng: np.random.Generator, n: int) -> np.ndarray:
    """Music-like notes: struck harmonic tones (single notes or triads, 130-1050 Hz roots) decaying over 0.2-0.6 s."""
    out = np.zeros(n)
    position = 0
    t_all = np.arange(n) / SAMPLE_RATE
    while position < n:
        length = min(int(rng.uniform(0.2, 0.6) * SAMPLE_RATE), n - position)
        t = t_all[:length]
        root = 130.8 * 2 ** (rng.integers(0, 36) / 12)
        note = np.zeros(length)
        for ratio in [1.0] if rng.random() < 0.5 else [1.0, 2 ** (4 / 12), 2 ** (7 / 12)]:
            for h in range(1, 7):
                note += np.sin(2 * np.pi * root * ratio * h * t) * 0.6**h * np.exp(-t * h / rng.uniform(0.15, 0.4))
        out[position : position + length] = note * np.minimum(1.0, np.arange(length) / (0.005 * SAMPLE_RATE))
        position += length
    return out


def non_speech(rng: np.random.Generator, n: int, kind: str | None = None) -> np.ndarray:
    """``n`` samples of non-speech: near silence, white/pink/brown noise, mains hum or music-like notes (random ``kind``)."""
    kind = kind or str(rng.choice(list(NON_SPEECH), p=list(NON_SPEECH.values())))
    if kind == "silence":
        return np.zeros(n)
    if kind == "white":
        return rng.standard_normal(n) * rng.uniform(0.05, 0.3)
    if kind in ("pink", "brown"):
        noise = _pink(rng, n, 1.0 if kind == "pink" else 2.0)
        return noise / (np.std(noise) + 1e-12) * rng.uniform(0.05, 0.3)
    if kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        mains = rng.choice([50.0, 60.0])
        return sum(np.sin(2 * np.pi * mains * h * t + rng.uniform(0, 6.3)) / h for h in range(1, 6)) * rng.uniform(0.05, 0.3)
    tones = _music(rng, n)
    return tones / (np.std(tones) + 1e-12) * rng.uniform(0.1, 0.4)


def synthesize_clip(rng: np.random.Generator, seconds: float = CLIP_SECONDS) -> tuple[np.ndarray, np.ndarray]:
    """A float32 clip alternating speech-like and non-speech segments, and its per-sample speech labels."""
    n = int(seconds * SAMPLE_RATE)
    audio = np.zeros(n)
    labels = np.zeros(n, dtype=bool)
    speech = bool(rng.random() < 0.5)
    position = 0
    while position < n:
        length = min(int(rng.uniform(0.4, 1.4) * SAMPLE_RATE), n - position)
        if speech:
            audio[position : position + length] = speech_like(rng, length) * rng.uniform(0.1, 0.5)
            labels[position : position + length] = True
        else:
            audio[position : position + length] = non_speech(rng, length)
        position += length
        speech = not speech
    audio += rng.standard_normal(n) * 10 ** rng.uniform(-4, -2.5)
    peak = np.max(np.abs(audio))
    if peak > 0.99:
        audio *= 0.99 / peak
    return audio.astype(np.float32), labels


def chunk_labels(labels: np.ndarray) -> np.ndarray:
    """One speech label per 512-sample chunk: most of its samples are speech."""
    chunks = len(labels) // CHUNK
    return labels[: chunks * CHUNK].reshape(chunks, CHUNK).mean(axis=1) > 0.5


def stream(session: Any, audio: np.ndarray, record: list[Feeds] | None = None) -> np.ndarray:
    """Speech probability of each 512-sample chunk of ``audio``, carrying the session's state and 64-sample context."""
    state = np.zeros((2, 1, 128), dtype=np.float32)
    context = np.zeros(CONTEXT, dtype=np.float32)
    sr = np.array(SAMPLE_RATE, dtype=np.int64)
    probabilities = []
    for start in range(0, len(audio) - CHUNK + 1, CHUNK):
        window = np.concatenate([context, audio[start : start + CHUNK]])[None, :]
        feeds = {"input": window, "state": state, "sr": sr}
        if record is not None:
            record.append(feeds)
        output, state = session.run(None, feeds)
        probabilities.append(float(output[0, 0]))
        context = window[0, -CONTEXT:]
    return np.array(probabilities, dtype=np.float32)


def decision_agreement(reference: list[list[np.ndarray]], approx: list[list[np.ndarray]]) -> float:
    """Percentage of chunks whose speech decision (probability > 0.5) is the float model's."""
    ref = np.concatenate([sample[0] for sample in reference]) > 0.5
    out = np.concatenate([sample[0] for sample in approx]) > 0.5
    return float(100.0 * np.mean(ref == out))


def label_accuracy(outputs: list[list[np.ndarray]], clips: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Percentage of chunks whose speech decision (probability > 0.5) is the clip's label (:func:`chunk_labels`)."""
    decided = np.concatenate([sample[0] for sample in outputs]) > 0.5
    labels = np.concatenate([chunk_labels(labels) for _, labels in clips])
    return float(100.0 * np.mean(decided == labels))


def calibration_feeds(model: Path, seed: int = 0, count: int = CALIBRATION_SAMPLES) -> list[Feeds]:
    """``count`` runs drawn from the float model's own streams over calibration clips."""
    rng = np.random.default_rng(seed)
    session = make_session(model)
    runs: list[Feeds] = []
    for _ in range(CALIBRATION_CLIPS):
        stream(session, synthesize_clip(rng)[0], record=runs)
    picked = rng.choice(len(runs), size=min(count, len(runs)), replace=False)
    return [runs[i] for i in sorted(picked)]


def evaluation_clips(count: int, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` held-out clips with their per-sample labels."""
    rng = np.random.default_rng(seed)
    return [synthesize_clip(rng) for _ in range(count)]


def case(work: Path, evaluation: int = 40) -> Case:
    """Silero VAD on ``evaluation`` synthesised clips, calibrated on 256 streamed chunks of other clips."""
    model = model_path(work)
    clips = evaluation_clips(evaluation)

    def run(session: Any) -> list[list[np.ndarray]]:
        """Stream every evaluation clip through ``session``; per clip [chunk probabilities]."""
        return [[stream(session, audio)] for audio, _ in clips]

    return Case(
        name="silero_vad",
        field="audio: voice activity detection",
        source=f"{PACKAGE}=={VERSION} silero_vad/data/silero_vad.onnx (MIT)",
        model=model,
        calibration=calibration_feeds(model),
        run=run,
        metric=decision_agreement,
        metric_name="speech decision agreement (%)",
        target=99.0,
        notes=f"{evaluation} clips of {CLIP_SECONDS:g} s streamed in 512-sample chunks ({int(CLIP_SECONDS * SAMPLE_RATE) // CHUNK} runs a clip)",
        truth=lambda outputs: label_accuracy(outputs, clips),
        truth_name="decisions matching the speech labels (%)",
    )
