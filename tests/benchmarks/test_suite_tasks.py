"""The issue-15 task suite: fixed 2,000-image test sets, deterministic few-shot sets disjoint from them, one held-out
task, and a glyph vendor that loads with open_clip and beats chance on its tasks."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.suite import SUITE, SuiteTask, task
from benchmarks.suite.glyphs import SANS_FONTS, SERIF_ITALIC_FONTS, SERIF_UPRIGHT_FONTS
from benchmarks.suite.tasks import GLYPH_VENDOR_DIR, TEST_SIZE, clear_cache
from craft_adapter.training.image_sets import LabeledImages

NAMES = [t.name for t in SUITE]


def pixels(s: LabeledImages) -> np.ndarray:
    """The images as one uint8 array ``[n, h, w]``."""
    return np.stack([np.asarray(im) for im in s.images])


def test_suite_shape() -> None:
    assert len(SUITE) == 5 and len(set(NAMES)) == 5
    assert [t.held_out for t in SUITE] == [False] * 4 + [True]  # exactly one, and it comes last
    assert len({t.vendor_dir for t in SUITE}) == 2
    for t in SUITE:
        assert t.templates()[0] == "a photo of a {}." and all("{}" in x for x in t.templates())
        assert t.shift and "\n" not in t.shift
    # The glyph vendor never saw a serif face; the letter tasks use only serif faces.
    assert not set(SANS_FONTS) & (set(SERIF_UPRIGHT_FONTS) | set(SERIF_ITALIC_FONTS))


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(KeyError) as e:
        task("nope")
    assert all(name in str(e.value) for name in NAMES)
    assert task("letters-stamp") is SUITE[-1]


@pytest.mark.parametrize("name", NAMES)
def test_sets_are_deterministic_and_disjoint(name: str) -> None:
    t: SuiteTask = task(name)
    clear_cache()
    test = t.test()
    first = pixels(test)
    clear_cache()  # rebuilt from scratch, not served from the cache
    again = t.test()
    assert first.shape == (TEST_SIZE, 28, 28) and first.dtype == np.uint8
    assert np.array_equal(first, pixels(again)) and np.array_equal(test.labels, again.labels)
    assert set(test.labels.tolist()) == set(range(len(t.class_names)))
    assert test.class_names == list(t.class_names)

    train = t.train(16, 1)
    assert np.array_equal(np.bincount(train.labels), np.full(len(t.class_names), 16))
    assert np.array_equal(pixels(train), pixels(t.train(16, 1)))
    assert not np.array_equal(pixels(train), pixels(t.train(16, 2)))
    test_bytes = {im.tobytes() for im in first}
    assert not any(im.tobytes() in test_bytes for im in pixels(train))


def test_fashion_catalogue_is_the_reference_task() -> None:
    from craft_adapter.reference.task import reference_train

    ours, theirs = task("fashion-catalogue").train(4, 3), reference_train(4, 3)
    assert np.array_equal(pixels(ours), pixels(theirs)) and np.array_equal(ours.labels, theirs.labels)


@pytest.mark.slow
def test_glyph_vendor_beats_chance_zero_shot() -> None:
    if not (GLYPH_VENDOR_DIR / "open_clip_config.json").exists():
        pytest.skip("glyph vendor not built (benchmarks/train_reference_vendor.py --data glyphs)")
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    box = OpenClipBackend(f"local-dir:{GLYPH_VENDOR_DIR}", device="cpu")
    for t in SUITE:
        if t.vendor_dir != GLYPH_VENDOR_DIR:
            continue
        test = t.test()
        text = box.embed_texts([f"a photo of a {c}." for c in t.class_names])
        acc = float(np.mean(np.argmax(box.embed_images(test.images) @ text.T, axis=1) == test.labels))
        print(f"{t.name}: zero-shot {100 * acc:.1f}% (chance {100 / len(t.class_names):.1f}%)")
        assert acc > 2 / len(t.class_names)
