"""Second moments of each weighted layer's input as the layer sees it: H = E[x x^T] over the rows its weight multiplies.

A weight row w (one output channel) meets inputs x the same length as w; the output error (w - q) x has mean square
(w - q) H (w - q)^T (onnxq/numerics/output_error.py). The rows x are:

- MatMul x @ W: the last axis of x; W @ x (the weight first): axis -2 of x; Gemm: A's rows (its columns with transA);
- Conv: each output position's patch, (C/group, kernel...) in the weight's own order, one H per group (a depthwise
  convolution has one small H per channel), with strides, padding (explicit or SAME), dilations, 1-D to 3-D.

H is summed in float64 as the calibration runs stream by (never all activations at once; a convolution's patches one
sample at a time), over every reader of a shared weight. Weights with another kind of reader (ConvTranspose, Einsum,
recurrent layers, lookups, readers inside control-flow bodies) or with an input axis longer than MAX_FEATURES get none,
and are quantized for their own error as before.

The sum costs n K^2 for n rows of K features, which for a convolution over a large image (n = samples x positions)
is many times the layer's own forward pass. Past enough rows for a well-conditioned estimate (MIN_ROWS, or
ROWS_PER_FEATURE times K), a reader keeps every second row, then every fourth, and so on, each kept row counting
for the rows it stands for: H stays an average over all the data, at a bounded cost.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from scipy.linalg import blas

from onnxq.model.graph import attribute, constant_initializers, is_op
from onnxq.plan.weights import WeightPlan

#: Bytes of convolution patches built at a time (a few samples of a large feature map).
PATCH_BYTES = 16 << 20
#: Longest input row a full H is kept for (3x3 x 512 channels; its inverse and sums take seconds, 8192 took minutes):
#: beyond, the weight keeps its own-error quantization.
MAX_FEATURES = 4608
#: Rows a reader sums in full before it starts thinning them: at least MIN_ROWS, at least ROWS_PER_FEATURE x K.
MIN_ROWS = 16384
ROWS_PER_FEATURE = 4
#: Rows whose products gather in float32 before they are added to the float64 sums.
FLUSH_ROWS = 4096
#: Features from which a single group's products use syrk (the upper triangle only).
SYRK_FEATURES = 64
#: Rows of the upper triangle mirrored at a time (small temporaries).
SYMMETRIC_BLOCK = 256


@dataclass(frozen=True)
class LayerInput:
    """How one reader turns its input tensor into rows of the features its weight rows multiply."""

    tensor: str
    kind: str  # "rows" (last axis), "columns" (axis -2: W @ x), "transposed" (Gemm transA), "conv"
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begins then ends, one per spatial axis (auto_pad resolved at run time when empty)
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"

    def features(self, value: np.ndarray) -> int:
        """K: the length of the rows :meth:`rows` makes of ``value``."""
        shape = np.shape(value)
        if self.kind == "rows":
            return shape[-1]
        if self.kind == "columns":
            return shape[-2]
        if self.kind == "transposed":
            return shape[0]
        return shape[1] // self.groups * math.prod(self.kernel)

    def count(self, value: np.ndarray) -> int:
        """How many rows (per group) :meth:`rows` makes of ``value``."""
        shape = np.shape(value)
        if self.kind == "rows":
            return math.prod(shape[:-1])
        if self.kind == "columns":
            return math.prod(shape) // shape[-2]
        if self.kind == "transposed":
            return shape[1]
        return shape[0] * math.prod(self._out_shape(shape[2:]))

    def rows(self, value: np.ndarray, keep: slice | np.ndarray = slice(None)) -> np.ndarray:
        """(groups, n, K) rows of ``value`` (one run of the tensor), only those ``keep`` selects (convolutions build no others)."""
        x = np.asarray(value)
        if self.kind == "rows":
            return x.reshape(1, -1, x.shape[-1])[:, keep]
        if self.kind == "columns":
            return np.moveaxis(x, -2, -1).reshape(1, -1, x.shape[-2])[:, keep]
        if self.kind == "transposed":
            return x.T.reshape(1, -1, x.shape[0])[:, keep]
        if isinstance(keep, slice) and keep == slice(None):
            return self._patches(x)
        return self._picked_patches(x, np.arange(self.count(x))[keep])

    def _padded(self, x: np.ndarray) -> np.ndarray:
        """``x`` with the convolution's padding (explicit or auto_pad) applied to its spatial axes."""
        spatial = x.shape[2:]
        pads = self._resolved_pads(spatial)
        return np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + len(spatial)]) for i in range(len(spatial))])

    def _out_shape(self, spatial: tuple[int, ...]) -> list[int]:
        """Output positions along each spatial axis."""
        pads = self._resolved_pads(spatial)
        return [(spatial[i] + pads[i] + pads[i + len(spatial)] - self.dilations[i] * (self.kernel[i] - 1) - 1) // self.strides[i] + 1
                for i in range(len(spatial))]

    def _picked_patches(self, x: np.ndarray, picked: np.ndarray) -> np.ndarray:
        """The rows of :meth:`_patches` numbered ``picked`` (sample-major, then output position), gathered directly."""
        padded = self._padded(x)
        out = self._out_shape(x.shape[2:])
        sample, position = np.divmod(picked, math.prod(out))
        coords = np.unravel_index(position, out)
        c, taps = x.shape[1], math.prod(self.kernel)
        stacked = np.empty((len(picked), c, taps), dtype=x.dtype)
        for t, offsets in enumerate(itertools.product(*(range(k) for k in self.kernel))):
            index = tuple(p * s + o * d for p, s, o, d in zip(coords, self.strides, offsets, self.dilations, strict=True))
            stacked[:, :, t] = padded[(sample, slice(None), *index)]  # (picked, C): the advanced indices around the slice go first
        per_group = stacked.reshape(len(picked), self.groups, c // self.groups, taps)
        return per_group.transpose(1, 0, 2, 3).reshape(self.groups, len(picked), (c // self.groups) * taps)

    def _patches(self, x: np.ndarray) -> np.ndarray:
        """Conv patches (groups, N * positions, C/group * prod(kernel)), in the weight's (channel, kernel...) order."""
        padded = self._padded(x)
        out = self._out_shape(x.shape[2:])
        taps = []
        for offsets in itertools.product(*(range(k) for k in self.kernel)):
            index = tuple(slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in zip(offsets, self.dilations, self.strides, out, strict=True))
            taps.append(padded[(slice(None), slice(None), *index)])
        stacked = np.stack(taps, axis=2)  # (N, C, taps, *out)
        n, c = x.shape[:2]
        per_group = stacked.reshape(n, self.groups, c // self.groups, len(taps), -1)  # (N, g, C/g, taps, positions)
        return per_group.transpose(1, 0, 4, 2, 3).reshape(self.groups, -1, (c // self.groups) * len(taps))

    def _resolved_pads(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        if self.auto_pad in ("NOTSET", "VALID") or not self.auto_pad:
            return self.pads or (0,) * (2 * len(spatial))
        begins, ends = [], []
        for size, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations, strict=True):
            total = max((math.ceil(size / s) - 1) * s + d * (k - 1) + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(large if self.auto_pad == "SAME_LOWER" else small)
            ends.append(small if self.auto_pad == "SAME_LOWER" else large)
        return tuple(begins + ends)


def _reader_input(node: onnx.NodeProto, input_index: int, dims: tuple[int, ...]) -> LayerInput | None:
    """How ``node`` (reading its weight of ``dims`` at ``input_index``) sees its input, or None where no H is kept."""
    weight_rank = len(dims)
    if is_op(node, "MatMul") and weight_rank == 2:
        return LayerInput(node.input[0], "rows") if input_index == 1 else LayerInput(node.input[1], "columns")
    if is_op(node, "Gemm") and input_index == 1:
        return LayerInput(node.input[0], "transposed" if attribute(node, "transA", 0) else "rows")
    if is_op(node, "Conv") and input_index == 1 and weight_rank >= 3:
        spatial = weight_rank - 2
        auto_pad = attribute(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        return LayerInput(
            node.input[0], "conv", int(attribute(node, "group", 1)), kernel=tuple(dims[2:]),
            strides=tuple(attribute(node, "strides", [1] * spatial)), pads=tuple(attribute(node, "pads", [])),
            dilations=tuple(attribute(node, "dilations", [1] * spatial)), auto_pad=auto_pad,
        )
    return None


def layer_inputs(graph: onnx.GraphProto, plans: Iterable[WeightPlan]) -> dict[str, list[LayerInput]]:
    """Per planned weight, how each of its readers sees its input (rows along the weight's planned channel axis).

    Weights with a reader of another kind, or too long an input row, are left out.
    """
    nodes = {n.name: n for n in graph.node}
    consts = constant_initializers(graph)
    out: dict[str, list[LayerInput]] = {}
    for plan in plans:
        dims = tuple(consts[plan.tensor].dims)
        readers = []
        for use in plan.uses:
            node = nodes.get(use.node)
            found = _reader_input(node, use.input_index, dims) if node is not None and not use.body_of else None
            if found is None or plan.channel_axis != use.channel_axis:  # the readers must agree on the rows (output axis)
                break
            readers.append(found)
        else:
            if readers and math.prod(dims) // dims[plan.channel_axis] <= MAX_FEATURES:
                out[plan.tensor] = readers
    return out


@dataclass
class Moments:
    """Running sums of x x^T and of x (float64) over the rows of a weight's inputs, per group, and the rows they stand for.

    Rows come in order; once ``kept`` passes the cap (MIN_ROWS or ROWS_PER_FEATURE x K), the stride doubles: later rows
    are taken one in ``stride`` (:meth:`take`), each weighted by ``stride`` (the rows it stands for), so ``count`` still counts every row.
    """

    sums: np.ndarray | None = None
    count: int = 0
    kept: int = 0
    stride: int = 1
    seen: int = 0
    pending: np.ndarray | None = None  # float32 sums since the last flush (per group; syrk's upper triangle, Fortran order)
    pending_rows: int = 0
    linear: np.ndarray | None = None  # float64 sum of the rows themselves, per group (for E[x])

    def plan_stride(self, expected_rows: int, features: int) -> None:
        """Start at the stride that keeps about the cap of ``expected_rows`` (the doubling stays for more rows than expected)."""
        cap = _row_cap(features)
        while expected_rows >= 2 * cap * self.stride:
            self.stride *= 2

    def take(self, n: int) -> slice | np.ndarray:
        """Which of the next ``n`` rows to keep (all, or their indices); advances past them.

        One row of each run of ``stride`` rows (counted across calls), at an offset that varies from run to run: a
        fixed offset would keep the same columns of every image row (a convolution's left border, never its right).
        """
        if self.stride == 1:
            self.seen += n
            return slice(None)
        positions = np.arange(self.seen, self.seen + n, dtype=np.uint64)
        self.seen += n
        return np.flatnonzero(positions % np.uint64(self.stride) == kept_offset(positions // np.uint64(self.stride), self.stride))

    def add(self, rows: np.ndarray) -> None:
        """Add the next (groups, n, K) rows, keeping those :meth:`take` picks."""
        self.add_taken(rows[:, self.take(rows.shape[1])])

    def add_taken(self, picked: np.ndarray) -> None:
        """Add rows :meth:`take` picked: their products in float32 (BLAS), each counted ``stride`` times.

        Products gather in float32 (in place, in the layout BLAS writes) over up to FLUSH_ROWS rows, then go into the
        float64 sums: a K x K conversion or copy per small run cost more than the products on models fed one image a run.
        """
        k = picked.shape[2]
        if picked.shape[1] == 0:
            return
        self.pending = _add_products(np.asarray(picked, dtype=np.float32), float(self.stride), self.pending)
        row_sums = np.sum(picked, axis=1, dtype=np.float64) * self.stride
        self.linear = row_sums if self.linear is None else self.linear + row_sums
        self.pending_rows += picked.shape[1]
        if self.pending_rows >= FLUSH_ROWS:
            self.flush()
        self.count += picked.shape[1] * self.stride
        self.kept += picked.shape[1]
        while self.kept >= _row_cap(k) * self.stride.bit_length():
            self.stride *= 2

    def flush(self) -> None:
        """Move the float32 sums into the float64 ones."""
        if self.pending is None:
            return
        self.sums = self.pending.astype(np.float64) if self.sums is None else self.sums + self.pending
        self.pending, self.pending_rows = None, 0

    def hessian(self) -> np.ndarray | None:
        """E[x x^T] per group, (groups, K, K); None before any rows."""
        self.flush()
        return None if self.sums is None or self.count == 0 else _symmetric(self.sums) / self.count

    def mean(self) -> np.ndarray | None:
        """E[x] per group, (groups, K); None before any rows."""
        return None if self.linear is None or self.count == 0 else self.linear / self.count


def kept_offset(runs: np.ndarray, stride: int) -> np.ndarray:
    """The offset of the row kept in each run of ``stride`` rows: a multiplicative hash of the run's number (Knuth's)."""
    return ((np.asarray(runs, dtype=np.uint64) * np.uint64(2654435761)) >> np.uint64(16)) % np.uint64(stride)


def _row_cap(features: int) -> int:
    """Rows a reader of ``features``-long rows keeps at each stride."""
    return max(MIN_ROWS, ROWS_PER_FEATURE * features)


def _add_products(rows32: np.ndarray, weight: float, into: np.ndarray | None) -> np.ndarray:
    """``into`` (None: zeros) plus ``weight`` rows^T rows per group, float32, in place.

    One large group: only the upper triangle, by syrk into a Fortran-ordered matrix (BLAS updates it without a copy).
    """
    groups, _, k = rows32.shape
    if groups == 1 and k >= SYRK_FEATURES:
        into = np.zeros((1, k, k), dtype=np.float32, order="F") if into is None else into
        target = into[0]  # Fortran-contiguous: ssyrk writes into it
        blas.ssyrk(weight, rows32[0], beta=1.0, c=target, trans=1, lower=0, overwrite_c=1)
        return into
    update = np.matmul(rows32.transpose(0, 2, 1), rows32)
    update *= np.float32(weight)
    return update if into is None else np.add(into, update, out=into)


def _symmetric(sums: np.ndarray) -> np.ndarray:
    """The full matrices of sums that :func:`_add_products` kept as upper triangles, filled in place (others as they are)."""
    if sums.shape[0] != 1 or sums.shape[1] < SYRK_FEATURES:
        return sums
    matrix = sums[0]
    for start in range(0, len(matrix), SYMMETRIC_BLOCK):  # a block of rows below the diagonal from the columns above it
        stop = start + SYMMETRIC_BLOCK
        matrix[start:stop, :start] = matrix[:start, start:stop].T
        block = matrix[start:stop, start:stop]
        block[:] = np.triu(block) + np.triu(block, 1).T
    return sums


@dataclass
class MomentCollector:
    """The H of every weight in ``inputs``, fed one run's tensors at a time (per sample for convolutions).

    Readers that see the same input the same way (a transformer's query, key and value) share one sum.
    """

    inputs: Mapping[str, list[LayerInput]]
    samples: int | None = None  # the samples the runs will bring, when known: sets each reader's stride from its first run
    moments: dict[LayerInput, Moments] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.moments = {reader: Moments() for readers in self.inputs.values() for reader in readers}

    @property
    def tensors(self) -> list[str]:
        """The tensors a run must fetch."""
        return list(dict.fromkeys(reader.tensor for reader in self.moments))

    def observe(self, name: str, value: np.ndarray) -> None:
        """Add one run's values of tensor ``name`` to the sums of every reader of it."""
        for reader, moments in self.moments.items():
            if reader.tensor != name:
                continue
            step = len(value)
            if reader.kind == "conv" and len(value) > 1:  # patches take kernel-size times the input: a few samples at a time
                patch_bytes = 4 * value[:1].size * math.prod(reader.kernel) // max(math.prod(reader.strides), 1)
                step = max(1, PATCH_BYTES // max(patch_bytes, 1))
            if moments.seen == 0 and self.samples is not None and len(value):
                moments.plan_stride(reader.count(value) * self.samples // len(value), reader.features(value))
            for start in range(0, len(value), step):
                chunk = value[start : start + step]
                moments.add_taken(reader.rows(chunk, moments.take(reader.count(chunk))))

    def hessians(self) -> dict[str, np.ndarray]:
        """Per weight, E[x x^T] per group over all its readers' rows; weights with the same readers share one matrix.

        The sums become the matrices in place (a transformer's are most of the quantizer's memory): call it once, last.
        """
        out: dict[str, np.ndarray] = {}
        shared: dict[tuple[LayerInput, ...], np.ndarray | None] = {}
        for weight, readers in self.inputs.items():
            key = tuple(dict.fromkeys(readers))
            if key not in shared:
                shared[key] = self._average(key)
            if (h := shared[key]) is not None:
                out[weight] = h
        return out

    def _average(self, readers: tuple[LayerInput, ...]) -> np.ndarray | None:
        """The readers' summed x x^T over their rows, made symmetric and divided in place; None without rows."""
        parts = [self.moments[reader] for reader in readers]
        for part in parts:
            part.flush()
        count = sum(m.count for m in parts)
        if not count or any(m.sums is None for m in parts):
            return None
        total = parts[0].sums if len(parts) == 1 else sum(m.sums for m in parts)
        for part in parts:
            part.sums = None  # handed over
        total = _symmetric(total)
        total /= count
        return total

    def means(self) -> dict[str, np.ndarray]:
        """Per weight, E[x] per group (groups, K) over all its readers' rows: the mean input its rows multiply."""
        out = {}
        for weight, readers in self.inputs.items():
            parts = [self.moments[reader] for reader in dict.fromkeys(readers)]
            count = sum(m.count for m in parts)
            if count and all(m.linear is not None for m in parts):
                out[weight] = sum(m.linear for m in parts) / count  # type: ignore[misc]
        return out
