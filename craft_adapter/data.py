"""Labelled image sets: class-per-subfolder folders, Fashion-MNIST idx files, and k-shot sampling."""

from __future__ import annotations

import gzip
import struct
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


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read idx file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but the file holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_idx(images_path: str | Path, labels_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an idx image file and its label file (optionally gzipped): ``([n, h, w] uint8, [n] int64)``."""
    x = _read_idx(Path(images_path))
    y = _read_idx(Path(labels_path)).astype(np.int64)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"idx shapes do not match: images {x.shape}, labels {y.shape}")
    return x, y


def arrays_to_images(x: np.ndarray) -> list[Image.Image]:
    """Turn ``[n, h, w]`` uint8 arrays into greyscale PIL images."""
    return [Image.fromarray(a, mode="L") for a in x]


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
