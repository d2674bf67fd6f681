"""The issue-15 task suite: five few-shot image-classification tasks over two reference vendors.

Each task is a vendor (an open_clip ``local-dir:`` folder), a class list, a deterministic few-shot sampler and a
fixed 2,000-image test set, rebuilt bit for bit from offline data on every machine (fixed numpy seeds; numpy image
ops and PIL font rendering are deterministic). Every task carries a shift that a hand-written prompt cannot undo:
either styles the vendor never saw together, a look no caption word names, or a typeface it never saw.

The train pool and the test set never share an image: Fashion-MNIST tasks sample shots from the train split and test
on the test split; glyph tasks render the two from different seeds. The last task, ``letters-stamp``, is held out of
all tuning (defaults are chosen on the mean over the other four and only reported on it).

Handwritten digits (MNIST and kin) are deliberately absent: they are reserved for an outside check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import numpy as np

from benchmarks.suite import glyphs
from craft_adapter.reference.task import (
    CLASS_NAMES,
    REFERENCE_VENDOR_DIR,
    apply_shift,
    arrays_to_images,
    load_fashion_mnist,
    render,
)
from craft_adapter.training.image_sets import LabeledImages, sample_k_shot

TEST_SIZE = 2000
GLYPH_VENDOR_DIR = Path(__file__).resolve().parent / "vendor_glyphs"
GENERIC_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "{}")

Arrays = tuple[np.ndarray, np.ndarray]  # ([n, 28, 28] uint8, [n] int64)


@dataclass(frozen=True)
class SuiteTask:
    """One suite task; ``train``/``test`` rebuild the same images on every call (test arrays cached per process)."""

    name: str
    vendor_dir: Path
    class_names: tuple[str, ...]
    held_out: bool
    shift: str
    build_train: Callable[[int, int], Arrays] = field(repr=False, compare=False)
    build_test: Callable[[], Arrays] = field(repr=False, compare=False)
    extra_templates: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def vendor_spec(self) -> str:
        """The open_clip model spec of this task's vendor."""
        return f"local-dir:{self.vendor_dir}"

    def train(self, shots: int, seed: int) -> LabeledImages:
        """The few-shot set: ``shots`` per class, drawn by ``seed`` from a pool disjoint from the test set."""
        return self._labeled(self.build_train(shots, seed))

    def test(self) -> LabeledImages:
        """The fixed test set: exactly 2,000 images, every class present."""
        return self._labeled(_cached_test(self.name))

    def templates(self) -> tuple[str, ...]:
        """Hand-written templates (``{}`` = class name) a user might try; the first is ``a photo of a {}.``."""
        return GENERIC_TEMPLATES + self.extra_templates

    def _labeled(self, arrays: Arrays) -> LabeledImages:
        x, y = arrays
        return LabeledImages(arrays_to_images(x), y.copy(), list(self.class_names))


# -- vendor A: Fashion-MNIST ------------------------------------------------------------------------------------
@lru_cache(maxsize=2)
def _fashion(split: str) -> Arrays:
    return load_fashion_mnist(split)


