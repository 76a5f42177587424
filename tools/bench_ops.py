"""Benchmark of onnxq's integer convolution ops against onnxruntime, one thread, in one run.

Per layer (ResNet-18 conv shapes, depthwise ones, a 1x1 one, batch 1 and 8): onnxruntime's float
Conv, its uint8 x int8 QLinearConv (input already quantized), and onnxq's IntConv (4-bit
uniform) and PostConv (4-bit POST), both taking float input and quantizing it inside. On a CPU
with AVX-512 VNNI two more columns force the ops' AVX2 kernels (attribute kernel=2): a proxy for
AVX2-only CPUs, measured on this one.
Gemm/MatMul layers (classifiers at batch 1 and 8, transformer projections over 128 tokens): onnxruntime's
float MatMul, its dynamic uint8 x int8 path (DynamicQuantizeLinear + MatMulInteger, which it fuses into
DynamicQuantizeMatMul), onnxq's weight-only qdq format at 8 and 4 bits (plain codes), its weights decoded at
load (Cast and Mul, which onnxruntime folds) or run as onnxruntime's MatMulNBits, and onnxq's rewrite to IntConv/PostConv (onnxq/rewrite/gemm.py),
forced on the small shapes the rewrite keeps QDQ. Whole models (the shipped Fashion-MNIST ones): float,
onnxq's qdq format at 8 and 4 bits (weights decoded at load by default), the 4-bit one with every MatMul weight as
MatMulNBits (--matmul-nbits on), and the int and post formats. Ratios are against float measured in the same run.

    python tools/bench_ops.py [--repeats 20] [--skip-models] [--skip-convs] [--skip-gemms] [--layers dw] [--given-scale]
                              [--u8] [--eight-bit] [--tensor-steps] [--median N] [--interleave]

--layers runs only the layers whose name contains one of the words given; --given-scale adds
columns for the same ops fed a calibrated x_scale/x_zero_point (no min/max pass over X). --u8 adds
the form that keeps data uint8 between layers: IntConvQ (4-bit) with uint8 X (given x_scale), the
Relu fused (clip_min 0) and uint8 Y ("IntConv u8 in/out", and its forced-AVX2 twin), against the
same float Conv without a Relu. --eight-bit adds IntConv with 8-bit and 7-bit weights and their forced-AVX2 twins
(AVX2 splits 8-bit weights into a high and a low part, so that vpmaddubsw's int16 pair sums cannot saturate; 7-bit
ones, |w| <= 64, it keeps whole, widening its int16 sums after every block or two of k).
--tensor-steps adds, for the Gemm/MatMul shapes, the IntConv 4-bit rewrite with one dynamic step per tensor instead of
one per row (x_steps dropped, and its forced-AVX2 twin): what the per-row steps cost.
--median N measures each row in N rounds, every round timing every model of the row once (the least
thread CPU time of --repeats runs), and prints the median over the rounds of each round's ratio to
float (float's ms: the median of its rounds); --interleave runs each round's models in a fresh random
order, so that none always follows the same neighbour (a run is slower after a model that evicted
its data). Without them: one round, models in a fixed order.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxq import NBitsMode, QuantizeConfig, WeightFormat, quantize  # noqa: E402
from onnxq.config import SqrtMode  # noqa: E402
from onnxq.native.cpu import cpu_flags  # noqa: E402
from onnxq.native.domain import DOMAIN  # noqa: E402
from onnxq.native.session import session_options, uses_onnxq_ops  # noqa: E402
from onnxq.rewrite import gemm as rewrite_gemm  # noqa: E402
from tools.machine import cpu_description  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# (name, C_in, C_out, H=W, kernel, stride, group)
LAYERS = [
    ("64->64 3x3 @56", 64, 64, 56, 3, 1, 1),
    ("128->128 3x3 @28", 128, 128, 28, 3, 1, 1),
    ("256->256 3x3 @14", 256, 256, 14, 3, 1, 1),
    ("512->512 3x3 @7", 512, 512, 7, 3, 1, 1),
    ("dw 144 3x3 @28", 144, 144, 28, 3, 1, 144),
    ("dw 576 3x3 @7", 576, 576, 7, 3, 1, 576),
    # MobileNetV2's other kinds of layer (fmnist_mobilenetv2): stride-2 depthwise, 1x1 on a small image
    ("dw 96 3x3 /2 @28", 96, 96, 28, 3, 2, 96),
    ("1x1 64->384 @7", 64, 384, 7, 1, 1, 1),
    # fmnist_resnet20's small layers: 16 and 32 output channels (GemmT's one and two blocks of rows), the stride-2 1x1 shortcut
    ("r20 16->16 3x3 @28", 16, 16, 28, 3, 1, 1),
    ("r20 32->32 3x3 @14", 32, 32, 14, 3, 1, 1),
    ("r20 1x1 16->32 /2 @28", 16, 32, 28, 1, 2, 1),
    ("mb 1x1 24->144 @14", 24, 144, 14, 1, 1, 1),
]

# (name, rows shape, K, M): the input is (*rows, K)
GEMMS = [
    ("classifier 512->1000", [1], 512, 1000),
    ("classifier 512->1000", [8], 512, 1000),
    ("classifier 1280->1000", [1], 1280, 1000),
    ("classifier 1280->1000", [8], 1280, 1000),
    ("ResNet-20 fc 64->10", [1], 64, 10),
    ("ResNet-20 fc 64->10", [8], 64, 10),
    ("128->128", [8], 128, 128),  # sizes about the rewrite's MIN_WEIGHTS
    ("256->256", [1], 256, 256),
    ("256->256", [8], 256, 256),
    ("512->512", [1], 512, 512),
    ("transformer 768->768", [1, 128], 768, 768),
    ("transformer 768->3072", [1, 128], 768, 3072),
    ("transformer 768->3072", [1, 1], 768, 3072),  # one token at a time
    ("LLM 4096->4096", [1, 1], 4096, 4096),
    ("LLM 4096->4096", [1, 32], 4096, 4096),
]


def one_thread_session(model: onnx.ModelProto, library: str | None = None) -> ort.InferenceSession:
    """A one-thread session of ``model``; its onnxq ops from ``library`` when given (another build, for A/B runs)."""
    options = session_options(threads=1, custom_ops=library is None and uses_onnxq_ops(model))
    if library is not None:
        options.register_custom_ops_library(library)
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def best_ms(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], repeats: int) -> float:
    """Least CPU time of the calling thread over the runs, in ms.

    One-thread sessions run every kernel on the calling thread, so its CPU time is the run's; unlike
    wall time it leaves out the time other processes hold the core, and the least of several runs
    leaves out most of what they do to its caches (these machines are shared).
    """
    sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t = time.thread_time()
        sess.run(None, feeds)
        times.append(time.thread_time() - t)
    return 1e3 * min(times)


class Rounds:
    """How each row is measured: ``count`` rounds of every model once, in a fresh random order when ``interleave``."""

    def __init__(self, repeats: int, count: int = 1, interleave: bool = False, seed: int = 0) -> None:
        self.repeats, self.count, self.interleave = repeats, count, interleave
        self.order = random.Random(seed)

    def times(self, runs: list[tuple[ort.InferenceSession, dict[str, np.ndarray]]]) -> list[list[float]]:
        """Per (session, feeds), its least thread CPU time in ms in each round."""
        times: list[list[float]] = [[] for _ in runs]
        for _ in range(self.count):
            order = list(range(len(runs)))
            if self.interleave:
                self.order.shuffle(order)
            for index in order:
                session, feeds = runs[index]
                times[index].append(best_ms(session, feeds, self.repeats))
        return times

    def row(self, runs: list[tuple[ort.InferenceSession, dict[str, np.ndarray]]]) -> tuple[float, list[float]]:
        """Float's ms (the first run) and each other run's speed-up over it: medians over the rounds."""
        times = self.times(runs)
        base = times[0]
        return statistics.median(base), [statistics.median(b / t for b, t in zip(base, other, strict=True)) for other in times[1:]]

    def describe(self) -> str:
        """How the cells were measured, for the header line."""
        if self.count == 1:
            return f"least thread CPU time of {self.repeats} runs" + (", models in a random order" if self.interleave else "")
        order = ", in a fresh random order each round" if self.interleave else ", in a fixed order"
        return (f"median over {self.count} interleaved rounds of each round's ratio (a round times every model of a row once{order}; "
                f"a model's time in a round is its least thread CPU time of {self.repeats} runs; float ms: the median of its rounds)")


def conv_model(c_in: int, c_out: int, k: int, stride: int, group: int, weight: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[k // 2] * 4, strides=[stride] * 2, group=group)
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C", "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M", "P", "Q"])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def qlinear_conv_model(k: int, stride: int, group: int, weight: np.ndarray) -> onnx.ModelProto:
    w_scale = (np.abs(weight).reshape(len(weight), -1).max(axis=1) / 127).astype(np.float32)
    w_q = np.clip(np.rint(weight / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array(w_q, "w"),
        numpy_helper.from_array(w_scale, "ws"),
        numpy_helper.from_array(np.zeros(len(weight), np.int8), "wz"),
        numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
        numpy_helper.from_array(np.array(128, np.uint8), "yz"),
    ]
    inputs = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"]
    node = helper.make_node("QLinearConv", inputs, ["y"], pads=[k // 2] * 4, strides=[stride] * 2, group=group)
    x_info = helper.make_tensor_value_info("x", TensorProto.UINT8, None)
    y_info = helper.make_tensor_value_info("y", TensorProto.UINT8, None)
    graph = helper.make_graph([node], "qconv", [x_info], [y_info], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def with_kernel(model: onnx.ModelProto, kernel: int) -> onnx.ModelProto:
    """A copy of ``model`` whose onnxq ops run the kernel given (their ``kernel`` attribute: 2 AVX2)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.domain == DOMAIN:
            node.attribute.append(helper.make_attribute("kernel", kernel))
    return copy


