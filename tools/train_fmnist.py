"""Train a small CNN on Fashion-MNIST with plain torch and export it to ONNX.

The exported model is what ``models/`` ships as a test subject for the quantizer:

* input ``input``: float32 NCHW pixels in [0, 1], shape (N, 1, 28, 28), dynamic N;
* the Fashion-MNIST mean/std normalisation is the model's first operation (Sub, Div);
* output ``logits``: float32 (N, 10), no softmax;
* BatchNormalization stays as separate nodes (not folded into the convolutions), and
  every weight is a graph initializer, so the quantizer's own BN folding is exercised.

Three architectures are available:

* ``resnet20``: CIFAR-style ResNet-20 (3 stages x 3 basic blocks, widths 16/32/64,
  option-B 1x1 conv + BN shortcut where the shape changes, global average pool,
  Linear 64 -> 10);
* ``mobilenetv2``: a small MobileNetV2-style network (3x3 stem, seven inverted
  residual blocks 16 -> 24 -> 32 -> 64 channels with two stride-2 blocks, 1x1 conv to
  256, global average pool, Linear 256 -> 10);
* ``vit``: a small pre-norm vision transformer (4x4 patches -> 49 tokens of width 64 plus
  learned position embeddings, 4 encoder blocks with 4-head attention written as separate
  q/k/v Linear layers and a 128-wide GELU MLP, final LayerNorm, mean over tokens, Linear
  64 -> 10), trained with AdamW. It has no BatchNormalization; its attention multiplies two
  activations, and LayerNorm outputs carry the outlier channels that make transformers
  hard to quantize with one activation scale per tensor.

Example (from the repository root)::

    PYTHONPATH=. python tools/train_fmnist.py --arch resnet20 --epochs 15 --out models/fmnist_resnet20.onnx --seed 0 --threads 2
    PYTHONPATH=. python tools/train_fmnist.py --arch mobilenetv2 --epochs 12 --out models/fmnist_mobilenetv2.onnx --seed 0 --threads 2
    PYTHONPATH=. python tools/train_fmnist.py --arch vit --epochs 12 --out models/fmnist_vit.onnx --seed 0 --threads 2

(``models/README.md`` lists the exact commands, timings and accuracies of the shipped files.)

After export the ONNX file is evaluated with onnxruntime on the full 10k test split,
and the script fails (exit status 1) unless its predictions match the torch model's.
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from onnxq.analysis.datasets import FASHION_MNIST_DIR, LabelledImages, load_idx_split
from onnxq.model.prepare import lift_constants

#: Per-pixel mean and std of the Fashion-MNIST training images (scaled to [0, 1]).
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530

NUM_CLASSES = 10
OPSET = 17


# --------------------------------------------------------------------------- models


class Normalize(nn.Module):
    """``(x - mean) / std`` with the constants held as buffers (ONNX initializers)."""

    def __init__(self, mean: float = FMNIST_MEAN, std: float = FMNIST_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([[[[mean]]]], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([[[[std]]]], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x``."""
        return (x - self.mean) / self.std


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Bias-free ``kernel`` x ``kernel`` convolution ('same' padding) followed by BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1 conv+BN (option B) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.branch1 = conv_bn(cin, cout, 3, stride)
        self.branch2 = conv_bn(cout, cout, 3, 1)
        self.shortcut: nn.Module = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        y = F.relu(self.branch1(x))
        y = self.branch2(y)
        return F.relu(y + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 for 1x28x28 inputs (feature maps 28 -> 14 -> 7)."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = (16, 32, 64), blocks: int = 3) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.stem = conv_bn(1, widths[0], 3)
        layers: list[nn.Module] = []
        cin = widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(cin, width, stride))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for pixels ``x`` in [0, 1], shape (N, 1, 28, 28)."""
        x = self.normalize(x)
        x = F.relu(self.stem(x))
        x = self.layers(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 project + BN."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += [*conv_bn(hidden, cout, 1)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        y = self.body(x)
        return x + y if self.residual else y


#: MobileNetV2 settings (expansion t, output channels c, repeats n, first stride s).
MOBILENETV2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),  # 28x28
    (6, 24, 2, 2),  # 14x14
    (6, 32, 2, 2),  # 7x7
    (6, 64, 2, 1),  # 7x7
)


class MobileNetV2Small(nn.Module):
    """A small MobileNetV2-style network for 1x28x28 inputs."""

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        stem: int = 32,
        settings: tuple[tuple[int, int, int, int], ...] = MOBILENETV2_SETTINGS,
        last: int = 256,
    ) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.stem = nn.Sequential(*conv_bn(1, stem, 3), nn.ReLU6())
        blocks: list[nn.Module] = []
        cin = stem
        for t, c, n, s in settings:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*conv_bn(cin, last, 1), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for pixels ``x`` in [0, 1], shape (N, 1, 28, 28)."""
        x = self.normalize(x)
        x = self.stem(x)
        x = self.blocks(x)
        x = self.head(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: x + attention(LN(x)), then x + MLP(LN(x)); q, k, v as separate Linear layers."""

    def __init__(self, dim: int, heads: int, hidden: int, tokens: int) -> None:
        super().__init__()
        # Python ints, not tensor shapes, so that the exported Reshape targets and the score scale are constants
        self.heads, self.tokens, self.dim = heads, tokens, dim
        self.scale = (dim // heads) ** -0.5
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, D) -> (N, heads, T, D / heads), with the token count fixed so the exported Reshape is a constant."""
        return x.reshape(-1, self.tokens, self.heads, self.dim // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to tokens (N, T, D)."""
        h = self.norm1(x)
        q, k, v = self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))
        attention = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        y = (attention @ v).transpose(1, 2).reshape(-1, self.tokens, self.dim)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTSmall(nn.Module):
    """A small vision transformer for 1x28x28 inputs: 4x4 patches, 4 pre-norm blocks, mean-pooled tokens."""

    def __init__(self, num_classes: int = NUM_CLASSES, dim: int = 64, depth: int = 4, heads: int = 4, hidden: int = 128, patch: int = 4) -> None:
        super().__init__()
        tokens = (28 // patch) ** 2
        self.normalize = Normalize()
        self.patch = nn.Conv2d(1, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, hidden, tokens) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for pixels ``x`` in [0, 1], shape (N, 1, 28, 28)."""
        tokens = self.patch(self.normalize(x)).flatten(2).transpose(1, 2) + self.position
        return self.fc(self.norm(self.blocks(tokens)).mean(1))


ARCHS: dict[str, Callable[[], nn.Module]] = {"resnet20": ResNet20, "mobilenetv2": MobileNetV2Small, "vit": ViTSmall}

#: Peak learning rate and weight decay unless --lr / --weight-decay say otherwise: SGD's, and those of the
#: architectures trained with AdamW.
SGD_DEFAULTS = (0.1, 5e-4)
ADAMW_DEFAULTS: dict[str, tuple[float, float]] = {"vit": (2e-3, 0.05)}


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions, unit/zero BatchNorm, small-normal classifier; a ViT: truncated-normal (0.02) weights."""
    if isinstance(model, ViTSmall):
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(model.position, std=0.02)
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (BN running statistics not included)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- training


class Augmenter:
    """Random crop with 2-pixel zero padding and random horizontal flip, on whole batches."""

    def __init__(self, images: torch.Tensor, pad: int, generator: torch.Generator) -> None:
        self.padded = F.pad(images, (pad, pad, pad, pad))
        self.pad = pad
        self.size = images.shape[-1]
        self.generator = generator

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Augmented copies of the images at ``idx``, shape (B, 1, 28, 28)."""
        b = len(idx)
        oy = torch.randint(0, 2 * self.pad + 1, (b,), generator=self.generator)
        ox = torch.randint(0, 2 * self.pad + 1, (b,), generator=self.generator)
        ar = torch.arange(self.size)
        rows = (oy[:, None] + ar)[:, :, None]  # (B, H, 1)
        cols = (ox[:, None] + ar)[:, None, :]  # (B, 1, W)
        flip = torch.rand(b, generator=self.generator) < 0.5
        cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
        crops = self.padded[idx[:, None, None], 0, rows, cols]  # (B, H, W)
        return crops.unsqueeze(1).contiguous()


@torch.no_grad()
def predict_torch(model: nn.Module, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Logits of ``model`` (put in eval mode) for ``images``."""
    model.eval()
    return torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)])


