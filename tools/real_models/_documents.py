"""Shared pieces for synthesised document images: real English sentences, DejaVu fonts, wrapped text and paper finish.

The sentences come from the licence texts Debian ships in /usr/share/common-licenses (plain English prose); the fonts
are the DejaVu TrueType files in /usr/share/fonts/truetype/dejavu. Nothing here downloads anything.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

LICENCES = Path("/usr/share/common-licenses")
FONTS = Path("/usr/share/fonts/truetype/dejavu")
BODY_FONTS = ("DejaVuSerif.ttf", "DejaVuSans.ttf", "DejaVuSansCondensed.ttf", "DejaVuSerifCondensed.ttf", "DejaVuSansMono.ttf")
BOLD_FONTS = ("DejaVuSerif-Bold.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansCondensed-Bold.ttf", "DejaVuSerifCondensed-Bold.ttf")


@lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """Sentences of 4 to 60 words from the licence texts, whitespace collapsed, in a fixed order."""
    found: list[str] = []
    for path in sorted(LICENCES.iterdir()):
        if not path.is_file() or path.is_symlink():
            continue
        text = " ".join(path.read_text(encoding="ascii", errors="ignore").split())
        for piece in re.split(r"(?<=[.;:])\s+", text):
            words = piece.split()
            if 4 <= len(words) <= 60 and sum(c.isalpha() for c in piece) > 0.6 * len(piece):
                found.append(" ".join(words))
    return tuple(found)


@lru_cache(maxsize=64)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """One DejaVu font at a pixel size (cached)."""
    return ImageFont.truetype(str(FONTS / name), size)


def words(rng: np.random.Generator, count: int) -> str:
    """About ``count`` words of consecutive sentences starting at a random sentence."""
    pool = sentences()
    start = int(rng.integers(len(pool)))
    out: list[str] = []
    while len(out) < count:
        out.extend(pool[start % len(pool)].split())
        start += 1
    return " ".join(out[:count])


def heading(rng: np.random.Generator, max_words: int = 8) -> str:
    """A short title-like phrase: the first words of a random sentence, without the trailing punctuation."""
    pool = sentences()
    text = " ".join(pool[int(rng.integers(len(pool)))].split()[: int(rng.integers(2, max_words + 1))])
    text = text.rstrip(".,;:")
    return text.title() if rng.random() < 0.5 else text.upper()


def wrap(text: str, face: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """Greedy word wrap of ``text`` into lines no wider than ``width`` pixels (a single long word may overflow)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if line and face.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    if line:
        lines.append(line)
    return lines


def draw_lines(
    draw: ImageDraw.ImageDraw,
    lines: list[str],
    xy: tuple[int, int],
    face: ImageFont.FreeTypeFont,
    leading: float,
    ink: int,
    justify_width: float | None = None,
) -> int:
    """Draw ``lines`` from the top-left ``xy`` with line pitch ``leading`` pixels; justify all but the last if asked; return the bottom y."""
    x, y = xy
    for k, line in enumerate(lines):
        parts = line.split()
        if justify_width and k < len(lines) - 1 and len(parts) > 1:
            gap = (justify_width - sum(face.getlength(p) for p in parts)) / (len(parts) - 1)
            cx = float(x)
            for part in parts:
                draw.text((cx, y), part, font=face, fill=ink)
                cx += face.getlength(part) + gap
        else:
            draw.text((x, y), line, font=face, fill=ink)
        y += int(round(leading))
    return y


def paper(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, int]:
    """A light greyscale page of ``size`` (width, height) with a faint tint gradient; return it and a dark ink level."""
    width, height = size
    base = float(rng.uniform(225, 255))
    ramp = np.linspace(0, float(rng.uniform(-12, 12)), height, dtype=np.float32)[:, None]
    page = np.clip(base + ramp + np.zeros((1, width), np.float32), 0, 255).astype(np.uint8)
    return Image.fromarray(page, "L"), int(rng.integers(0, 70))


def finish(rng: np.random.Generator, page: Image.Image, tint: bool = True, blur: float = 1.0) -> np.ndarray:
    """Scanner-like finish: maybe a slight blur (radius up to ``blur``), contrast change, sensor noise, a paper tint; return uint8 RGB."""
    if rng.random() < 0.5:
        page = page.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0) * blur)))
    pixels = np.asarray(page.convert("RGB"), dtype=np.float32)
    contrast = float(rng.uniform(0.85, 1.05))
    pixels = (pixels - 128.0) * contrast + 128.0 + float(rng.uniform(-8, 8))
    pixels += rng.standard_normal(pixels.shape[:2], dtype=np.float32)[..., None] * float(rng.uniform(0.0, 6.0))
    if tint:
        pixels *= rng.uniform(0.93, 1.0, size=3).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


Box = tuple[int, int, int, int]


def paragraph(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    xy: tuple[int, int],
    width: int,
    face: ImageFont.FreeTypeFont,
    leading: float,
    ink: int,
    count: int,
) -> Box:
    """Draw about ``count`` words wrapped to ``width`` (justified or ragged, maybe indented); return the inked box."""
    lines = wrap(words(rng, count), face, width)
    if rng.random() < 0.4 and lines:
        lines[0] = "\u2003" + lines[0]
    bottom = draw_lines(draw, lines, xy, face, leading, ink, width if rng.random() < 0.6 else None)
    right = xy[0] + max(int(face.getlength(line)) for line in lines) if lines else xy[0]
    return xy[0], xy[1], min(right, xy[0] + width), bottom - int(round(leading - face.size))


def table(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    xy: tuple[int, int],
    width: int,
    face: ImageFont.FreeTypeFont,
    ink: int,
    rows: int,
    cols: int,
) -> Box:
    """Draw a ruled table of short words and numbers (full grid or rows only, bold-looking header row); return its box."""
    x0, y0 = xy
    row_h = int(face.size * rng.uniform(1.5, 2.1))
    col_w = width / cols
    full_grid = rng.random() < 0.6
    pad = max(2, face.size // 3)
    for r in range(rows):
        top = y0 + r * row_h
        for c in range(cols):
            if r == 0:
                cell = heading(rng, 2)
            elif c == 0 or rng.random() < 0.4:
                cell = " ".join(words(rng, int(rng.integers(1, 4))).split()[:3])
            else:
                cell = f"{rng.uniform(0, 10 ** int(rng.integers(1, 5))):.{int(rng.integers(0, 3))}f}"
            while cell and face.getlength(cell) > col_w - 2 * pad:
                cell = cell[:-1]
            draw.text((x0 + c * col_w + pad, top + (row_h - face.size) // 2), cell, font=face, fill=ink)
        if full_grid or r in (0, 1):
            draw.line([(x0, top), (x0 + width, top)], fill=ink, width=1)
    bottom = y0 + rows * row_h
    draw.line([(x0, bottom), (x0 + width, bottom)], fill=ink, width=max(1, int(rng.integers(1, 3))))
    if full_grid:
        for c in range(cols + 1):
            x = int(x0 + min(c * col_w, width))
            draw.line([(x, y0), (x, bottom)], fill=ink, width=1)
    return x0, y0, x0 + width, bottom
