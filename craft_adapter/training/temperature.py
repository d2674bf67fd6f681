"""The cosine-logit temperature for a vendor that publishes none, chosen from the few-shot data as one scalar.

An embedding API returns unit embeddings, not CLIP's ``logit_scale``, yet the refiner and the fitness both read
logits ``scale * cos``. The scale is chosen, never guessed: the one that minimises the cross-entropy of the
zero-shot cosine logits on the few-shot training images (already paid for: the image embeddings are cached and the
hand-written template is scored at the start of every fit). ``CE(s) = mean(logsumexp(s * cos) - s * cos_y)`` is
convex in ``s`` (a log-sum-exp of functions linear in ``s``, minus a linear one), so a log-spaced grid brackets its
minimum and a golden-section search narrows it. Data a larger scale always fits better (every image already right
with a margin) gets :data:`MAX_SCALE`, CLIP's own clamp on ``logit_scale``.
"""

from __future__ import annotations

import math

import numpy as np

MIN_SCALE = 1.0
MAX_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100 during training
GRID_POINTS = 64
TOLERANCE = 1e-4  # relative width of the final bracket


def cross_entropy(scale: float, cos: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of logits ``scale * cos [n, c]`` against ``labels [n]``, in float64."""
    z = scale * np.asarray(cos, dtype=np.float64)
    top = z.max(axis=1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(z)), labels]))


def choose_logit_scale(cos: np.ndarray, labels: np.ndarray, low: float = MIN_SCALE, high: float = MAX_SCALE) -> float:
    """The scale in ``[low, high]`` minimising :func:`cross_entropy` of ``cos [n, c]`` (cosine similarities)."""
    cos, labels = np.asarray(cos), np.asarray(labels)
    if cos.ndim != 2 or cos.shape[1] < 2 or len(cos) != len(labels) or not len(cos):
        raise ValueError(f"need cosines [n, c >= 2] and n labels, got {cos.shape} and {labels.shape}")
    if not np.isfinite(cos).all() or labels.min() < 0 or labels.max() >= cos.shape[1]:
        raise ValueError("cosines must be finite and every label a class index")
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got {low}, {high}")
    grid = np.geomspace(low, high, GRID_POINTS)
    losses = [cross_entropy(s, cos, labels) for s in grid]
    k = int(np.argmin(losses))  # the first minimum: the grid is deterministic, so is the answer
    if k in (0, GRID_POINTS - 1):
        return float(grid[k])  # convex: the minimum is at (or beyond) the edge
    a, b = math.log(grid[k - 1]), math.log(grid[k + 1])  # golden section in log-scale, inside the bracket
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = cross_entropy(math.exp(c), cos, labels), cross_entropy(math.exp(d), cos, labels)
    while b - a > TOLERANCE:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = cross_entropy(math.exp(c), cos, labels)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = cross_entropy(math.exp(d), cos, labels)
    return float(math.exp((a + b) / 2))
