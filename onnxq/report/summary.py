"""What ``onnxq quantize`` prints after a run: counts, formats, what stayed float and why, sizes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from onnxq.model.save import referenced_files
from onnxq.native.domain import CONV_OPS, LOOKUP_OP, MATMUL_INTEGER_TO_FLOAT, MATMUL_NBITS, ORT_DOMAIN
from onnxq.pipeline import LayerResult, QuantizationResult
from onnxq.plan.weights import Skipped


def human_bytes(n: int) -> str:
    """Bytes as B, KiB, MiB or GiB with three significant figures."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def file_size(path: Path) -> int:
    """Size of a model file plus the external-data files it refers to (a stale ``.data`` beside it does not count)."""
    return path.stat().st_size + sum(data.stat().st_size for data in referenced_files(path) if data.is_file())


def layer_table(result: QuantizationResult) -> str:
    """One line per quantized weight: node, bits, mode, alpha, SQNR."""
    rows = [f"  {'node':<36} {'op':<8} {'bits':>4} {'mode':<5} {'alpha':>6} {'SQNR dB':>8}"]
    readers = Counter(layer.nodes for layer in result.layers)
    for layer in result.layers:
        tag = f" [{layer.tensor}]" if readers[layer.nodes] > 1 else ""  # a node with several weights (an LSTM's W and R): which
        node = ",".join(layer.nodes)
        room = max(36 - len(tag), 12)
        node = (node if len(node) <= room else node[: room - 3] + "...") + tag
        mode = "post" if layer.op == "PostConv" else "sqrt" if layer.sqrt else "plain"
        rows.append(f"  {node:<36} {layer.op_types[0]:<8} {layer.bits:>4} {mode:<5} {layer.alpha_median:>6.3f} {layer.sqnr_db:>8.1f}")
    return "\n".join(rows)


#: What each bits rule is called in the summary, and what to do when it kept most weights from -b bits.
_RULES = {
    "first/last": ("the first and last layers keep --first-last-bits {first_last}", "--first-last-bits {bits} quantizes them at {bits} bits too"),
    "reduced range": ("8-bit weights that integer products read are 7-bit (reduced range, for CPUs without VNNI)", "--reduce-range off keeps 8 bits"),
    "per node": ("per-node bits", ""),
    "mixed precision": ("mixed precision raised them", ""),
}


def few_at_requested_bits(result: QuantizationResult) -> str | None:
    """A line saying why, when fewer than half of the weight values got the bits asked for with -b; else None."""
    total = sum(layer.weights for layer in result.layers)
    requested = result.requested_bits
    if requested is None or not total:
        return None
    at_requested = sum(layer.weights for layer in result.layers if layer.bits == requested)
    if at_requested * 2 >= total:
        return None
    by_rule = Counter()
    for layer in result.layers:
        if layer.bits != requested:
            by_rule[layer.bits_rule] += layer.weights
    reasons, advice = [], []
    for rule, _ in by_rule.most_common():
        said, todo = _RULES.get(rule, (rule or "other rules", ""))
        reasons.append(said.format(first_last=result.first_last_bits))
        if todo:
            advice.append(todo.format(bits=requested))
    share = f"{100 * at_requested / total:.0f}%"
    line = f"note: only {share} of the weights are at -b {requested} bits: {'; '.join(reasons)}"
    return line + (f" ({'; '.join(advice)})" if advice else "")


def eight_bit_ops(result: QuantizationResult) -> str | None:
    """A line when onnxq's ops got 8-bit codes, which CPUs without VNNI run at about half speed (ReduceRange); else None."""
    eight = sum(layer.op in CONV_OPS and layer.bits == 8 for layer in result.layers)
    if not eight:
        return None
    layers = "op layer has" if eight == 1 else "op layers have"
    return (f"note: {eight} onnxq {layers} 8-bit codes, which CPUs without VNNI (AVX2-only) run as two streams at about "
            "float's speed or slower; --reduce-range on writes 7-bit codes, which they sum in one (dense layers)")


def _outside_op(layer: LayerResult, weight_only: bool) -> str:
    """How a layer that onnxq's ops do not run runs instead, as the summary says it after the layer's nodes.

    Weight-only, a weight written for the qdq format is decoded when the model loads (onnxq/rewrite/qdq.py).
    """
    if layer.op == MATMUL_NBITS:
        return " (onnxruntime's MatMulNBits)"
    if layer.op == MATMUL_INTEGER_TO_FLOAT:
        return " (onnxruntime's MatMulIntegerToFloat, bias inside)"
    return " (decoded at load)" if weight_only else " (QDQ)"


