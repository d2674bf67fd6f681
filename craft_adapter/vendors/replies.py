"""One copy of every rule about what goes to a vendor and what comes back: zero-shot requests and replies, scores.

Fit, eval, the runtime, the server and the two fake vendors (:mod:`craft_adapter.testing.stub_vendor`,
:mod:`craft_adapter.reference.local_vendor`) build and read the Hugging Face zero-shot protocol through these
functions, and check every score array through :func:`check_answer`, so a reply one of them accepts, all of them
accept, and a reply one refuses, all refuse. A refusal is a transient :class:`VendorError` (a garbled reply may
come out right when the same call is sent again), except a score kind the vendor does not return (see below).

Score kinds: a zero-shot vendor's scores are either a softmax over the labels (``"probabilities"``, summing to 1:
CLIP-style endpoints, Hugging Face's pipeline) or independent per-label probabilities (``"independent_probabilities"``:
SigLIP-style sigmoids, each in [0, 1], any sum). The kind is declared by the client (``scores="softmax"|"sigmoid"``),
recorded in the adapter as its ``logit_kind`` and checked by every reader. :class:`ScoreKindCheck` refuses a
softmax-declared vendor whose *first* reply does not sum to 1 with a non-transient error that says how to declare
it, so a fit stops before paying for retries and an adapter that serve would refuse.

No refusal here quotes the reply's text: the clients, which know the secrets, add vendor text to messages only
through :func:`~craft_adapter.vendors.credentials.vendor_detail` (scrubbed, then cut).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from craft_adapter.vendors.faults import VendorError

# A zero-shot reply's scores are a softmax over the labels. A float32 softmax (the reference vendor's) sums to 1
# within ~1e-6; the slack is for vendors that round their scores (4 decimals over 20 labels: <= 1e-3), while a
# reply with doubled, halved or missing scores is far outside it.
PROBABILITY_SUM_TOLERANCE = 1e-3
PROBABILITY_RANGE_TOLERANCE = 1e-6  # a float32 softmax can land a hair outside [0, 1]
HF_DEFAULT_TEMPLATE = "This is a photo of {}."  # Hugging Face's hypothesis_template when none is sent
SOFTMAX, SIGMOID = "probabilities", "independent_probabilities"  # the two zero-shot score kinds
SCORE_KINDS = {"softmax": SOFTMAX, "sigmoid": SIGMOID}  # what a client is told -> the kind recorded
PROBABILITY_KINDS = frozenset(SCORE_KINDS.values())


def score_kind(scores: str) -> str:
    """The recorded kind for a client's ``scores`` argument (``"softmax"`` or ``"sigmoid"``); ValueError otherwise."""
    if scores not in SCORE_KINDS:
        raise ValueError(f"scores must be 'softmax' (they sum to 1 over the labels) or 'sigmoid' (independent "
                         f"per-label probabilities), got {scores!r}")
    return SCORE_KINDS[scores]


class ScoreKindError(VendorError):
    """A softmax-declared vendor's scores do not sum to 1: garbled, or the vendor returns sigmoid scores."""


@dataclass(frozen=True)
class ZeroShotRequest:
    """A zero-shot request as a vendor reads it: one base64 image, the candidate labels, the template."""

    image_b64: str
    labels: list[str]
    template: str


def zero_shot_request(image_b64: str, labels: Sequence[str], template: str) -> dict[str, Any]:
    """The JSON body of a Hugging Face zero-shot-image-classification request for one base64 image."""
    return {"inputs": image_b64, "parameters": {"candidate_labels": list(labels), "hypothesis_template": template}}


def read_zero_shot_request(body: Any) -> ZeroShotRequest:
    """A decoded request body as a :class:`ZeroShotRequest`; ``ValueError`` saying what is wrong otherwise."""
    params = body.get("parameters") if isinstance(body, dict) else None
    labels = params.get("candidate_labels") if isinstance(params, dict) else None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ValueError("parameters.candidate_labels must be a non-empty list of strings")
    if len(set(labels)) != len(labels):
        raise ValueError("candidate_labels must be distinct")
    template = params.get("hypothesis_template") or HF_DEFAULT_TEMPLATE
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError("parameters.hypothesis_template must contain exactly one '{}'")
    if not isinstance(body.get("inputs"), str):
        raise ValueError("inputs must be a base64 image string")
    return ZeroShotRequest(body["inputs"], labels, template)


def zero_shot_reply(labels: Sequence[str], scores: Any) -> list[dict[str, Any]]:
    """A zero-shot reply: ``[{"label", "score"}, ...]`` best first (ties in label order), as Hugging Face sends."""
    scores = np.asarray(scores)
    return [{"label": labels[i], "score": float(scores[i])} for i in np.argsort(-scores, kind="stable")]


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


def _shape_of(answer: Any) -> str:
    """What a reply is, in words that quote none of its text."""
    if not isinstance(answer, list):
        return f"a JSON {type(answer).__name__}"
    bad = next(i for i, e in enumerate(answer) if not (
        isinstance(e, dict) and isinstance(e.get("label"), str) and isinstance(e.get("score"), int | float)
        and not isinstance(e.get("score"), bool)))
    return f"a list whose item {bad} is not {{'label': str, 'score': number}}"