def train(
    model: nn.Module,
    train_set: LabelledImages,
    test_set: LabelledImages,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    label_smoothing: float,
    seed: int,
    max_steps: int | None = None,
    channels_last: bool = True,
    adamw: bool = False,
) -> list[float]:
    """Train ``model`` in place with SGD (Nesterov) or ``adamw``, and OneCycle; returns seconds per epoch.

    Weight decay applies to convolution/linear weights only (not BN, LayerNorm, biases or position embeddings).
    ``max_steps`` stops early, for timing an epoch. ``channels_last`` trains in NHWC
    memory layout (much faster with oneDNN on CPU, especially for depthwise convs); the
    model is put back to the default layout before returning.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    gen = torch.Generator().manual_seed(seed)
    x_train = torch.from_numpy(train_set.images)
    y_train = torch.from_numpy(train_set.labels)
    x_test = torch.from_numpy(test_set.images)
    y_test = torch.from_numpy(test_set.labels)
    aug = Augmenter(x_train, pad=2, generator=gen)

    decay = [p for name, p in model.named_parameters() if p.ndim > 1 and name != "position"]
    no_decay = [p for name, p in model.named_parameters() if p.ndim <= 1 or name == "position"]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr) if adamw else torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25, div_factor=10.0, final_div_factor=100.0
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    epoch_times: list[float] = []
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(x_train), generator=gen)
        total_loss, correct, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size : (step + 1) * batch_size]
            xb, yb = aug.batch(idx).contiguous(memory_format=fmt), y_train[idx]
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            if max_steps is not None and step + 1 >= max_steps:
                dt = time.perf_counter() - t0
                print(f"timing: {step + 1} steps in {dt:.1f}s -> {dt / (step + 1) * steps_per_epoch:.0f}s per epoch (est.)", flush=True)
                model.to(memory_format=torch.contiguous_format)
                return [dt / (step + 1) * steps_per_epoch]
        train_time = time.perf_counter() - t0
        epoch_times.append(train_time)
        test_acc = float((predict_torch(model, x_test.contiguous(memory_format=fmt)).argmax(1) == y_test).float().mean())
        print(
            f"epoch {epoch + 1:3d}/{epochs}  lr {sched.get_last_lr()[0]:.4f}  loss {total_loss / seen:.4f}  "
            f"train acc {correct / seen:.4f}  test acc {test_acc:.4f}  ({train_time:.0f}s train, "
            f"{time.perf_counter() - t0 - train_time:.0f}s eval)",
            flush=True,
        )
    model.to(memory_format=torch.contiguous_format)
    return epoch_times


# --------------------------------------------------------------------------- export


def _inline_identity_initializers(model: onnx.ModelProto) -> int:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer; returns how many.

    The TorchScript exporter de-duplicates equal parameters (e.g. a BN whose running
    variance equals its scale) and links them with Identity nodes; a plain initializer
    per BN input is what a quantizer expects.
    """
    inits = {t.name: t for t in model.graph.initializer}
    keep, replaced = [], 0
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
            replaced += 1
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return replaced