def summary(result: QuantizationResult, source: Path | None, output: Path, verbose: bool = False) -> str:
    """The few lines the CLI prints after a run."""
    bits = Counter(layer.bits for layer in result.layers)
    by_bits = ", ".join(f"{n} at {b} bits" for b, n in sorted(bits.items()))
    sqrt = sum(layer.sqrt for layer in result.layers)
    blocks = Counter(layer.block_size for layer in result.layers if layer.block_size)
    in_blocks = "".join(f", {n} with a scale per {b} inputs" for b, n in sorted(blocks.items()))
    lines = [f"quantized {len(result.layers)} weight tensors: {by_bits} ({sqrt} in sqrt mode{in_blocks})"]
    if result.activations:
        act_bits = Counter(a.params.bits for a in result.activations)
        adaptive = sum(a.adapter is not None and a.adapter.adaptive for a in result.activations)
        method = result.calibration.value if result.calibration else "?"
        per_input = f", {adaptive} with per-input ASQ steps" if adaptive else ""
        by = ", ".join(f"{n} at {b} bits" for b, n in sorted(act_bits.items()))
        lines.append(f"quantized {len(result.activations)} activation tensors: {by} ({method} calibration{per_input})")
    elif result.calibration is not None and not result.float_activations:
        lines.append("quantized 0 activation tensors: no quantized layer here reads a float32 activation as a product onnxruntime fuses "
                     "(lookups, recurrent and Einsum layers, float16 layers and control-flow bodies keep float inputs)")
    if result.float_activations:
        shown = ", ".join(result.float_activations[:3]) + (" ..." if len(result.float_activations) > 3 else "")
        lines.append(f"left float: {len(result.float_activations)} activation tensors no onnxq op reads ({shown}): onnxruntime's "
                     "QLinearMatMul and pairs, or ASQ's per-channel steps, ran such readers slower than float (--format qdq quantizes them)")
    ops = Counter(layer.op for layer in result.layers if layer.op in CONV_OPS)
    lookups = sum(layer.op == LOOKUP_OP for layer in result.layers)
    if lookups:
        lines.append(f"embedding tables: {lookups} looked up by onnxruntime's {LOOKUP_OP} ({ORT_DOMAIN}), which dequantizes only the rows it reads")
    if nbits := [layer for layer in result.layers if layer.op == MATMUL_NBITS]:
        widths = "/".join(str(b) for b in sorted({layer.storage_bits for layer in nbits}))
        lines.append(f"matrix products: {len(nbits)} weights run as onnxruntime's {MATMUL_NBITS} ({ORT_DOMAIN}) on their {widths}-bit codes, "
                     "which onnxruntime does not dequantize on every run")
    if ops:
        counts = ", ".join(f"{n} {op}" for op, n in sorted(ops.items()))
        lines.append(f"onnxq ops: {counts}; the model runs only with onnxq's op library (onnxq.get_library_path())")
        if result.calibration is None:  # weight-only: the ops still quantize their inputs, each run by its own min/max
            lines.append("note: the ops quantize their inputs to uint8 on every run from that run's min and max, which QDQ keeps "
                         "float; an outlier then sets the step (--calibration DATA gives calibrated steps), and their 2-4 bit "
                         "codes are plain where QDQ may pick sqrt codes")
        if (note := eight_bit_ops(result)) is not None:
            lines.append(note)
    if result.chains is not None and (chains := result.chains.line()) is not None:
        lines.append(chains)
    kept = [layer for layer in result.layers if layer.qdq_reason]
    if kept:
        shown = "; ".join(f"{','.join(layer.nodes)}{_outside_op(layer, not result.activations)}: {layer.qdq_reason}" for layer in kept[:3])
        more = " ..." if len(kept) > 3 else ""
        lines.append(f"not run by onnxq's ops: {len(kept)} layers ({shown}{more})")
    if (note := few_at_requested_bits(result)) is not None:
        lines.append(note)
    if verbose:
        lines.append(layer_table(result))
    if result.skipped:
        lines.append(f"left in float: {len(result.skipped)} nodes ({_skipped_by_reason(result.skipped)})")
    after = file_size(output)
    if source is not None:
        before = file_size(source)
        lines.append(f"size: {human_bytes(before)} -> {human_bytes(after)} ({after / before:.3f}x)")
    else:
        lines.append(f"size: {human_bytes(after)}")
    lines.append(f"wrote {output}")
    return "\n".join(lines)


def _skipped_by_reason(skipped: list[Skipped], shown: int = 3) -> str:
    """The first ``shown`` reasons nodes stay float for, each once with its first node (and how many more share it)."""
    by_reason: dict[str, list[str]] = {}
    for entry in skipped:
        by_reason.setdefault(entry.reason, []).append(entry.node)
    parts = [f"{nodes[0]}{f' and {len(nodes) - 1} more' if len(nodes) > 1 else ''}: {reason}" for reason, nodes in list(by_reason.items())[:shown]]
    return "; ".join(parts) + (" ..." if len(by_reason) > shown else "")
