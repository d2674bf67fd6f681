"""Printed lowercase letters, MNIST-style: 28x28 greyscale, a white glyph on black, from the DejaVu fonts.

The glyph vendor is trained on the sans families only; the suite's letter tasks use the serif families, which it
never saw. Rendering is PIL's FreeType rasteriser at 2x, rotated and box-reduced to 28x28: deterministic for a given
numpy generator, font file and Pillow/FreeType build. The fonts come from the Debian packages fonts-dejavu-core
(DejaVuSans, SansMono, Serif, SerifCondensed regular and bold) and fonts-dejavu-extra (the rest).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from craft_adapter.training.image_sets import DataError

FONT_DIR = Path(os.environ.get("CRAFT_DEJAVU_FONTS", "/usr/share/fonts/truetype/dejavu"))
LETTERS = "abcdefghijklmnopqrstuvwxyz"
LETTER_CLASSES = tuple(f"letter {c}" for c in LETTERS)
SANS_FONTS = tuple(
    f"DejaVu{family}{face}.ttf" for family in ("Sans", "SansMono", "SansCondensed")
    for face in ("", "-Bold", "-Oblique", "-BoldOblique"))
SERIF_UPRIGHT_FONTS = tuple(f"DejaVu{family}{face}.ttf" for family in ("Serif", "SerifCondensed")
                            for face in ("", "-Bold"))
SERIF_ITALIC_FONTS = tuple(f"DejaVu{family}{face}.ttf" for family in ("Serif", "SerifCondensed")
                           for face in ("-Italic", "-BoldItalic"))
TRAIN_MAX_ROTATION = 8.0  # degrees; the vendor's own jitter
SIZE = 28
_SCALE = 2  # supersampling factor: draw and rotate at 56x56, box-reduce to 28x28
_MAX_INK = 23  # px at 1x: the larger side of a glyph's ink box never exceeds this (wide bold 'm' would clip)


@cache
def _font(name: str, px: int) -> ImageFont.FreeTypeFont:
    path = FONT_DIR / name
    if not path.is_file():
        raise DataError(f"font {path} not found; install it with `apt-get install fonts-dejavu-core "
                        "fonts-dejavu-extra` or set CRAFT_DEJAVU_FONTS")
    return ImageFont.truetype(str(path), px)


def _draw_one(ch: str, font_name: str, px: int, dx: float, dy: float, angle: float) -> np.ndarray:
    """One glyph: ink box centred (plus the offset) on a black 2x canvas, rotated, reduced to uint8 ``[28, 28]``."""
    font = _font(font_name, px * _SCALE)
    left, top, right, bottom = font.getbbox(ch)
    side = max(right - left, bottom - top)
    if side > _MAX_INK * _SCALE:  # too big at this size: redraw smaller (one step is enough, sizes are close)
        font = _font(font_name, int(px * _SCALE * _MAX_INK * _SCALE / side))
        left, top, right, bottom = font.getbbox(ch)
    n = SIZE * _SCALE
    canvas = Image.new("L", (n, n), 0)
    cx, cy = n / 2 + dx * _SCALE, n / 2 + dy * _SCALE
    ImageDraw.Draw(canvas).text((cx - (left + right) / 2, cy - (top + bottom) / 2), ch, fill=255, font=font)
    canvas = canvas.rotate(angle, resample=Image.Resampling.BICUBIC, center=(cx, cy))
    return np.asarray(canvas.reduce(_SCALE), dtype=np.uint8)


def render_glyphs(labels: np.ndarray, fonts: tuple[str, ...], rng: np.random.Generator,
                  max_rotation: float = TRAIN_MAX_ROTATION) -> np.ndarray:
    """uint8 ``[n, 28, 28]``: letter ``labels[i]`` in a random one of ``fonts``, size, offset and rotation."""
    n = len(labels)
    font_ids = rng.integers(0, len(fonts), size=n)
    sizes = rng.integers(18, 27, size=n)  # font size in px at 1x
    offsets = rng.uniform(-2.0, 2.0, size=(n, 2))
    angles = rng.uniform(-max_rotation, max_rotation, size=n)
    out = np.empty((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        out[i] = _draw_one(LETTERS[int(labels[i])], fonts[font_ids[i]], int(sizes[i]), float(offsets[i, 0]),
                           float(offsets[i, 1]), float(angles[i]))
    return out


def glyph_bank(per_class: int, fonts: tuple[str, ...], seed: int,
               max_rotation: float = TRAIN_MAX_ROTATION) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` renders of every letter: ``([26 * per_class, 28, 28] uint8, [n] int64)``, class by class."""
    y = np.repeat(np.arange(len(LETTERS), dtype=np.int64), per_class)
    return render_glyphs(y, fonts, np.random.default_rng(seed), max_rotation), y
