"""Labelled image sets: class-per-subfolder folders and k-shot sampling.

A folder is listed, not decoded: its images decode when first used, so a fit at ``--shots 4`` over a folder of
large photos holds only the sampled images in memory, and a bad file outside the sample costs nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    """A dataset could not be read or does not fit the request; the message names the path or class."""


class ImageFiles(Sequence[Image.Image]):
    """Image files, each decoded on first access and kept (a subset lists paths and decodes nothing)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._decoded: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Image.Image:  # type: ignore[override]
        if i not in self._decoded:
            self._decoded[i] = _open_image(self.paths[i])
        return self._decoded[i]


@dataclass
class LabeledImages:
    """Images with integer labels into ``class_names``; ``images`` may decode lazily (:class:`ImageFiles`)."""

    images: Sequence[Image.Image]
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
        """The images at ``indices``, same class list (still undecoded when these are files)."""
        if isinstance(self.images, ImageFiles):
            picked: Sequence[Image.Image] = ImageFiles([self.images.paths[i] for i in indices])
        else:
            picked = [self.images[i] for i in indices]
        return LabeledImages(picked, self.labels[indices], list(self.class_names))


def _open_image(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():  # PIL only warns between its limit and twice it: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"image {path} would decode to more than {Image.MAX_IMAGE_PIXELS} pixels (a decompression "
                        "bomb, or a huge image): remove it, or resize it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}. Remove or replace the file.") from None


def load_image_folder(root: str | Path) -> LabeledImages:
    """List ``root/<class name>/*.png|jpg`` (decoded on use); classes are the sorted subfolder names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"image folder {root} has no class subfolders; expected root/<class name>/*.png")
    for cdir in class_dirs:
        try:
            cdir.name.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"class folder {cdir.name.encode('utf-8', 'backslashreplace').decode()!r} in {root} "
                            "has a name that is not valid UTF-8; rename it (class names go into the adapter file)") \
                from None
    paths, labels = [], []
    for label, cdir in enumerate(class_dirs):
        files = sorted(p for p in cdir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"class folder {cdir} has no .png/.jpg/.jpeg images")
        paths += files
        labels += [label] * len(files)
    return LabeledImages(ImageFiles(paths), np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs])


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
