"""Zero-shot accuracy of every suite task on its 2,000 test images: "a photo of a {}." and the best of templates().

    .venv/bin/python -m benchmarks.suite.zero_shot [--tasks fashion-night,letters-serif] [--sans-check]

``--sans-check`` adds a row that is not a task: the glyph vendor on plain sans letters (the fonts it was trained
on, fresh renders), to show the vendor itself works and the serif tasks' drop is the shift.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.suite import glyphs  # noqa: E402
from benchmarks.suite.tasks import GLYPH_VENDOR_DIR, SUITE, task  # noqa: E402
from benchmarks.suite_runs import backend_at  # noqa: E402
from craft_adapter.reference.task import arrays_to_images  # noqa: E402
from craft_adapter.vendors.open_clip_backend import OpenClipBackend  # noqa: E402


def template_accuracies(box: OpenClipBackend, image_emb: np.ndarray, labels: np.ndarray,
                        class_names: tuple[str, ...], templates: tuple[str, ...]) -> dict[str, float]:
    """Zero-shot accuracy (fraction) for each template, from precomputed image embeddings."""
    out = {}
    for t in templates:
        text = box.embed_texts([t.format(c) for c in class_names])
        out[t] = float(np.mean(np.argmax(image_emb @ text.T, axis=1) == labels))
    return out


def main() -> None:
    """Print the zero-shot table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(t.name for t in SUITE))
    ap.add_argument("--sans-check", action="store_true")
    args = ap.parse_args()
    print(f"{'task':<20} {'vendor':<13} {'a photo of a {}.':>16} {'best template':>14}  best")
    for name in args.tasks.split(","):
        t = task(name)
        box = backend_at(t.vendor_dir)
        test = t.test()
        acc = template_accuracies(box, box.embed_images(test.images), test.labels, t.class_names, t.templates())
        best = max(acc, key=acc.__getitem__)
        tag = " (held out)" if t.held_out else ""
        print(f"{t.name:<20} {t.vendor_dir.name:<13} {100 * acc['a photo of a {}.']:>15.1f}% {100 * acc[best]:>13.1f}%"
              f"  {best!r}{tag}", flush=True)
    if args.sans_check:
        x, y = glyphs.glyph_bank(77, glyphs.SANS_FONTS, seed=424242)  # not a seed the vendor trained on
        box = backend_at(GLYPH_VENDOR_DIR)
        acc = template_accuracies(box, box.embed_images(arrays_to_images(x)), y, glyphs.LETTER_CLASSES,
                                  ("a photo of a {}.",))
        print(f"{'(sans letters)':<20} {GLYPH_VENDOR_DIR.name:<13} {100 * acc['a photo of a {}.']:>15.1f}%")


if __name__ == "__main__":
    main()