def export_onnx(model: nn.Module, path: Path, metadata: dict[str, str]) -> onnx.ModelProto:
    """Export ``model`` (eval mode) to a single self-contained ONNX file with BN kept separate."""
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.rand(2, 1, 28, 28)
    # The legacy TorchScript exporter with TrainingMode.PRESERVE and the model in eval
    # mode exports inference-mode BN but skips the Conv+BN fusion that TrainingMode.EVAL
    # applies. (The dynamo exporter's optimizer folds BN into the Conv weights, and
    # without the optimizer its graph is cluttered with Shape/Expand/Constant nodes.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
        )
    proto = onnx.load(str(path), load_external_data=True)
    n = _inline_identity_initializers(proto)
    if n:
        print(f"export: replaced {n} Identity(initializer) nodes by initializers")
    n = lift_constants(proto.graph)
    if n:
        print(f"export: turned {n} Constant nodes into initializers")
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)  # check only; the file keeps the exporter's value_info
    proto.doc_string = "Fashion-MNIST classifier; input float32 NCHW [0,1] (N,1,28,28), normalisation inside, logits out."
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path), save_as_external_data=False)
    return proto


def describe_onnx(proto: onnx.ModelProto, batchnorm: bool = True) -> dict[str, int]:
    """Print and return the node-type counts; check BN nodes exist (where the model has BN) and there are no Constants."""
    counts = dict(collections.Counter(n.op_type for n in proto.graph.node).most_common())
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    n_params = sum(numpy_helper.to_array(t).size for t in proto.graph.initializer)
    print(f"onnx: opset {opsets}, {len(proto.graph.node)} nodes {counts}")
    print(f"onnx: {len(proto.graph.initializer)} initializers, {n_params} values")
    if batchnorm and counts.get("BatchNormalization", 0) == 0:
        raise SystemExit("export: no BatchNormalization nodes left (BN was folded)")
    if counts.get("Constant", 0):
        raise SystemExit("export: the graph still has Constant nodes")
    return counts


