"""Second moments of each weighted layer's input as the layer sees it: H = E[x x^T] over the rows its weight multiplies.

A weight row w (one output channel) meets inputs x the same length as w; the output error (w - q) x has mean square
(w - q) H (w - q)^T (onnxq/numerics/output_error.py). The rows x are:

- MatMul x @ W: the last axis of x; W @ x (the weight first): axis -2 of x; Gemm: A's rows (its columns with transA);
- Einsum with a 2-D weight, as a dense layer (one weight letter summed with an axis of x, the other kept, x's other
  axes kept: onnxq.plan.handlers.einsum_input_axis): that axis of x;
- com.microsoft Attention (onnxruntime's fused attention): its packed q, k, v weight multiplies input 0 as MatMul's x @ W;
- ConvTranspose (one group, explicit pads): at each output position, the input values each tap of the kernel brings
  there (q * stride + tap * dilation = p + pad; zero where no input position q fits), in the weight's (C_in, kernel...)
  order: output channel o's weights W[:, o] multiply them;
- Conv: each output position's patch, (C/group, kernel...) in the weight's own order, one H per group (a depthwise
  convolution has one small H per channel), with strides, padding (explicit or SAME), dilations, 1-D to 3-D.

- LSTM, GRU, RNN (one direction or two): W multiplies each step's input x_t, the rows of X; R (LSTM and RNN) multiplies
  the previous hidden state h_{t-1}, whose rows are taken from Y, the hidden states h_1..h_T (Y_h, h_T, where Y is not
  an output): the same set but for h_0 and h_T, exact where the states come from a stream (a state fed back each run).

H is summed as the calibration runs stream by (never all activations at once; a convolution's patches one sample at a
time), over every reader of a shared weight: a shard of the pass (onnxq/calibrate/shards.py) sums its rows' products in
float32 in place (BLAS), and the shards' sums are added into one packed lower triangle, float32 as well (:class:`Moments`);
a weight's H is made a full float64 matrix only when it is used (:class:`Hessians`). Weights with another kind of
reader (ConvTranspose of several groups or with output_shape or auto_pad SAME, other Einsums, a GRU's R, lookups,
readers inside Loop/Scan bodies or inside If bodies the pass did not inline, onnxq/calibrate/branches.py) or with an
input axis longer than MAX_FEATURES get none, and are quantized for their own error as before.

The sum costs n K^2 for n rows of K features, which for a convolution over a large image (n = samples x positions)
is many times the layer's own forward pass. Past enough rows for a well-conditioned estimate (the cap: MIN_ROWS, or
ROWS_PER_FEATURE times K), a reader keeps one row in ``stride`` (a power of two), each kept row counting for the
rows it stands for: H stays an average over all the data, at a bounded cost.

Which rows are kept depends only on where they are in the calibration data, not on how the data were cut into runs
or shards: row r of sample i (i counted over the whole stream) has the position p = i * 2**32 + r, and of each run of
``stride`` positions (always inside one sample: strides are powers of two up to 2**32) the row at a hashed offset is
kept. When the number of samples is known (the pipeline's passes) the stride is set once, from the first run, to
keep about the cap, and stays (bar a safety doubling when many more rows come than planned: variable-length inputs);
a pass in shards on several workers then keeps the very rows one pass keeps, and their merged sums
(:meth:`MomentCollector.merge`) count the same rows. Without a sample count the stride doubles as rows are kept (a
new cap's worth of rows at each stride), which depends on the rows before: only such a pass is not shard-independent.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from scipy.linalg import lapack

from onnxq.model.graph import attribute, constant_initializers, is_op, text_attribute
from onnxq.numerics.threads import one_blas_thread
from onnxq.plan.handlers import CONTRIB_DOMAIN, einsum_input_axis
from onnxq.plan.weights import WeightPlan

#: Bytes of patches :meth:`LayerInput._patches` stacks at a time before moving them into place.
STACKED_BYTES = 1 << 20
#: Bytes of convolution patches built at a time (a few samples of a large feature map).
PATCH_BYTES = 16 << 20
#: Rows of convolution patches gathered at a time when only some are kept (LayerInput._picked_patches).
PICK_ROWS = 256
#: Longest input row a full H is kept for (3x3 x 512 channels; its inverse and sums take seconds, 8192 took minutes):
#: beyond, the weight keeps its own-error quantization.
MAX_FEATURES = 4608
#: Rows a reader sums in full before it starts thinning them: at least MIN_ROWS, at least ROWS_PER_FEATURE x K.
MIN_ROWS = 16384
ROWS_PER_FEATURE = 4
#: Features from which a single group's products use syrk (the upper triangle only).
SYRK_FEATURES = 64
#: Rows of the upper triangle mirrored at a time (small temporaries).
SYMMETRIC_BLOCK = 256
#: Positions per sample: row r of sample i is at i * SAMPLE_POSITIONS + r, so a run of a stride up to it stays in one sample.
SAMPLE_POSITIONS = 1 << 32
#: A planned stride doubles once the kept rows pass this many caps (twice the most the plan keeps: it keeps under 2 caps).
SAFETY_CAPS = 4


@dataclass(frozen=True)
class LayerInput:
    """How one reader turns its input tensor into rows of the features its weight rows multiply."""

    tensor: str
    # "rows" (last axis), "steps" (last axis, samples on axis -2: a sequence [T, (D,) N, C]), "columns" (axis -2: W @ x),
    # "transposed" (Gemm transA), "conv", "deconv" (ConvTranspose, one group: each output position's inputs, see rows),
    # "axis" (the axis ``axis`` of x, an Einsum's summed axis: the other axes' positions are the rows)
    kind: str
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begins then ends, one per spatial axis (auto_pad resolved at run time when empty)
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    length: int = 0  # K, read off the weight's dims (0: not known); sizes the sums before any data
    output_padding: tuple[int, ...] = ()  # "deconv" only: ConvTranspose's extra output positions at the end of each axis
    axis: int = -1  # "axis" only: the axis of x the weight's rows meet
    # "rows"/"steps" of a bidirectional recurrent layer (two directions): its W's rows hold both directions' weights
    # side by side, so each row of x becomes two, (x, 0) and (0, x) (W: both directions read the same steps), or
    # (h_forward, 0) and (0, h_backward) with the directions on axis ``direction_axis`` of x (R: the hidden states)
    directions: int = 1
    direction_axis: int | None = None

    @property
    def sums_bytes(self) -> int:
        """Bytes of the sums one shard of a pass hands back for this reader: a packed float32 triangle per group."""
        return 4 * self.groups * packed_size(self.length)

    def features(self, value: np.ndarray) -> int:
        """K: the length of the rows :meth:`rows` makes of ``value``."""
        shape = np.shape(value)
        if self.kind in ("rows", "steps"):
            return shape[-1] * self.directions
        if self.kind == "columns":
            return shape[-2]
        if self.kind == "transposed":
            return shape[0]
        if self.kind == "axis":
            return shape[self.axis]
        return shape[1] // self.groups * math.prod(self.kernel)

    def count(self, value: np.ndarray) -> int:
        """How many rows (per group) :meth:`rows` makes of ``value``."""
        shape = np.shape(value)
        if self.kind in ("rows", "steps"):
            shared = self.directions if self.direction_axis is None else 1  # x read by every direction: a row each
            return math.prod(shape[:-1]) * shared
        if self.kind == "columns":
            return math.prod(shape) // shape[-2]
        if self.kind == "axis":
            return math.prod(shape) // shape[self.axis]
        if self.kind == "transposed":
            return shape[1]
        return shape[0] * math.prod(self._out_shape(shape[2:]))  # conv, deconv: a row per output position

    def layout(self, value: np.ndarray) -> tuple[int, int]:
        """(samples, rows per sample) of the rows :meth:`rows` makes of ``value``, which come sample after sample.

        The samples are axis 0 of ``value``, except for a 2-D input read by its columns (Gemm's transA, W @ x): its
        rows are the columns, the Gemm's M axis, one sample each. Where axis 0 does not divide the rows evenly, the
        whole run counts as one sample.
        """
        shape = np.shape(value)
        count = self.count(value)
        if self.kind in ("transposed", "columns") and len(shape) == 2:
            return count, 1
        if self.kind == "axis" and self.axis % len(shape) == 0:  # summed over axis 0: no sample axis in front
            return 1, count
        samples = (shape[-2] if self.kind == "steps" and len(shape) >= 2 else shape[0]) if shape else 1
        return (samples, count // samples) if samples and count % samples == 0 else (1, count)

    def rows(self, value: np.ndarray, keep: slice | np.ndarray = slice(None)) -> np.ndarray:
        """(groups, n, K) rows of ``value`` (one run of the tensor), only those ``keep`` selects (convolutions build no others)."""
        x = np.asarray(value)
        if self.directions > 1 and self.kind in ("rows", "steps"):
            return self._directional_rows(x)[:, keep]
        if self.kind == "rows":
            return x.reshape(1, -1, x.shape[-1])[:, keep]
        if self.kind == "steps":  # sample-major, as :meth:`layout` counts them
            return np.moveaxis(x, -2, 0).reshape(1, -1, x.shape[-1])[:, keep]
        if self.kind == "columns":
            return np.moveaxis(x, -2, -1).reshape(1, -1, x.shape[-2])[:, keep]
        if self.kind == "axis":
            return np.moveaxis(x, self.axis, -1).reshape(1, -1, x.shape[self.axis])[:, keep]
        if self.kind == "transposed":
            return x.T.reshape(1, -1, x.shape[0])[:, keep]
        if isinstance(keep, slice) and keep == slice(None) and self.kind == "conv":
            return self._patches(x)
        return self._picked_patches(x, np.arange(self.count(x))[keep])

    def _directional_rows(self, x: np.ndarray) -> np.ndarray:
        """(1, directions x n, directions x K): row j of direction d, x_d[j], at row directions * j + d in block d, zero elsewhere.

        Interleaved, so the rows stay sample-major (what thinning counts positions by).
        """
        one = dataclasses.replace(self, directions=1, direction_axis=None)
        if self.direction_axis is None:
            parts = [one.rows(x)[0]] * self.directions
        else:
            parts = [one.rows(np.take(x, [d], axis=self.direction_axis))[0] for d in range(self.directions)]
        n, k = parts[0].shape
        out = np.zeros((n, self.directions, self.directions * k), dtype=x.dtype)
        for d, part in enumerate(parts):
            out[:, d, d * k : (d + 1) * k] = part
        return out.reshape(1, n * self.directions, self.directions * k)

    def _padded(self, x: np.ndarray) -> np.ndarray:
        """``x`` with the convolution's padding (explicit or auto_pad) applied to its spatial axes."""
        spatial = x.shape[2:]
        pads = self._resolved_pads(spatial)
        return np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + len(spatial)]) for i in range(len(spatial))])

    def _out_shape(self, spatial: tuple[int, ...]) -> list[int]:
        """Output positions along each spatial axis."""
        pads = self._resolved_pads(spatial)
        if self.kind == "deconv":
            extra = self.output_padding or (0,) * len(spatial)
            return [self.strides[i] * (spatial[i] - 1) + extra[i] + self.dilations[i] * (self.kernel[i] - 1) + 1 - pads[i] - pads[i + len(spatial)]
                    for i in range(len(spatial))]
        return [(spatial[i] + pads[i] + pads[i + len(spatial)] - self.dilations[i] * (self.kernel[i] - 1) - 1) // self.strides[i] + 1
                for i in range(len(spatial))]

    def _picked_patches(self, x: np.ndarray, picked: np.ndarray) -> np.ndarray:
        """The rows of :meth:`_patches` numbered ``picked`` (sample-major, then output position), gathered directly.

        One gather from each channel's plane, (C, rows, taps) at once, in C order (the products' BLAS call wants it: a
        fancy-indexed gather laid out otherwise made them 5x slower). Gathering (picked, C) per tap read C values a
        plane apart for every row: on the layout detector's readers gather and products took 3.48 s against 1.52 s now,
        its depthwise 5x5 layers 2.8-3.8x (one-off measurement on 6 pages, 2026-12-06); the same values. Taps that fall
        in the padding are gathered from the border (clipped positions) and then zeroed: no padded copy of the whole
        input, which took 4.6 of the 10.7 s the layout detector's pass spent on its H (np.pad per run, one-off profile).
        PICK_ROWS rows at a time, each block written into its place in the rows: gathered all at once and then reordered
        they were held twice (CREPE's first layer: 33 MB at the peak against 9, 24 against 15 ms; one-off).
        """
        spatial = x.shape[2:]
        offsets = list(itertools.product(*(range(k) for k in self.kernel)))  # the taps, in the weight's kernel order
        c = x.shape[1]
        per_group = c // self.groups
        planes = np.moveaxis(x, 1, 0).reshape(c, -1)  # (C, samples * plane): a view for one sample
        rows = np.empty((self.groups, len(picked), per_group * len(offsets)), dtype=x.dtype)
        placed = rows.reshape(self.groups, len(picked), per_group, len(offsets))
        for start in range(0, len(picked), PICK_ROWS):
            block = picked[start : start + PICK_ROWS]
            index, inside = self._tap_positions(block, spatial, offsets)
            gathered = np.take(planes, index, axis=1)  # (C, block, taps)
            if not inside.all():
                gathered[:, ~inside] = 0
            placed[:, start : start + len(block)] = gathered.reshape(self.groups, per_group, len(block), len(offsets)).transpose(0, 2, 1, 3)
        return rows

    def _tap_positions(self, picked: np.ndarray, spatial: tuple[int, ...], offsets: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
        """(picked, taps) flat positions each row's taps read in its sample's plane (clipped), and whether they are inside it.

        A convolution's output p reads input p * stride + tap - pad; a transposed one's reads q where q * stride + tap =
        p + pad, inside only where that q is whole.
        """
        pads = self._resolved_pads(spatial)
        out = self._out_shape(spatial)
        sample, position = np.divmod(picked, math.prod(out))
        coords = np.unravel_index(position, out)
        index = sample[:, None] * math.prod(spatial)
        inside = np.ones((len(picked), len(offsets)), dtype=bool)
        for axis, size in enumerate(spatial):
            taps = np.array([o[axis] for o in offsets]) * self.dilations[axis]
            if self.kind == "deconv":
                reached = coords[axis][:, None] + pads[axis] - taps
                along = reached // self.strides[axis]
                inside &= reached % self.strides[axis] == 0
            else:
                along = coords[axis][:, None] * self.strides[axis] + taps - pads[axis]
            inside &= (along >= 0) & (along < size)
            index = index + np.clip(along, 0, size - 1) * math.prod(spatial[axis + 1 :])
        return index, inside

    def _patches(self, x: np.ndarray) -> np.ndarray:
        """Conv patches (groups, N * positions, C/group * prod(kernel)), in the weight's (channel, kernel...) order.

        The taps of a few samples at a time are stacked and moved into their place in the patches: stacking all samples'
        taps before reordering them held the patches twice (CREPE's 1024-wide readers: 16 MB for 8 MB of patches a
        run); written tap by tap into place, strided, they took 3x as long.
        """
        padded = self._padded(x)
        out = self._out_shape(x.shape[2:])
        n, c = x.shape[:2]
        offsets = list(itertools.product(*(range(k) for k in self.kernel)))
        positions = math.prod(out)
        patches = np.empty((self.groups, n, positions, c // self.groups, len(offsets)), dtype=x.dtype)
        step = max(1, STACKED_BYTES // max(patches[:, :1].nbytes, 1))
        for start in range(0, n, step):
            part = padded[start : start + step]
            taps = [part[(slice(None), slice(None), *self._tap(offset, out))] for offset in offsets]
            stacked = np.stack(taps, axis=2).reshape(len(part), self.groups, c // self.groups, len(offsets), positions)
            patches[:, start : start + step] = stacked.transpose(1, 0, 4, 2, 3)
        return patches.reshape(self.groups, n * positions, (c // self.groups) * len(offsets))

    def _tap(self, offset: tuple[int, ...], out: list[int]) -> tuple[slice, ...]:
        """The slices of the padded input's spatial axes that tap ``offset`` of the kernel reads for every output position."""
        return tuple(slice(o * d, o * d + s * (m - 1) + 1, s) for o, d, s, m in zip(offset, self.dilations, self.strides, out, strict=True))

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
        auto_pad = text_attribute(node, "auto_pad", "NOTSET")
        return LayerInput(
            node.input[0], "conv", int(attribute(node, "group", 1)), kernel=tuple(dims[2:]),
            strides=tuple(attribute(node, "strides", [1] * spatial)), pads=tuple(attribute(node, "pads", [])),
            dilations=tuple(attribute(node, "dilations", [1] * spatial)), auto_pad=auto_pad,
        )
    if is_op(node, "Einsum") and len(node.input) == 2:
        axis = einsum_input_axis(text_attribute(node, "equation"), input_index, weight_rank)
        return LayerInput(node.input[1 - input_index], "axis", axis=axis) if axis is not None else None
    if is_op(node, "ConvTranspose") and input_index == 1 and weight_rank >= 3:
        return _transposed_input(node, dims)
    if node.domain == CONTRIB_DOMAIN and node.op_type == "Attention" and input_index == 1 and weight_rank == 2:
        return LayerInput(node.input[0], "rows")  # onnxruntime's fused attention: x @ W_qkv
    if is_op(node, "LSTM", "GRU", "RNN") and weight_rank == 3 and dims[0] in (1, 2):
        return _recurrent_input(node, input_index, dims[0])
    return None


def _transposed_input(node: onnx.NodeProto, dims: tuple[int, ...]) -> LayerInput | None:
    """A ConvTranspose of one group with explicit pads: its output positions' rows.

    Output channel o's weights W[:, o] meet, at each output position p, the inputs x[c, q] with q * stride + tap *
    dilation = p + pad (zero where no such q is whole and in range). Several groups (the planner's channel axis is then
    the input's), output_shape or auto_pad other than NOTSET/VALID: none (the weight keeps its own-error quantization).
    """
    spatial = len(dims) - 2
    auto_pad = text_attribute(node, "auto_pad", "NOTSET")
    if attribute(node, "group", 1) != 1 or attribute(node, "output_shape", None) is not None or auto_pad not in ("NOTSET", "VALID"):
        return None
    return LayerInput(
        node.input[0], "deconv", kernel=tuple(dims[2:]), strides=tuple(attribute(node, "strides", [1] * spatial)),
        pads=tuple(attribute(node, "pads", [0] * 2 * spatial)), dilations=tuple(attribute(node, "dilations", [1] * spatial)),
        output_padding=tuple(attribute(node, "output_padding", [0] * spatial)),
    )


def _recurrent_input(node: onnx.NodeProto, input_index: int, directions: int = 1) -> LayerInput | None:
    """A recurrent layer's W (the steps' inputs X) or R (the hidden states, from Y or Y_h); a GRU's R has none.

    A GRU's candidate gate multiplies R by r * h, not h. With layout 0 a sequence is [T, (D,) N, C]: samples on axis
    -2; with layout 1, [N, T, (D,) C] and Y_h [N, D, C]: samples on axis 0. Two directions (bidirectional): the
    directions' rows side by side (:meth:`LayerInput._directional_rows`), D on axis -3 of Y and Y_h with layout 0,
    on axis -2 with layout 1.
    """
    layout = attribute(node, "layout", 0)
    sequence = "rows" if layout else "steps"
    if input_index == 1:
        return LayerInput(node.input[0], sequence, directions=directions)
    if input_index != 2 or is_op(node, "GRU"):
        return None
    states = next((name for name in node.output[:2] if name), None)
    if states is None:
        return None
    return LayerInput(states, sequence, directions=directions, direction_axis=(-2 if layout else -3) if directions > 1 else None)


def layer_inputs(
    graph: onnx.GraphProto, plans: Iterable[WeightPlan], unreached: frozenset[str] = frozenset()
) -> dict[str, list[LayerInput]]:
    """Per planned weight, how each of its readers sees its input (rows along the weight's planned channel axis).

    Weights with a reader of another kind, or too long an input row, are left out. Readers named in ``unreached``
    (nodes of If branches the data do not take, gone from a branch view) add no rows: the weight's statistics are
    those of its other readers.
    """
    nodes = {n.name: n for n in graph.node}
    consts = constant_initializers(graph)
    out: dict[str, list[LayerInput]] = {}
    for plan in plans:
        dims = tuple(consts[plan.tensor].dims)
        readers = []
        for use in plan.uses:
            if use.node in unreached:
                continue
            node = nodes.get(use.node)
            found = _reader_input(node, use.input_index, dims) if node is not None else None  # a body's node: only in a view with it inlined
            if found is None or plan.channel_axis != use.channel_axis:  # the readers must agree on the rows (output axis)
                break
            readers.append(found)
        else:
            length = math.prod(dims) // dims[plan.channel_axis]
            if readers and length <= MAX_FEATURES:
                out[plan.tensor] = [dataclasses.replace(reader, length=length) for reader in readers]
    return out


@dataclass
class Moments:
    """Running sums of x x^T and of x over the rows of a weight's inputs, per group, and the rows they stand for.

    x x^T is summed in float32 as one triangle per group in LAPACK's rectangular full packed form (``sums``, K (K + 1)
    / 2 entries): a wide single group's by sfrk straight into it, several groups' or short rows' (a depthwise layer's) in
    full matrices (``pending``) packed at the next :meth:`flush`. A pass holds 4 bytes per entry of H at a shard's peak
    (the merged sums and the shard's), where the float64 sums beside float32 products held 20; a shard's products (up
    to a few caps of rows) were float32 already, and the shards' sums add in float32 now.

    Of every run of ``stride`` row positions (see the module) one row is kept (:meth:`take`), weighted by ``stride``
    (the rows it stands for), so ``count`` still counts every row (on average: a sample's last run may be partly empty).
    The stride is planned from a known row count (:meth:`plan_stride`) and then fixed, or doubles as rows are kept
    (:meth:`widen`).
    """

    sums: np.ndarray | None = None  # sums of x x^T per group, (groups, K (K + 1) / 2) float32, packed (RFP, upper triangle)
    count: int = 0
    kept: int = 0
    stride: int = 1
    planned: int | None = None  # the stride planned from the expected rows (None: no plan, the stride doubles as rows come)
    seen: int = 0  # rows offered so far, kept or not
    pending: np.ndarray | None = None  # several groups' or short rows' float32 (groups, K, K) sums since the last flush
    linear: np.ndarray | None = None  # float64 sum of the rows themselves, per group (for E[x])

    def plan_stride(self, expected_rows: int, features: int) -> None:
        """Fix the stride that keeps between one and two caps of ``expected_rows`` (more rows than expected: :meth:`widen`)."""
        cap = _row_cap(features)
        while expected_rows >= 2 * cap * self.stride and self.stride < SAMPLE_POSITIONS:
            self.stride *= 2
        self.planned = self.stride

    def take(self, first_sample: int, samples: int, rows: int) -> slice | np.ndarray:
        """Which rows to keep (all, or their ascending indices) of ``samples`` samples of ``rows`` rows each, sample-major.

        The first is sample ``first_sample`` of the whole stream, and row r of sample i is at position p = i * 2**32 + r:
        of each run of ``stride`` positions, run p // stride keeps the row at offset :func:`kept_offset` (a sample's last
        run may have no row there, and then keeps none). The offset varies from run to run: a fixed one would keep the
        same columns of every image row (a convolution's left border, never its right). Computed per run, not per row:
        a sample has ceil(rows / stride) runs.
        """
        self.seen += samples * rows
        if self.stride == 1:
            return slice(None)
        if rows > SAMPLE_POSITIONS:
            raise ValueError(f"a sample of {rows} rows has more than 2**32")
        runs = -(-rows // self.stride)
        shift = np.uint64(SAMPLE_POSITIONS.bit_length() - self.stride.bit_length())  # p // stride = (i << shift) + r // stride
        first_run = np.arange(first_sample, first_sample + samples, dtype=np.uint64) << shift
        numbers = first_run[:, None] + np.arange(runs, dtype=np.uint64)[None, :]
        row = np.arange(runs, dtype=np.int64)[None, :] * self.stride + kept_offset(numbers, self.stride).astype(np.int64)
        index = np.arange(samples, dtype=np.int64)[:, None] * rows + row
        return index[row < rows]

    def add(self, rows: np.ndarray, first_sample: int = 0, samples: int = 1) -> None:
        """Add the (groups, n, K) rows of ``samples`` samples (n / samples rows each) from sample ``first_sample`` on."""
        per_sample, remainder = divmod(rows.shape[1], samples)
        if remainder:
            raise ValueError(f"{rows.shape[1]} rows do not split into {samples} samples")
        self.add_taken(rows[:, self.take(first_sample, samples, per_sample)])

    def add_taken(self, picked: np.ndarray) -> None:
        """Add rows :meth:`take` picked: their products in float32 (BLAS), each counted ``stride`` times.

        Products gather in float32, in place, in the layout BLAS writes, until the next :meth:`flush`: a K x K
        conversion or copy per small run cost more than the products on models fed one image a run.
        """
        k = picked.shape[2]
        if picked.shape[1] == 0:
            return
        _add_products(np.asarray(picked, dtype=np.float32), float(self.stride), self)
        row_sums = np.sum(picked, axis=1, dtype=np.float64) * self.stride
        self.linear = row_sums if self.linear is None else self.linear + row_sums
        self.count += picked.shape[1] * self.stride
        self.kept += picked.shape[1]
        self.widen(k)

    def widen(self, features: int) -> None:
        """Double the stride while more rows are kept than it should keep.

        Planned: only past SAFETY_CAPS caps (more rows came than the plan expected), and one cap more for each doubling
        since. Not planned: past one cap per stride so far (1, 2, 4, ...: a cap at each), as rows come. The second depends
        on the rows before; the first, while the plan holds, does not.
        """
        cap = _row_cap(features)
        while self.stride < SAMPLE_POSITIONS:
            if self.planned is not None:
                limit = cap * (SAFETY_CAPS + self.stride.bit_length() - self.planned.bit_length())
                if self.kept <= limit:
                    return
            elif self.kept < cap * self.stride.bit_length():
                return
            self.stride *= 2

    def flush(self) -> None:
        """Add the full matrices of products gathered since the last flush into the packed sums, and let them go."""
        if self.pending is not None:
            self.sums = _add_packed(self.sums, self.pending)
        self.pending = None

    def merge(self, other: Moments, take: bool = False) -> None:
        """Add ``other``'s sums (flushed into the packed ones), rows and counts; ``take``: its arrays may be kept, not copied.

        Without ``take`` ``other`` is left as it is. The merged stride is the larger (what a pass that goes on would
        keep); each part's rows already carry their own weights. The sums add in place (a ResNet-50's are hundreds of
        MB, a pass merges up to 64 shards of them, and every new array of that size first costs page faults).
        """
        self.flush()
        if other.sums is not None:
            if self.sums is None:
                self.sums = other.sums if take else other.sums.copy()
            else:
                self.sums += other.sums
        if other.pending is not None:  # packed and added in place: no new array of H's size
            self.sums = _add_packed(self.sums, other.pending)
        if other.linear is not None:
            self.linear = other.linear.copy() if self.linear is None else self.linear + other.linear
        self.count += other.count
        self.kept += other.kept
        self.seen += other.seen
        self.stride = max(self.stride, other.stride)
        self.planned = self.planned if self.planned is not None else other.planned

    def hessian(self) -> np.ndarray | None:
        """E[x x^T] per group, (groups, K, K) float64; None before any rows."""
        self.flush()
        return None if self.sums is None or self.count == 0 else PackedSums(self.sums, self.count).matrix()

    def mean(self) -> np.ndarray | None:
        """E[x] per group, (groups, K); None before any rows."""
        return None if self.linear is None or self.count == 0 else self.linear / self.count


def kept_offset(runs: np.ndarray, stride: int) -> np.ndarray:
    """The offset of the row kept in each run of ``stride`` positions: the run's number hashed (splitmix64's finaliser).

    Every bit of the number moves every bit of the hash. The run numbers of sample i are i * 2**32 / stride + j, whose
    low bits are those of j alone: Knuth's multiplicative hash (bits 16 up of 2654435761 x number), used before, gave
    every sample the same offsets, and a sample of one row (a Gemm's input) offset 0 at all strides up to 256, which
    kept every sample's row.
    """
    z = np.array(runs, dtype=np.uint64, ndmin=1)  # arrays: numpy's uint64 products wrap silently (scalars warn)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z % np.uint64(stride)


def _row_cap(features: int) -> int:
    """Rows a reader of ``features``-long rows keeps at each stride."""
    return max(MIN_ROWS, ROWS_PER_FEATURE * features)


def _add_products(rows32: np.ndarray, weight: float, moments: Moments) -> None:
    """Add ``weight`` rows^T rows per group to ``moments``, float32, in place.

    One large group: straight into its packed sums, by sfrk (syrk's work on the rectangular full packed form of one
    triangle: no full K x K matrix at all, as fast as syrk into one, measured at K 64-2048). Several groups or a short
    row (a depthwise convolution's 512 groups of 25): full matrices by one batched matmul into ``pending``, packed at
    the next flush.
    """
    groups, n, k = rows32.shape
    if groups == 1 and k >= SYRK_FEATURES:
        if moments.sums is None:
            moments.sums = np.zeros((1, packed_size(k)), dtype=np.float32)
        with one_blas_thread():  # one thread: the calls come between onnxruntime's runs, often with a few hundred rows
            out = lapack.ssfrk(k, n, weight, rows32[0].T, 1.0, moments.sums[0], overwrite_c=1)  # rows^T: Fortran order, no copy
        if not np.shares_memory(out, moments.sums):  # (f2py updates contiguous float32 in place; a copy would be its answer)
            moments.sums[0] = out
        return
    update = np.matmul(rows32.transpose(0, 2, 1), rows32)
    update *= np.float32(weight)
    moments.pending = update if moments.pending is None else np.add(moments.pending, update, out=moments.pending)


def packed_size(features: int) -> int:
    """Entries of one packed triangle of a ``features`` x ``features`` matrix: K (K + 1) / 2."""
    return features * (features + 1) // 2


def _add_packed(packed: np.ndarray | None, products: np.ndarray) -> np.ndarray:
    """``packed`` (None: zeros) plus the full symmetric ``products`` (groups, K, K) in packed form, in place."""
    groups, k, _ = products.shape
    if packed is None:
        packed = np.zeros((groups, packed_size(k)), dtype=np.float32)
    for g in range(groups):
        arf, info = lapack.strttf(products[g].T)  # (symmetric: its transpose, Fortran-ordered, is it)
        if info != 0:
            raise RuntimeError(f"strttf failed: {info}")
        packed[g] += arf
    return packed


def unpack_symmetric(packed: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The full symmetric float64 matrices (groups, K, K) of the upper triangles ``packed`` holds (LAPACK's RFP form).

    Written into ``out`` where given (float64, (groups, K, K)). Read straight from the packed form's three blocks, not
    through LAPACK's stfttr, whose float32 K x K matrix was half again H's float64 size at the peak (16 MB at K 2048).
    """
    groups, size = packed.shape
    features = (math.isqrt(8 * size + 1) - 1) // 2
    full = np.empty((groups, features, features), dtype=np.float64) if out is None else out
    for g in range(groups):
        _upper_from_rfp(packed[g], full[g])
        _mirror_upper(full[g])
    return full


def _upper_from_rfp(arf: np.ndarray, matrix: np.ndarray) -> None:
    """Write the upper triangle of ``matrix`` (K, K) from ``arf``, an upper triangle in RFP form (TRANSR N), as stfttr would.

    LAPACK's layout, with n1 = K // 2 and n2 = K - n1: the column-major (K + 1 - K % 2, n2) array whose column c holds
    A[:n1, n1 + c] in its first n1 rows, A[n1:, n1 + c] down to the diagonal in the rows after, and below them (in the
    first n1 columns) A[:c + 1, c] of the leading triangle.
    """
    k = len(matrix)
    n1 = k // 2
    n2 = k - n1
    columns = arf.reshape(n2, k + 1 - k % 2)  # row c: the array's column c
    matrix[:n1, :n1] = columns[:n1, n1 + 1 : n1 + 1 + n1]  # the leading triangle (its lower half overwritten after)
    matrix[:n1, n1:] = columns[:, :n1].T
    matrix[n1:, n1:] = columns[:, n1 : n1 + n2].T  # the trailing triangle, upper half


def _mirror_upper(matrix: np.ndarray) -> None:
    """Fill ``matrix``'s lower triangle from its upper one in place, a block of rows at a time (small temporaries)."""
    for start in range(0, len(matrix), SYMMETRIC_BLOCK):
        stop = start + SYMMETRIC_BLOCK
        matrix[start:stop, :start] = matrix[:start, start:stop].T
        block = matrix[start:stop, start:stop]
        block[:] = np.triu(block) + np.triu(block, 1).T


@dataclass(frozen=True)
class PackedSums:
    """One H as the pass leaves it: the summed x x^T of its rows as packed lower triangles, and the rows they count."""

    packed: np.ndarray  # (groups, K (K + 1) / 2) float32
    count: int

    def matrix(self) -> np.ndarray:
        """E[x x^T] per group, (groups, K, K), a new float64 array."""
        return self.fill(None)

    def fill(self, out: np.ndarray | None) -> np.ndarray:
        """E[x x^T] per group written into ``out`` (float64, (groups, K, K); None: a new array), the same numbers each time."""
        full = unpack_symmetric(self.packed, out)
        full /= self.count
        return full


class Hessians(Mapping[str, np.ndarray]):
    """Per weight, its H as a new float64 (groups, K, K) array at each look-up, kept packed in float32 until then.

    Weights whose readers share one sum share its packed form; :meth:`pop` lets it go once no weight refers to it. A
    whole model's H are then held in a quarter of the bytes of its float64 matrices, and the quantizer holds one full
    matrix at a time.
    """

    def __init__(self, sums: dict[str, PackedSums] | None = None) -> None:
        self._sums = dict(sums or {})

    def __getitem__(self, weight: str) -> np.ndarray:
        return self._sums[weight].matrix()

    def __iter__(self) -> Iterator[str]:
        return iter(self._sums)

    def __len__(self) -> int:
        return len(self._sums)

    def __contains__(self, weight: object) -> bool:
        return weight in self._sums

    def pop(self, weight: str, default: np.ndarray | None = None) -> np.ndarray | None:
        """``weight``'s H (``default`` if none), which this mapping no longer holds."""
        sums = self._sums.pop(weight, None)
        return default if sums is None else sums.matrix()

    def pop_sums(self, weight: str) -> PackedSums | None:
        """``weight``'s packed sums (None if none), which this mapping no longer holds: H made from them when needed, again if need be."""
        return self._sums.pop(weight, None)


@dataclass(frozen=True)
class Guard:
    """An If the pass's model replaced by one branch: the condition tensor, the branch (then: True), the weights read there."""

    condition: str
    taken: bool
    weights: frozenset[str]


@dataclass
class MomentCollector:
    """The H of every weight in ``inputs``, fed one run's tensors at a time (per sample for convolutions).

    Readers that see the same input the same way (a transformer's query, key and value) share one sum. ``guards``:
    in a model with If branches inlined (onnxq/calibrate/branches.py), the conditions to check on every run; where
    a run took the other branch, the weights read in the inlined one get no H.
    """

    inputs: Mapping[str, list[LayerInput]]
    samples: int | None = None  # the samples the whole pass brings, when known (every shard's collector the total): fixes each reader's stride
    guards: tuple[Guard, ...] = ()
    moments: dict[LayerInput, Moments] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)  # conditions some run did not meet

    def __post_init__(self) -> None:
        self.moments = {reader: Moments() for readers in self.inputs.values() for reader in readers}

    @property
    def sums_bytes(self) -> int:
        """Bytes of all the float64 H this collector sums (what one shard of a pass hands back)."""
        return sum(reader.sums_bytes for reader in self.moments)

    @property
    def tensors(self) -> list[str]:
        """The tensors a run must fetch."""
        return list(dict.fromkeys([*(reader.tensor for reader in self.moments), *(g.condition for g in self.guards)]))

    @property
    def unguarded(self) -> frozenset[str]:
        """Weights read in an inlined branch some run did not take: their H does not describe the data."""
        return frozenset(w for g in self.guards if g.condition in self.broken for w in g.weights)

    def observe(self, name: str, value: np.ndarray, first_sample: int = 0) -> None:
        """Add one run's values of tensor ``name`` to the sums of every reader of it.

        ``first_sample``: the index of the run's first sample in the whole pass (the rows kept depend on it, see the module).
        """
        for guard in self.guards:
            if guard.condition == name and not (np.asarray(value).astype(bool) == guard.taken).all():
                self.broken.add(name)
        for reader, moments in self.moments.items():
            if reader.tensor != name or reader.count(value) == 0:
                continue
            samples, rows = reader.layout(value)
            if moments.seen == 0 and self.samples is not None:
                moments.plan_stride(rows * self.samples, reader.features(value))
            if reader.kind != "conv" or samples == 1:
                moments.add_taken(reader.rows(value, moments.take(first_sample, samples, rows)))
                continue
            # patches take kernel-size times the input: a few samples at a time
            patch_bytes = 4 * value[:1].size * math.prod(reader.kernel) // max(math.prod(reader.strides), 1)
            step = max(1, PATCH_BYTES // max(patch_bytes, 1))
            for start in range(0, samples, step):
                chunk = value[start : start + step]
                moments.add_taken(reader.rows(chunk, moments.take(first_sample + start, len(chunk), rows)))

    def hessians(self) -> Hessians:
        """Per weight, E[x x^T] per group over all its readers' rows, made a float64 matrix when looked up.

        Weights with the same readers share one sum. The sums are handed over (a transformer's are most of the
        quantizer's memory): call it once, last.
        """
        out: dict[str, PackedSums] = {}
        shared: dict[tuple[LayerInput, ...], PackedSums | None] = {}
        unguarded = self.unguarded
        for weight, readers in self.inputs.items():
            if weight in unguarded:
                continue
            key = tuple(dict.fromkeys(readers))
            if key not in shared:
                shared[key] = self._total(key)
            if (sums := shared[key]) is not None:
                out[weight] = sums
        return Hessians(out)

    def merge(self, other: MomentCollector, take: bool = False) -> None:
        """Add ``other``'s sums, reader by reader: a shard of the same pass, the next one in the data.

        ``take``: ``other`` is not used afterwards, so its arrays may be kept rather than copied; else it is left as it is.
        """
        if set(other.moments) != set(self.moments):
            raise ValueError("cannot merge moments of different layer inputs")
        self.broken |= other.broken
        for reader, moments in self.moments.items():
            moments.merge(other.moments[reader], take)

    def _total(self, readers: tuple[LayerInput, ...]) -> PackedSums | None:
        """The readers' summed x x^T over their rows (packed) and their count, handed over; None without rows."""
        parts = [self.moments[reader] for reader in readers]
        for part in parts:
            part.flush()
        count = sum(m.count for m in parts)
        if not count or any(m.sums is None for m in parts):
            return None
        total = parts[0].sums if len(parts) == 1 else sum(m.sums for m in parts)
        for part in parts:
            part.sums = None  # handed over
        return PackedSums(total, count)

    def means(self) -> dict[str, np.ndarray]:
        """Per weight, E[x] per group (groups, K) over all its readers' rows: the mean input its rows multiply."""
        out = {}
        unguarded = self.unguarded
        for weight, readers in self.inputs.items():
            if weight in unguarded:
                continue
            parts = [self.moments[reader] for reader in dict.fromkeys(readers)]
            count = sum(m.count for m in parts)
            if count and all(m.linear is not None for m in parts):
                out[weight] = sum(m.linear for m in parts) / count  # type: ignore[misc]
        return out