def _stratified_test_indices(y: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """A fixed class-balanced subset of the test split (sorted, so the order does not depend on the draw)."""
    return np.sort(sample_k_shot(y, per_class, seed, n_classes=int(y.max()) + 1))


def _sobel_edges(x: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of uint8 ``[n,h,w]``, each image scaled so its strongest edge is 255."""
    p = np.pad(x.astype(np.float32), ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2])
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:])
    mag = np.sqrt(gx * gx + gy * gy)
    peak = np.maximum(mag.max(axis=(1, 2), keepdims=True), 1e-6)
    return np.clip(np.rint(mag / peak * 255.0), 0, 255).astype(np.uint8)


def _fashion_task(transform: Callable[[np.ndarray, np.random.Generator], np.ndarray], salt: int) -> tuple[
        Callable[[int, int], Arrays], Callable[[], Arrays]]:
    """Train/test builders for a Fashion-MNIST task whose images go through ``transform`` (seeded per set)."""

    def build_train(shots: int, seed: int) -> Arrays:
        x, y = _fashion("train")
        idx = sample_k_shot(y, shots, seed, n_classes=len(CLASS_NAMES))
        return transform(x[idx], np.random.default_rng([salt, shots, seed])), y[idx]

    def build_test() -> Arrays:
        x, y = _fashion("test")
        idx = _stratified_test_indices(y, TEST_SIZE // len(CLASS_NAMES))
        return transform(x[idx], np.random.default_rng([salt, 0])), y[idx]

    return build_train, build_test


NIGHT_STYLES = (2, 4, 6)  # pixelated, dark, noisy: three at once, a combination the vendor never saw
_catalogue = _fashion_task(lambda x, r: apply_shift(x), salt=1)
_night = _fashion_task(lambda x, r: render(x, NIGHT_STYLES, r), salt=2)
_sketch = _fashion_task(lambda x, r: _sobel_edges(x), salt=3)


# -- vendor B: printed letters ----------------------------------------------------------------------------------
GLYPH_POOL_PER_CLASS = 64  # few-shot pool per class; shots are drawn from it, never from the test renders


def _glyph_task(fonts: tuple[str, ...], styles: tuple[int, ...], max_rotation: float, salt: int) -> tuple[
        Callable[[int, int], Arrays], Callable[[], Arrays]]:
    """Train/test builders for a letters task: serif ``fonts`` under ``styles``, pool and test from other seeds."""

    def rendered(labels: np.ndarray, seed: list[int]) -> np.ndarray:
        rng = np.random.default_rng(seed)
        x = glyphs.render_glyphs(labels, fonts, rng, max_rotation=max_rotation)
        return render(x, styles, rng)

    def build_train(shots: int, seed: int) -> Arrays:
        pool_y = np.repeat(np.arange(len(glyphs.LETTER_CLASSES)), GLYPH_POOL_PER_CLASS)
        idx = sample_k_shot(pool_y, shots, seed, n_classes=len(glyphs.LETTER_CLASSES))
        y = pool_y[idx]
        # Render only the drawn shots, each from its own pool position's seed: the same pool image whatever k.
        x = np.concatenate([rendered(y[i:i + 1], [salt, 1, int(j)]) for i, j in enumerate(idx)])
        return x, y

    def build_test() -> Arrays:
        y = np.arange(TEST_SIZE, dtype=np.int64) % len(glyphs.LETTER_CLASSES)
        return rendered(y, [salt, 2]), y

    return build_train, build_test


_serif = _glyph_task(glyphs.SERIF_UPRIGHT_FONTS, (1, 3), glyphs.TRAIN_MAX_ROTATION, salt=4)  # blurry, low contrast
_stamp = _glyph_task(glyphs.SERIF_ITALIC_FONTS, (0, 6), 20.0, salt=5)  # white background, noisy

LETTER_TEMPLATES = ("a photo of a {} in a serif font.", "a printed {}.", "a photo of a typed {}.")

SUITE: tuple[SuiteTask, ...] = (
    SuiteTask(
        "fashion-catalogue", REFERENCE_VENDOR_DIR, tuple(CLASS_NAMES), False,
        "white background + blurry + low contrast at once; the vendor saw at most two styles together",
        *_catalogue, extra_templates=(
            "a photo of a {} on a white background.", "a blurry photo of a {}.", "a low contrast photo of a {}.",
            "a blurry low contrast photo of a {} on a white background.", "a product photo of a {}.")),
    SuiteTask(
        "fashion-night", REFERENCE_VENDOR_DIR, tuple(CLASS_NAMES), False,
        "pixelated + dark + noisy at once: each word is in the vendor's captions, the triple never was",
        *_night, extra_templates=(
            "a dark photo of a {}.", "a noisy photo of a {}.", "a pixelated photo of a {}.",
            "a pixelated dark photo of a {}.", "a pixelated dark noisy photo of a {}.", "a night photo of a {}.")),
    SuiteTask(
        "fashion-sketch", REFERENCE_VENDOR_DIR, tuple(CLASS_NAMES), False,
        "Sobel edge maps (bright outlines on black): a look no word in the vendor's captions describes",
        *_sketch, extra_templates=(
            "a sketch of a {}.", "an outline of a {}.", "a line drawing of a {}.", "a dark photo of a {}.",
            "a low contrast photo of a {}.")),
    SuiteTask(
        "letters-serif", GLYPH_VENDOR_DIR, glyphs.LETTER_CLASSES, False,
        "serif typefaces the vendor never saw (trained on sans only), blurry + low contrast; no caption names fonts",
        *_serif, extra_templates=(
            "a blurry photo of a {}.", "a low contrast photo of a {}.", "a blurry low contrast photo of a {}.")
        + LETTER_TEMPLATES),
    SuiteTask(
        "letters-stamp", GLYPH_VENDOR_DIR, glyphs.LETTER_CLASSES, True,
        "serif italics the vendor never saw, rotated up to 20 degrees, noisy on white; fonts and tilt have no words",
        *_stamp, extra_templates=(
            "a photo of a {} on a white background.", "a noisy photo of a {}.",
            "a noisy photo of a {} on a white background.", "a photo of an italic {}.", "a photo of a tilted {}.")
        + LETTER_TEMPLATES),
)
_BY_NAME = {t.name: t for t in SUITE}
TUNING_TASKS = tuple(t.name for t in SUITE if not t.held_out)  # defaults are chosen on these, never the held-out one


@cache
def _cached_test(name: str) -> Arrays:
    x, y = _BY_NAME[name].build_test()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def clear_cache() -> None:
    """Forget the cached test sets (so a test can check that a rebuild gives the same bytes)."""
    _cached_test.cache_clear()


def task(name: str) -> SuiteTask:
    """The suite task called ``name``; ``KeyError`` naming the known tasks otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown suite task {name!r}; known: {', '.join(_BY_NAME)}") from None
