"""What ``onnxq inspect`` prints: a model's weighted nodes as a table, and totals by format."""

from __future__ import annotations

from onnxq.analysis.inventory import Inventory
from onnxq.native.domain import DOMAIN
from onnxq.report.summary import human_bytes


def _columns(rows: list[list[str]], right: set[int]) -> list[str]:
    """Rows of cells padded into aligned columns (those in ``right`` right-aligned)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    cells = ((c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in rows)
    return ["  " + "  ".join(line).rstrip() for line in cells]


def inventory_table(inventory: Inventory) -> str:
    """What ``onnxq inspect`` prints: the model, a line per weighted node, and totals by format."""
    opsets = ", ".join(f"{d} {v}" for d, v in inventory.opsets.items())
    lines = [f"{inventory.path or '<model>'}: {human_bytes(inventory.file_bytes)}, opsets {opsets}"]
    for location, size in inventory.external_files.items():
        lines.append(f"external data {location}: {human_bytes(size) if size is not None else 'MISSING'}")
    if inventory.needs_onnxq_library:
        lines.append("needs onnxq's op library to run (onnxq.session() or onnxq.get_library_path())")
    others = [d for d in inventory.custom_domains if d != DOMAIN]
    if others:
        lines.append(f"custom op domains: {', '.join(others)} (need their own libraries)")
    if not inventory.nodes:
        lines.append("no weighted nodes")
        return "\n".join(lines)
    rows = [["node", "op", "format", "bits", "granularity", "sqrt", "activations", "shape", "weight", "scales"]]
    for n in inventory.nodes:
        granularity = n.granularity or "-"
        if n.granularity == "block":
            granularity = f"block {n.block_size}"
        elif n.granularity == "channel" and n.axis is not None:
            granularity = f"channel (axis {n.axis})"
        rows.append([n.node, n.op_type, n.format, str(n.bits), granularity, "yes" if n.sqrt else "-", n.activations,
                     "x".join(map(str, n.shape)) or "scalar", human_bytes(n.weight_bytes), human_bytes(n.scale_bytes) if n.scales else "-"])
    lines += _columns(rows, right={3, 8, 9})
    by_format = ", ".join(f"{fmt} {human_bytes(size)}" for fmt, size in inventory.weight_bytes_by_format.items())
    tensors = len({n.weight for n in inventory.nodes})
    scales = human_bytes(inventory.scale_bytes)
    other = max(inventory.initializer_bytes - sum(inventory.weight_bytes_by_format.values()) - inventory.scale_bytes, 0)
    nodes = len({n.node for n in inventory.nodes})  # a recurrent layer has a row per weight
    counts = f"{tensors} tensor{'s' * (tensors != 1)}, {nodes} node{'s' * (nodes != 1)}"
    lines.append(f"weights: {by_format} ({counts}); scales and zero points {scales}; "
                 f"other tensors {human_bytes(other)}")
    return "\n".join(lines)
