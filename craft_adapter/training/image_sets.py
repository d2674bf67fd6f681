"""Labelled image sets: class-per-subfolder folders, Fashion-MNIST idx files, and k-shot sampling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    """A dataset could not be read or does not fit the request; the message names the path or class."""


@dataclass
class LabeledImages:
    """Images with integer labels into ``class_names``."""

    images: list[Image.Image]
    labels: np.ndarray  # [n] int64
    class_names: list[str]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError("a label is outside the class list")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: np.ndarray) -> LabeledImages:
        """The images at ``indices``, same class list."""
        return LabeledImages([self.images[i] for i in indices], self.labels[indices], list(self.class_names))


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}. Remove or replace the file.") from None


def load_image_folder(root: str | Path) -> LabeledImages:
    """Load ``root/<class name>/*.png|jpg``; classes are the sorted subfolder names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"image folder {root} has no class subfolders; expected root/<class name>/*.png")
    images, labels = [], []
    for label, cdir in enumerate(class_dirs):
        files = sorted(p for p in cdir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"class folder {cdir} has no .png/.jpg/.jpeg images")
        for f in files:
            images.append(_open_image(f))
            labels.append(label)
    return LabeledImages(images, np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs])








def sample_k_shot(labels: np.ndarray, k: int, seed: int, n_classes: int | None = None) -> np.ndarray:
    """Class-balanced indices, ``k`` per class, drawn by ``seed``; ordered class by class."""
    if k < 1:
        raise DataError(f"shots must be at least 1, got {k}")
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(n_classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < k:
            raise DataError(f"class {c} has {len(pool)} images, fewer than the {k} shots asked for")
        picks.append(np.sort(rng.choice(pool, size=k, replace=False)))
    return np.concatenate(picks)


def split_holdout(labels: np.ndarray, n_holdout_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (train, held-out) with ``n_holdout_per_class`` per class held out."""
    rng = np.random.default_rng(seed + 7919)
    train, held = [], []
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        rng.shuffle(pos)
        held.append(pos[:n_holdout_per_class])
        train.append(pos[n_holdout_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))