def with_given_scale(model: onnx.ModelProto, x_scale: float, x_zero_point: int) -> onnx.ModelProto:
    """A copy of ``model`` whose onnxq ops take a calibrated x_scale/x_zero_point instead of quantizing X dynamically."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.initializer.extend(
        [numpy_helper.from_array(np.array(x_scale, np.float32), "x_scale"), numpy_helper.from_array(np.array(x_zero_point, np.uint8), "x_zero_point")]
    )
    for node in copy.graph.node:
        if node.domain == DOMAIN:
            inputs = list(node.input) + [""] * (4 - len(node.input))
            del node.input[:]
            node.input.extend(inputs[:4] + ["x_scale", "x_zero_point"])
            rewrite_gemm.drop_pixel_steps(node)  # (the op allows per-row steps only without x_scale)
    return copy


def with_tensor_steps(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose onnxq ops quantize X with one dynamic step per tensor (x_steps dropped).

    As the Gemm rewrite's IntConv did before it took a step per row: the difference is what the per-row pass costs.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.domain == DOMAIN:
            rewrite_gemm.drop_pixel_steps(node)
    return copy


def with_uint8_io(model: onnx.ModelProto, x_scale: float, y_scale: float) -> onnx.ModelProto:
    """A copy of ``model`` (one IntConv/PostConv node) as its uint8-in, uint8-out form.

    X uint8 with the given step (zero point 0), the Relu fused (clip_min 0), Y quantized to uint8 with y_scale (zero point 0)
    by IntConvQ/PostConvQ.
    """
    copy = with_given_scale(model, x_scale, 0)
    copy.graph.initializer.extend(
        [numpy_helper.from_array(np.array(y_scale, np.float32), "y_scale"), numpy_helper.from_array(np.array(0, np.uint8), "y_zero_point")]
    )
    for node in copy.graph.node:
        if node.domain == DOMAIN:
            node.op_type += "Q"
            node.input.extend(["y_scale", "y_zero_point"])
            node.attribute.append(helper.make_attribute("clip_min", 0.0))
    copy.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    copy.graph.output[0].type.tensor_type.elem_type = TensorProto.UINT8
    return copy


def has_avx512_vnni() -> bool:
    """Whether the ops' default kernel here is the AVX-512 VNNI one (so forcing AVX2 measures something else)."""
    return {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags()  # (less what tools/avx2_only.py hides)


def bench_layers(rounds: Rounds, layers: list[str] | None = None, given_scale: bool = False, uint8_io: bool = False,
                 eight_bit: bool = False) -> None:
    proxy = has_avx512_vnni()
    titles = ["IntConv 4-bit", "PostConv 4-bit"] + (["IntConv AVX2 (forced)", "PostConv AVX2 (forced)"] if proxy else [])
    if given_scale:
        titles += [t + " x_scale" for t in titles]
    if uint8_io:
        titles += ["IntConv u8 in/out"] + (["IntConv u8 in/out AVX2 (forced)"] if proxy else [])
    if eight_bit:
        titles += ["IntConv 8-bit", "IntConv 7-bit"] + (["IntConv 8-bit AVX2 (forced)", "IntConv 7-bit AVX2 (forced)"] if proxy else [])
    print("| layer | batch | float Conv ms | QLinearConv u8xs8 | " + " | ".join(titles) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(titles))
    for index, (name, c_in, c_out, size, k, stride, group) in enumerate(LAYERS):
        if layers and not any(word in name for word in layers):
            continue
        rng = np.random.default_rng(index)  # (its own seed: a subset measures the same data as the full table)
        weight = (rng.standard_normal((c_out, c_in // group, k, k)) * 0.05).astype(np.float32)
        float_model = conv_model(c_in, c_out, k, stride, group, weight)
        ops = {
            fmt: quantize(float_model, QuantizeConfig(bits=4, format=fmt, first_last_bits=None)) for fmt in (WeightFormat.INT, WeightFormat.POST)
        }
        variants = list(ops.values()) + ([with_kernel(m, 2) for m in ops.values()] if proxy else [])
        if given_scale:  # X is uniform in [0, 1): the range a calibration would give
            variants += [with_given_scale(m, 1 / 255, 0) for m in variants]
        uint8_variants = []
        if uint8_io:  # X as its uint8 codes (step 1/255), Y's step about its range after the Relu
            uint8_io_model = with_uint8_io(ops[WeightFormat.INT], 1 / 255, 0.02)
            uint8_variants = [uint8_io_model] + ([with_kernel(uint8_io_model, 2)] if proxy else [])
        eight_variants = []
        if eight_bit:  # AVX2 splits 8-bit codes into two parts whose int16 pair sums cannot saturate; 7-bit ones stay whole
            wide = [quantize(float_model, QuantizeConfig(bits=b, format=WeightFormat.INT, first_last_bits=None)) for b in (8, 7)]
            eight_variants = wide + ([with_kernel(m, 2) for m in wide] if proxy else [])
        models = [float_model, qlinear_conv_model(k, stride, group, weight), *variants, *uint8_variants, *eight_variants]
        sessions = [one_thread_session(m) for m in models]
        for batch in (1, 8):
            x = rng.random((batch, c_in, size, size), dtype=np.float32)
            x_u8 = (x * 255).astype(np.uint8)
            feeds = ([{"x": x}, {"x": x_u8}] + [{"x": x}] * len(variants) + [{"x": x_u8}] * len(uint8_variants)
                     + [{"x": x}] * len(eight_variants))
            base, speedups = rounds.row(list(zip(sessions, feeds, strict=True)))
            cells = [f"{r:.2f}x" for r in speedups]
            print(f"| {name} | {batch} | {base:.2f} | " + " | ".join(cells) + " |", flush=True)


def matmul_model(rows: list[int], weight: np.ndarray) -> onnx.ModelProto:
    """A float MatMul x (*rows, K) -> MatMul(W (K, M)) -> y, opset 21."""
    k, m = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*rows, m])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def dynamic_int8_model(rows: list[int], weight: np.ndarray) -> onnx.ModelProto:
    """The dynamic quantization of a MatMul by onnxruntime (what its quantize_dynamic writes; fused into DynamicQuantizeMatMul)."""
    k, m = weight.shape
    w_scale = (np.abs(weight).max(axis=0) / 127).astype(np.float32)
    w_q = np.clip(np.rint(weight / w_scale), -127, 127).astype(np.int8)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "w", "xz"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "ws"], ["s"]),
        helper.make_node("Mul", ["accf", "s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "dynamic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*rows, m])],
        [numpy_helper.from_array(w_q, "w"), numpy_helper.from_array(w_scale, "ws")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def bench_gemms(rounds: Rounds, layers: list[str] | None = None, tensor_steps: bool = False) -> None:
    """Gemm/MatMul shapes: float, onnxruntime's int8 paths, onnxq's QDQ, and the rewrite to IntConv/PostConv.

    ``tensor_steps``: also IntConv 4-bit with one dynamic step per tensor instead of per row (and its forced-AVX2 twin).
    """
    proxy = has_avx512_vnni()
    titles = ["dynamic u8xs8", "int8 at load", "int8 MatMulNBits", "int4 at load", "int4 MatMulNBits", "IntConv 4-bit", "PostConv 4-bit",
              "IntConv 8-bit"]
    titles += ["IntConv AVX2 (forced)", "PostConv AVX2 (forced)"] if proxy else []
    titles += (["IntConv 4-bit per tensor"] + (["IntConv per tensor AVX2 (forced)"] if proxy else [])) if tensor_steps else []
    print("\n| Gemm/MatMul | rows | float MatMul ms | " + " | ".join(titles) + " |")
    print("|---|---:|---:|" + "---:|" * len(titles))
    configs = [
        QuantizeConfig(bits=8, first_last_bits=None, matmul_nbits=NBitsMode.OFF),
        QuantizeConfig(bits=8, first_last_bits=None, matmul_nbits=NBitsMode.ON),
        QuantizeConfig(bits=4, first_last_bits=None, sqrt=SqrtMode.OFF, matmul_nbits=NBitsMode.OFF),
        QuantizeConfig(bits=4, first_last_bits=None, matmul_nbits=NBitsMode.ON),
        QuantizeConfig(bits=4, format=WeightFormat.INT, first_last_bits=None),
        QuantizeConfig(bits=4, format=WeightFormat.POST, first_last_bits=None),
        QuantizeConfig(bits=8, format=WeightFormat.INT, first_last_bits=None),
    ]
    kept = rewrite_gemm.MIN_WEIGHTS
    rewrite_gemm.MIN_WEIGHTS = 0  # measure the op path on the small shapes too (the rewrite keeps them QDQ)
    try:
        for index, (name, rows, k, m) in enumerate(GEMMS):
            if layers and not any(word in name for word in layers):
                continue
            rng = np.random.default_rng(100 + index)
            weight = (rng.standard_normal((k, m)) * 0.05).astype(np.float32)
            float_model = matmul_model(rows, weight)
            models = [dynamic_int8_model(rows, weight)] + [quantize(float_model, config) for config in configs]
            models += [with_kernel(model, 2) for model in models[5:7]] if proxy else []
            if tensor_steps:
                per_tensor = with_tensor_steps(models[5])
                models += [per_tensor] + ([with_kernel(per_tensor, 2)] if proxy else [])
            feeds = {"x": rng.standard_normal((*rows, k)).astype(np.float32)}
            base, speedups = rounds.row([(one_thread_session(model), feeds) for model in [float_model, *models]])
            cells = [f"{r:.2f}x" for r in speedups]
            print(f"| {name} | {int(np.prod(rows))} | {base:.3f} | " + " | ".join(cells) + " |", flush=True)
    finally:
        rewrite_gemm.MIN_WEIGHTS = kept


def bench_models(rounds: Rounds) -> None:
    print("\n| model | batch | float ms | int8 qdq | int4 qdq | int4 MatMulNBits | int (IntConv) | post (PostConv) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for path in sorted((REPO / "models").glob("*.onnx")):
        float_model = onnx.load(path)
        variants = [
            QuantizeConfig(bits=8),
            QuantizeConfig(bits=4),
            QuantizeConfig(bits=4, matmul_nbits=NBitsMode.ON),
            QuantizeConfig(bits=4, format=WeightFormat.INT),
            QuantizeConfig(bits=4, format=WeightFormat.POST),
        ]
        models = [quantize(float_model, config) for config in variants]
        name = float_model.graph.input[0].name
        sessions = [one_thread_session(m) for m in [float_model, *models]]
        for batch in (1, 8):
            feeds = {name: rng.random((batch, 1, 28, 28), dtype=np.float32)}
            base, speedups = rounds.row([(session, feeds) for session in sessions])
            cells = [f"{r:.2f}x" for r in speedups]
            print(f"| {path.stem} | {batch} | {base:.2f} | " + " | ".join(cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--skip-convs", action="store_true", help="leave out the conv layers")
    parser.add_argument("--skip-gemms", action="store_true", help="leave out the Gemm/MatMul layers")
    parser.add_argument("--layers", nargs="+", metavar="WORD", help="only the layers whose name contains one of these (e.g. dw)")
    parser.add_argument("--given-scale", action="store_true", help="also run the ops with a calibrated x_scale/x_zero_point")
    parser.add_argument("--u8", action="store_true", help="also run IntConvQ with uint8 X and Y and the Relu fused (data kept uint8)")
    parser.add_argument("--eight-bit", action="store_true", help="also run IntConv with 8- and 7-bit weights (and their forced-AVX2 twins)")
    parser.add_argument("--tensor-steps", action="store_true",
                        help="Gemm/MatMul: also IntConv 4-bit with one dynamic step per tensor instead of per row (what the per-row pass costs)")
    parser.add_argument("--median", type=int, default=1, metavar="N", help="measure N rounds per row and print medians (default 1)")
    parser.add_argument("--interleave", action="store_true", help="run each round's models in a fresh random order")
    args = parser.parse_args(argv)
    if args.median < 1:
        parser.error("--median takes a number of rounds, 1 or more")
    rounds = Rounds(args.repeats, args.median, args.interleave)
    print(cpu_description())
    print(f"onnxruntime {ort.__version__}, one thread; cells are speed-ups over float (higher is faster), {rounds.describe()}\n")
    if not args.skip_convs:
        bench_layers(rounds, args.layers, args.given_scale, args.u8, args.eight_bit)
    if not args.skip_gemms:
        bench_gemms(rounds, args.layers, args.tensor_steps)
    if not args.skip_models:
        bench_models(rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
