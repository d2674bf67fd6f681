"""The built-in reference setup: Fashion-MNIST, the image styles the reference vendor was taught, and the
reference downstream task (catalogue photos: Fashion-MNIST under a fixed domain shift)."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from craft_adapter.training.image_sets import DataError, LabeledImages, sample_k_shot

FASHION_MNIST_DIR = Path(os.environ.get("CRAFT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
REFERENCE_VENDOR_DIR = Path(__file__).resolve().parent / "vendor"  # package data: ships in the wheel
CLASS_NAMES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
HAND_TEMPLATE = "a photo of a {}."


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``[n, h, w]`` float images, edge-padded."""
    r = max(1, int(round(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        xp = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        x = sum(w * np.take(xp, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return x


def _pixelate(x: np.ndarray, f: int = 4) -> np.ndarray:
    n, h, w = x.shape
    small = x.reshape(n, h // f, f, w // f, f).mean(axis=(2, 4))
    return np.repeat(np.repeat(small, f, axis=1), f, axis=2)


@dataclass(frozen=True)
class Style:
    """An image style: how to render it, and how a caption says it (adjective or suffix)."""

    name: str
    adjective: str | None
    suffix: str | None
    render: Callable[[np.ndarray, np.random.Generator], np.ndarray]  # float [n,h,w] in 0..255


# Order matters: styles compose in this order, and captions list adjectives in it.
STYLES: tuple[Style, ...] = (
    Style("white background", None, " on a white background", lambda x, r: 255.0 - x),
    Style("blurry", "blurry", None, lambda x, r: _blur(x, 1.2)),
    Style("pixelated", "pixelated", None, lambda x, r: _pixelate(x)),
    Style("low contrast", "low contrast", None, lambda x, r: x * 0.35 + 0.65 * 127.5),
    Style("dark", "dark", None, lambda x, r: x * 0.35),
    Style("bright", "bright", None, lambda x, r: x * 0.45 + 140.0),
    Style("noisy", "noisy", None, lambda x, r: x + r.normal(0.0, 40.0, size=x.shape)),
)
NOUNS = ("photo", "picture", "image")


def caption(class_name: str, styles: tuple[int, ...], noun: str = "photo") -> str:
    """The caption the reference vendor was trained on for a class rendered in ``styles``."""
    adjs = " ".join(STYLES[s].adjective for s in styles if STYLES[s].adjective)
    suffix = "".join(STYLES[s].suffix for s in styles if STYLES[s].suffix)
    head = f"a {adjs} {noun}" if adjs else f"a {noun}"
    return f"{head} of a {class_name}{suffix}."


def render(x: np.ndarray, styles: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Render uint8 ``[n,h,w]`` images in the given styles; returns uint8."""
    y = x.astype(np.float32)
    for s in sorted(styles):
        y = STYLES[s].render(y, rng)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


# The reference domain shift: e-commerce catalogue shots. Garments on a white background, washed out and
# slightly out of focus -- what a classifier trained on studio scans meets in product listings.
SHIFT_STYLES = (0, 1, 3)  # white background, blurry, low contrast


def apply_shift(x: np.ndarray) -> np.ndarray:
    """The reference task's deterministic domain shift on uint8 ``[n,h,w]`` images."""
    return render(x, SHIFT_STYLES, np.random.default_rng(0))


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``train`` or ``test`` as ``([n,28,28] uint8, [n] int64)`` from the Debian package."""
    stem = {"train": "train", "test": "t10k"}.get(split)
    if stem is None:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    img = FASHION_MNIST_DIR / f"{stem}-images-idx3-ubyte.gz"
    lab = FASHION_MNIST_DIR / f"{stem}-labels-idx1-ubyte.gz"
    if not img.exists():
        raise DataError(
            f"Fashion-MNIST not found at {FASHION_MNIST_DIR}; install it with "
            "`apt-get install dataset-fashion-mnist` or set CRAFT_FASHION_MNIST"
        )
    return load_idx(img, lab)


def reference_train(shots: int, seed: int, shifted: bool = True) -> LabeledImages:
    """The reference task's few-shot set: ``shots`` per class drawn by ``seed`` from the train split."""
    x, y = load_fashion_mnist("train")
    idx = sample_k_shot(y, shots, seed, n_classes=len(CLASS_NAMES))
    x = apply_shift(x[idx]) if shifted else x[idx]
    return LabeledImages(arrays_to_images(x), y[idx], list(CLASS_NAMES))


def reference_test(shifted: bool = True) -> LabeledImages:
    """The reference task's fixed test set: all 10,000 test images."""
    x, y = load_fashion_mnist("test")
    return LabeledImages(arrays_to_images(apply_shift(x) if shifted else x), y, list(CLASS_NAMES))


def reference_task(shots: int, seed: int, shifted: bool = True) -> tuple[LabeledImages, LabeledImages]:
    """The reference task: the few-shot set and the test set, both under the catalogue shift (or plain)."""
    return reference_train(shots, seed, shifted), reference_test(shifted)


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

