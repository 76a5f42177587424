"""What calibration hands on to the rest of the run: each activation tensor's quantization, channel means, samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxq.calibrate.asq import Adapter
from onnxq.calibrate.collect import ChannelMeans
from onnxq.calibrate.moments import Hessians
from onnxq.calibrate.ranges import QuantParams


@dataclass(frozen=True)
class ActivationQuant:
    """How one activation tensor is quantized: fixed params, and an adapter when ASQ scales them per input."""

    tensor: str
    params: QuantParams
    adapter: Adapter | None = None
    feature_axes: tuple[int, ...] = ()
    zero_points: np.ndarray | None = None  # per channel, with an adapter
    channel_axis: int = 1
    rank: int = 4

    @property
    def per_sample_step(self) -> bool:
        """Whether the adapter gives one step per sample (one output, shared by all channels), not one per channel."""
        return self.adapter is not None and self.adapter.outputs == 1


@dataclass(frozen=True)
class Calibration:
    """What calibration found: activation quantization, and what bias correction and output-aware weights need.

    Each site's quantization, the sites' channel means and the first samples (for bias correction), and the second
    moments of the weighted layers' inputs (for output-aware weights), first and second.
    """

    quants: dict[str, ActivationQuant]
    means: dict[str, ChannelMeans]
    samples: list[dict[str, np.ndarray]]
    hessians: Hessians = field(default_factory=Hessians)  # per weight: E[x x^T] of its inputs, (groups, K, K), packed until looked up
    input_means: dict[str, np.ndarray] = field(default_factory=dict)  # per weight: E[x] of the same rows, (groups, K)
    left_float: list[str] = field(default_factory=list)  # activations no integer kernel would read (placement.py): not quantized
