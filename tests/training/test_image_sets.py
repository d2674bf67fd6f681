"""Image folders, idx files and k-shot sampling."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from craft_adapter.reference.task import FASHION_MNIST_DIR, apply_shift, load_idx, reference_task
from craft_adapter.training.image_sets import DataError, load_image_folder, sample_k_shot, split_holdout


def make_folder(root, counts, size=8):
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (its data is one black row)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 2)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_image_folder_classes_are_sorted_subfolders(tmp_path):
    ds = load_image_folder(make_folder(tmp_path / "d", {"zebra": 2, "ant": 3}))
    assert ds.class_names == ["ant", "zebra"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert len(ds) == 5


@pytest.mark.parametrize("case", ["missing", "empty", "no_images"])
def test_empty_or_missing_folder_is_a_clear_error(tmp_path, case):
    root = tmp_path / "d"
    if case != "missing":
        root.mkdir()
    if case == "no_images":
        (root / "cat").mkdir()
        (root / "cat" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=str(root)):
        load_image_folder(root)


def test_corrupt_image_names_the_file(tmp_path):
    root = make_folder(tmp_path / "d", {"cat": 2})
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ds = load_image_folder(root)  # listed, not decoded: a bad file costs nothing until it is used
    broken = [i for i, p in enumerate(ds.images.paths) if p.name == "broken.png"]
    with pytest.raises(DataError, match="broken.png"):
        ds.images[broken[0]]


def test_only_sampled_images_are_decoded(tmp_path):
    root = make_folder(tmp_path / "d", {"cat": 6, "dog": 6})
    for p in (root / "dog").iterdir():
        p.write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # every dog image is unreadable...
    ds = load_image_folder(root)
    cats = ds.subset(np.flatnonzero(ds.labels == 0)[:3])
    assert [im.size for im in cats.images] == [(8, 8)] * 3  # ...and a subset without them never reads one
    with pytest.raises(DataError, match="not really|cannot read"):
        ds.subset(np.flatnonzero(ds.labels == 1)[:1]).images[0]


def test_decompression_bomb_is_a_clear_error(tmp_path):
    root = make_folder(tmp_path / "d", {"cat": 1})
    (root / "cat" / "huge.png").write_bytes(png_claiming(10_000, 10_000))  # 100 M pixels in 70 bytes
    with pytest.raises(DataError, match="huge.png.*decompression bomb"):
        load_image_folder(root).images[-1]


def test_class_folder_name_that_is_not_utf8_is_refused(tmp_path):
    root = make_folder(tmp_path / "d", {"cat": 1})
    bad = root / b"\xff\xfedog".decode("utf-8", "surrogateescape")  # a name as Linux may hand it to us
    bad.mkdir()
    Image.new("L", (28, 28)).save(bad / "a.png")
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_image_folder(root)


def test_k_shot_is_deterministic_and_balanced():
    labels = np.repeat(np.arange(5), 40)
    a, b = sample_k_shot(labels, 7, seed=3), sample_k_shot(labels, 7, seed=3)
    np.testing.assert_array_equal(a, b)
    assert np.bincount(labels[a], minlength=5).tolist() == [7] * 5
    assert len(set(a.tolist())) == 35
    assert not np.array_equal(a, sample_k_shot(labels, 7, seed=4))


def test_class_with_too_few_images_for_k():
    labels = np.array([0] * 10 + [1] * 3)
    with pytest.raises(DataError, match="class 1 has 3 images, fewer than the 4 shots"):
        sample_k_shot(labels, 4, seed=0)


def test_holdout_split_is_per_class_and_disjoint():
    labels = np.repeat(np.arange(3), 8)
    tr, ho = split_holdout(labels, 2, seed=1)
    assert np.bincount(labels[ho]).tolist() == [2, 2, 2]
    assert not set(tr) & set(ho) and len(tr) + len(ho) == 24


def write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_round_trip_and_truncation(tmp_path):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", x)
    write_idx(tmp_path / "y.gz", np.array([1, 0]))
    xx, yy = load_idx(tmp_path / "x.gz", tmp_path / "y.gz")
    np.testing.assert_array_equal(xx, x)
    assert yy.tolist() == [1, 0]
    raw = gzip.decompress((tmp_path / "x.gz").read_bytes())
    (tmp_path / "t").write_bytes(raw[:-3])
    with pytest.raises(DataError, match="header says"):
        load_idx(tmp_path / "t", tmp_path / "y.gz")


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="dataset-fashion-mnist not installed")
def test_reference_task_shapes_and_shift_is_deterministic():
    train, test = reference_task(shots=2, seed=5)
    assert len(train) == 20 and len(test) == 10_000
    assert np.bincount(train.labels).tolist() == [2] * 10
    x = np.asarray(train.images[0])
    x2 = np.asarray(reference_task(shots=2, seed=5)[0].images[0])
    np.testing.assert_array_equal(x, x2)
    plain = np.asarray(reference_task(shots=2, seed=5, shifted=False)[0].images[0])
    np.testing.assert_array_equal(apply_shift(plain[None])[0], x)
    assert x.mean() > plain.mean()  # white background
