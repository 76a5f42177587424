"""Benchmark of quantized embedding lookups against the float Gather, one thread, in one run.

For each table shape and number of looked-up tokens it times a model that is only the lookup, six ways:
the float Gather; DequantizeLinear of the whole table then Gather (the weight-only QDQ form, at int8 and int4);
onnxruntime's GatherBlockQuantized as onnxq writes it (int8 and int4 codes, one block per row; the 4-bit codes as
uint8 nibble pairs); and the same 4-bit op reading the same codes stored as an int4 tensor, the storage onnxq keeps
only for tables whose rows have odd length (they cannot be split into pairs). The quantized models are onnxq's own
output for the float one, except the QDQ columns and the int4-storage column, which are built here from it.
Cells are the least thread CPU time of the runs, as ratios to the float Gather (higher is slower); the last column
is the int4-storage lookup's time over the nibble-pair lookup's.

    python tools/bench_tables.py [--runs 200] [--shapes 30000x256 50000x768] [--tokens 16 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxq import QuantizeConfig, quantize  # noqa: E402
from onnxq.config import SqrtMode  # noqa: E402
from onnxq.native.domain import LOOKUP_OP  # noqa: E402
from onnxq.numerics.weights import quantize_weight  # noqa: E402
from onnxq.rewrite.qdq import integer_tensor  # noqa: E402
from tools.machine import cpu_description  # noqa: E402

SHAPES = ((30000, 256), (50000, 768))
TOKENS = (16, 512)


def lookup_model(table: np.ndarray, opset: int = 21) -> onnx.ModelProto:
    """ids[1, T] -> Gather(table) -> y[1, T, D]."""
    v = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="lookup")],
        "lookup",
        [v("ids", TensorProto.INT64, [1, "T"])],
        [v("y", TensorProto.FLOAT, [1, "T", table.shape[1]])],
        [numpy_helper.from_array(table, "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def qdq_model(table: np.ndarray, bits: int) -> onnx.ModelProto:
    """The weight-only QDQ alternative: DequantizeLinear(codes, per-row scales) over the whole table, then Gather."""
    q = quantize_weight(table, bits, 0, SqrtMode.OFF)
    model = lookup_model(table)
    graph = model.graph
    del graph.initializer[:]
    graph.initializer.extend([integer_tensor("codes", q.codes, bits), numpy_helper.from_array(q.scale.astype(np.float32), "scale")])
    dq = helper.make_node("DequantizeLinear", ["codes", "scale"], ["table"], name="dq", axis=0)
    nodes = [dq, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def int4_storage_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of onnxq's 4-bit lookup with its uint8 nibble pairs (code + 8, even column low) stored as an int4 tensor instead.

    The op reads int4 data with a zero point of 0 and uint8 pairs with one of 8, so the codes and the values looked
    up are the same; only the storage differs (what onnxq writes for a table whose rows have odd length).
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    (node,) = [n for n in graph.node if n.op_type == LOOKUP_OP]
    index = next(i for i, t in enumerate(graph.initializer) if t.name == node.input[0])
    pairs = numpy_helper.to_array(graph.initializer[index])
    codes = np.empty((pairs.shape[0], 2 * pairs.shape[1]), np.int8)
    codes[:, 0::2] = (pairs & 15).astype(np.int8) - 8
    codes[:, 1::2] = (pairs >> 4).astype(np.int8) - 8
    graph.initializer[index].CopyFrom(integer_tensor(node.input[0], codes, 4))
    return copy


def least_cpu_ms(model: onnx.ModelProto, ids: np.ndarray, runs: int) -> float:
    """Least thread CPU time of one run, in ms."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"ids": ids}
    for _ in range(5):
        session.run(None, feeds)
    best = float("inf")
    for _ in range(runs):
        start = time.thread_time()
        session.run(None, feeds)
        best = min(best, time.thread_time() - start)
    return best * 1e3


def shape(text: str) -> tuple[int, int]:
    rows, columns = text.split("x")
    return int(rows), int(columns)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--shapes", nargs="+", type=shape, default=list(SHAPES), metavar="ROWSxCOLUMNS",
                        help="table shapes (default 30000x256 50000x768; small ones make a quick check)")
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS), help="tokens looked up per run (default 16 512)")
    args = parser.parse_args(argv)
    print(cpu_description())
    print(f"onnxruntime {ort.__version__}, one thread; float Gather in ms, the others as multiples of it "
          f"(least thread CPU time of {args.runs} runs)\n")
    print("| table | tokens | float Gather ms | QDQ int8 | QDQ int4 | onnxq int8 (GatherBlockQuantized) | onnxq int4 (GatherBlockQuantized) "
          "| int4 storage (GatherBlockQuantized) | int4 storage / onnxq int4 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for rows, columns in args.shapes:
        table = (rng.standard_normal((rows, columns)) * 0.05).astype(np.float32)
        onnxq_int4 = quantize(lookup_model(table), QuantizeConfig(bits=4, first_last_bits=None, sqrt=SqrtMode.OFF))
        models = [
            lookup_model(table),
            qdq_model(table, 8),
            qdq_model(table, 4),
            quantize(lookup_model(table), QuantizeConfig(bits=8, first_last_bits=None, sqrt=SqrtMode.OFF)),
            onnxq_int4,
            int4_storage_model(onnxq_int4),
        ]
        for tokens in args.tokens:
            ids = rng.integers(0, rows, (1, tokens))
            times = [least_cpu_ms(m, ids, args.runs) for m in models]
            cells = " | ".join(f"{t / times[0]:.1f}x" for t in times[1:])
            print(f"| {rows}x{columns} | {tokens} | {times[0]:.3f} | {cells} | {times[5] / times[4]:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