def zero_shot_scores(answer: Any, labels: Sequence[str], kind: str = SOFTMAX) -> np.ndarray:
    """Scores ``[c]`` in ``labels`` order from a decoded zero-shot reply; :class:`VendorError` unless usable.

    Usable: a list of ``{"label": str, "score": number}``, each label exactly once, finite probabilities in
    [0, 1]; for the softmax ``kind`` they must also sum to 1 (within :data:`PROBABILITY_SUM_TOLERANCE`), else a
    :class:`ScoreKindError`.
    """
    if kind not in PROBABILITY_KINDS:
        raise ValueError(f"unknown zero-shot score kind {kind!r}; expected one of {sorted(PROBABILITY_KINDS)}")
    if not isinstance(answer, list) or not all(
            isinstance(e, dict) and isinstance(e.get("label"), str) and isinstance(e.get("score"), int | float)
            and not isinstance(e.get("score"), bool) for e in answer):
        raise VendorError(f"the reply is not a zero-shot list [{{'label': str, 'score': number}}, ...] but "
                          f"{_shape_of(answer)}")
    scores = scores_by_label(((e["label"], e["score"]) for e in answer), labels)
    scores = check_answer(scores, (len(labels),), probabilities=True)
    total = float(scores.sum())
    if kind == SOFTMAX and abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise ScoreKindError(
            f"the reply's scores are not probabilities over the labels: they sum to {total:.4g}, not to 1 as softmax "
            "scores do. If the "
            "vendor returns independent (sigmoid, SigLIP-style) scores, declare it: scores='sigmoid' on the "
            "client (HttpZeroShotVendor/HfInferenceVendor), and refit so the adapter records that kind")
    return scores


def parse_zero_shot(body: bytes, labels: Sequence[str], kind: str = SOFTMAX) -> np.ndarray:
    """Scores ``[c]`` in ``labels`` order from a reply body (JSON bytes), as :func:`zero_shot_scores` reads."""
    return zero_shot_scores(reply_json(body), labels, kind)


def reply_json(body: bytes) -> Any:
    """A reply body decoded as JSON; a transient :class:`VendorError` (quoting none of it) if it is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # cut short, garbled, or nested absurdly deep
        raise VendorError(f"the reply is not complete JSON ({len(body)} bytes)") from None


class ScoreKindCheck:
    """The score-kind rule over a client's life: until a reply has matched the declared kind, a mismatch is the
    vendor's kind, not a garble, so it is refused at once (non-transient); after one has, it is a garbled reply
    and worth a retry. One per client; thread-safe."""

    def __init__(self, kind: str = SOFTMAX) -> None:
        if kind not in PROBABILITY_KINDS:
            raise ValueError(f"unknown zero-shot score kind {kind!r}; expected one of {sorted(PROBABILITY_KINDS)}")
        self.kind, self.confirmed = kind, False
        self._lock = threading.Lock()

    def scores(self, answer: Any, labels: Sequence[str]) -> np.ndarray:
        """:func:`zero_shot_scores` under the first-reply rule."""
        try:
            scores = zero_shot_scores(answer, labels, self.kind)
        except ScoreKindError as e:
            with self._lock:
                confirmed = self.confirmed
            if not confirmed:
                raise ScoreKindError(f"the vendor's first reply does not match the declared score kind: {e}",
                                     transient=False) from None
            raise
        with self._lock:
            self.confirmed = True
        return scores

    def parse(self, body: bytes, labels: Sequence[str]) -> np.ndarray:
        """:meth:`scores` of a reply body (JSON bytes)."""
        return self.scores(reply_json(body), labels)


def check_answer(arr: Any, shape: tuple[int | None, ...], *, probabilities: bool = False,
                 source: str = "the vendor") -> np.ndarray:
    """``arr`` as finite float32 of ``shape`` (``None``: any size), in [0, 1] if ``probabilities``; else VendorError."""
    try:
        a = np.asarray(arr, dtype=np.float32)
    except (TypeError, ValueError):  # ragged rows, strings, objects
        rows = f"{shape[0]} rows of {shape[1]} numbers" if len(shape) == 2 and None not in shape else f"shape {shape}"
        raise VendorError(f"{source} returned scores that are not a numeric array ({type(arr).__name__}); "
                          f"expected {rows}, one per class in the adapter's class order") from None
    if a.ndim != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape, strict=True)):
        wanted = str(tuple("any" if w is None else w for w in shape)).replace("'", "")
        raise VendorError(f"{source} returned scores of shape {a.shape}, expected {wanted}: one score per image "
                          "for each of the adapter's classes, in the adapter's class order")
    if not np.isfinite(a).all():
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(a))[:, 0]}) if a.ndim > 1 else []
        where = f" for image(s) {bad[:10]}" if bad else ""
        raise VendorError(f"{source} returned NaN or inf scores{where}; the refiner needs finite scores. Check the "
                          "images and the vendor's response before retrying")
    tol = PROBABILITY_RANGE_TOLERANCE
    if probabilities and ((a < -tol).any() or (a > 1 + tol).any()):
        raise VendorError(f"{source} returned probabilities outside [0, 1] (min {float(a.min()):.4g}, "
                          f"max {float(a.max()):.4g}); the reply's scores are not probabilities")
    return a


def check_scores(scores: Any, n: int, c: int, source: str = "the vendor") -> np.ndarray:
    """``scores`` as float32 ``[n, c]``, or a :class:`VendorError` naming what is wrong and the fix."""
    return check_answer(scores, (n, c), source=source)


def unit_rows(x: Any) -> np.ndarray:
    """``x`` as float32 with each row (last axis) scaled to unit L2 norm; an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))
