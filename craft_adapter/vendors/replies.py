"""One copy of every rule about what a vendor answers: typed vendor errors, Retry-After, zero-shot replies, scores.

Fit, eval, the runtime and the server all read vendor replies through these functions, so a reply one of them
accepts, all of them accept.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


class VendorError(RuntimeError):
    """A vendor answered something the adapter cannot use; the message says what and how to fix it.

    ``transient`` says whether the same call may succeed if sent again (timeouts, 429, 5xx, garbled replies);
    ``retry_after`` is the vendor's own hint in seconds, ``status`` the HTTP status when there was one.
    """

    def __init__(self, message: str, *, transient: bool = True, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient, self.status, self.retry_after = transient, status, retry_after


def scores_by_label(pairs: Iterable[tuple[str, float]], labels: Sequence[str]) -> np.ndarray:
    """Scores ``[c]`` in ``labels`` order from a vendor's ``(label, score)`` answer; loud on any mismatch."""
    got: dict[str, float] = {}
    for label, score in pairs:
        if label in got:
            raise VendorError(f"the vendor returned label {label!r} twice; a zero-shot endpoint returns each "
                              "candidate label once")
        got[label] = score
    missing = [c for c in labels if c not in got]
    unknown = sorted(set(got) - set(labels))
    if missing or unknown:
        raise VendorError(
            f"the vendor returned no score for classes {missing[:5]}{'...' if len(missing) > 5 else ''} "
            f"and labels the adapter does not know {unknown[:5]}; it must return each candidate label "
            "unchanged. Point the client at a zero-shot-image-classification endpoint that scores every "
            "label (no top-k cut), and check the adapter's class names are spelled as the vendor expects")
    return np.asarray([got[c] for c in labels], dtype=np.float32)


def check_scores(scores: Any, n: int, c: int, source: str = "the vendor") -> np.ndarray:
    """``scores`` as float32 ``[n, c]``, or a :class:`VendorError` naming what is wrong and the fix."""
    try:
        arr = np.asarray(scores, dtype=np.float32)
    except (TypeError, ValueError):  # ragged rows, strings, objects
        raise VendorError(f"{source} returned scores that are not a numeric array ({type(scores).__name__}); "
                          f"expected {n} rows of {c} numbers, one per class in the adapter's class order") from None
    if arr.shape != (n, c):
        raise VendorError(f"{source} returned scores of shape {arr.shape}, expected ({n}, {c}): one score per "
                          f"image for each of the adapter's {c} classes, in the adapter's class order")
    if not np.isfinite(arr).all():
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(arr))[:, 0]})
        raise VendorError(f"{source} returned NaN or inf scores for image(s) {bad[:10]}; the refiner needs "
                          "finite scores. Check the images and the vendor's response before retrying")
    return arr


PROBABILITY_SUM_TOLERANCE = 1e-3


MAX_RETRY_AFTER_S = 300.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date), or None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S) if math.isfinite(seconds) else None


def parse_zero_shot(body: bytes, labels: Sequence[str]) -> np.ndarray:
    """Probabilities ``[c]`` in ``labels`` order from a zero-shot reply body; :class:`VendorError` unless usable."""
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise VendorError(f"the reply is not complete JSON ({len(body)} bytes)") from None
    if not isinstance(answer, list) or not all(
            isinstance(e, dict) and isinstance(e.get("label"), str) and isinstance(e.get("score"), (int, float))
            and not isinstance(e.get("score"), bool) for e in answer):
        raise VendorError("the reply is not a zero-shot list [{'label': str, 'score': number}, ...]")
    scores = check_scores(scores_by_label(((e["label"], e["score"]) for e in answer), labels)[None], 1, len(labels))
    if (scores < 0).any() or (scores > 1).any() or abs(float(scores.sum()) - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise VendorError(f"the reply's scores are not probabilities over the labels (sum {float(scores.sum()):.4g})")
    return scores[0]