def evaluate_onnx(path: Path, test_set: LabelledImages, batch: int = 1000) -> np.ndarray:
    """Logits of the ONNX model at ``path`` on ``test_set``, computed with onnxruntime (CPU)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [sess.run(["logits"], {"input": test_set.images[i : i + batch]})[0] for i in range(0, len(test_set.images), batch)]
    return np.concatenate(outs)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), required=True)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--out", type=Path, required=True, help="where to write the .onnx file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, help="peak OneCycle learning rate (default 0.1 with SGD; the AdamW architectures' own)")
    p.add_argument("--weight-decay", type=float, help="default 5e-4 with SGD; the AdamW architectures' own")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="train in NCHW layout")
    p.add_argument("--data", type=Path, default=FASHION_MNIST_DIR, help="Fashion-MNIST IDX folder")
    p.add_argument("--save-state", type=Path, help="also save the trained state_dict here")
    p.add_argument("--from-state", type=Path, help="skip training: load this state_dict and export it")
    p.add_argument("--time-steps", type=int, help="only time this many training steps and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train (or load), export, and verify one model; returns the exit status."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    model = ARCHS[args.arch]()
    init_weights(model)
    print(f"{args.arch}: {count_parameters(model)} parameters, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    train_set = load_idx_split(args.data, "train")
    test_set = load_idx_split(args.data, "test")

    t0 = time.perf_counter()
    if args.from_state is not None:
        model.load_state_dict(torch.load(args.from_state, map_location="cpu"))
    else:
        default_lr, default_decay = ADAMW_DEFAULTS.get(args.arch, SGD_DEFAULTS)
        times = train(
            model,
            train_set,
            test_set,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr if args.lr is not None else default_lr,
            weight_decay=args.weight_decay if args.weight_decay is not None else default_decay,
            label_smoothing=args.label_smoothing,
            seed=args.seed,
            max_steps=args.time_steps,
            channels_last=args.channels_last,
            adamw=args.arch in ADAMW_DEFAULTS,
        )
        if args.time_steps is not None:
            return 0
        print(f"training: {sum(times):.0f}s, {np.mean(times):.1f}s per epoch (total incl. eval {time.perf_counter() - t0:.0f}s)")
        if args.save_state is not None:
            args.save_state.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), args.save_state)

    torch_logits = predict_torch(model, torch.from_numpy(test_set.images)).numpy()
    torch_acc = float((torch_logits.argmax(1) == test_set.labels).mean())
    print(f"torch test top-1: {torch_acc:.4f}")

    command = "PYTHONPATH=. python tools/train_fmnist.py " + " ".join(sys.argv[1:] if argv is None else argv)
    proto = export_onnx(
        model,
        args.out,
        {"arch": args.arch, "seed": str(args.seed), "epochs": str(args.epochs), "command": command},
    )
    describe_onnx(proto, batchnorm=any(isinstance(m, nn.BatchNorm2d) for m in model.modules()))
    print(f"onnx: wrote {args.out} ({args.out.stat().st_size} bytes)")

    ort_logits = evaluate_onnx(args.out, test_set)
    ort_acc = float((ort_logits.argmax(1) == test_set.labels).mean())
    agree = float((ort_logits.argmax(1) == torch_logits.argmax(1)).mean())
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    print(f"onnxruntime test top-1: {ort_acc:.4f} (torch {torch_acc:.4f}; argmax agreement {agree:.4f}, max |logit diff| {max_diff:.2e})")
    if abs(ort_acc - torch_acc) > 1e-3 or agree < 0.999:
        print("ERROR: the ONNX model does not match the torch model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
