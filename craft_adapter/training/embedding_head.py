"""The embedding-access head: a linear head on the image embedding, for vendors that return embeddings (issue 15,
part 4).

When the vendor returns embeddings, the adapter may also read the image embedding ``e`` (L2-normalised, ``[n, d]``):

    refined = refiner(x) + s * e @ delta.T        # [n, c]

where ``x = s * cos(e, W)`` is the refiner input the fit already uses (``W [c, d]`` the learned prompt's class-text
embeddings), ``s`` the adapter's logit scale, and ``delta [c, d]`` starts at zero. So the head is a linear classifier
on ``e`` initialised at the learned prompt's zero-shot text classifier ``W`` (as LFA and CLAP start). It trains
*after* the CraFT loop, which is left untouched: the loop chooses the prompt (and a refiner), then the head is fitted
on every few-shot image, the held-out shots too. It costs no vendor query: the image embeddings, and the learned
prompt's class-text embeddings, were paid for during the fit; :class:`TappedBox` keeps the latter as the fit
receives them.

The objective is ``CE(refined, y) + lam * mean_c ||s * delta_c||^2`` (the head's weights in logit units, pulled toward
the zero-shot init as CLAP does; the mean over classes keeps each class's pull in proportion to its share of the
shots whatever the class count), full-batch, with a fixed number of L-BFGS steps: convex, so deterministic and
validation-free. ``HEAD_L2``, ``HEAD_STEPS`` and ``HEAD_KEEPS_REFINER`` were chosen once, on the mean over the
tuning tasks (``benchmarks/embedding_head.py``), never per task.

Measured there (reference, fashion-night, fashion-sketch; 3 seeds each), the loop's refiner residual is *not* kept
under the head by default: the head on the prompt's zero-shot logits (``refiner`` the identity) was at least as good
as the head on ``refiner(x)`` on every tuning task, 60.29% against 59.79% on their mean (and +1.3 points before the
loop's refiner drift was worked on). The refiner was trained on the non-held-out shots, so its logits on those are
already confident and give the head little to learn from; where the refiner drifts it hands its error on too. The
adapter then carries an identity refiner (its weights zero), so the file format, the ONNX graph and the runtime are
the same either way. ``HEAD_L2`` 1e-3 was best on the tasks' mean (60.30%; 3e-3: 60.29%, 3e-4: 59.59%).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from craft_adapter.artifact.adapter_file import Adapter, refiner_input
from craft_adapter.blackbox.box import BlackBox
from craft_adapter.blackbox.query_cache import array_key
from craft_adapter.training.refiner import Refiner
from craft_adapter.vendors.replies import unit_rows

HEAD_L2 = 1e-3  # lam: weight of the mean over classes of ||s * delta_c||^2
HEAD_STEPS = 100  # L-BFGS iterations (the optimum is unique; accuracy is unchanged from 50 to 300 on the tasks)
HEAD_KEEPS_REFINER = False  # head on refiner(x) (True) or on the zero-shot logits x, the refiner dropped (False)


class HeadUnavailable(ValueError):
    """The embedding head cannot be trained for this fit (its final prompt's embeddings unknown and unaffordable)."""


def prompt_key(prompt: np.ndarray | str) -> str:
    """The key under which a prompt's class-text embeddings are kept: the template, or a context's hash."""
    return prompt if isinstance(prompt, str) else array_key(prompt)


class TappedBox(BlackBox):
    """A :class:`BlackBox` that keeps the class-text embeddings ``[c, d]`` it hands out, by prompt.

    Kept: every single-prompt request (the hold-out checks, a fixed prompt, the temperature's template) and the
    latest population (the final prompt when there is no hold-out). The final prompt of a fit is one of those, so its
    embeddings are read back here instead of bought again. Only an embedding-head fit uses this box; others keep
    the plain :class:`BlackBox` and its memory.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.kept: dict[str, np.ndarray] = {}  # prompt key -> [c, d], single-prompt requests
        self.latest: dict[str, np.ndarray] = {}  # prompt key -> [c, d], the latest population only

    def _keep(self, prompts: Sequence[np.ndarray | str], emb: np.ndarray) -> None:
        rows = {prompt_key(p): emb[i] for i, p in enumerate(prompts)}
        if len(rows) == 1:
            self.kept.update(rows)
        else:
            self.latest = rows

    def soft_embeddings(self, ctx: np.ndarray, kind: str = "soft") -> np.ndarray:
        """As :meth:`BlackBox.soft_embeddings`, keeping the answer."""
        emb = super().soft_embeddings(ctx, kind)
        self._keep(list(ctx), emb)
        return emb

    # The one private method wrapped: BlackBox makes every text prompt's embeddings here (tests/training/
    # test_embedding_head.py checks that a text fit's final template is found).
    def _text_embeddings(self, templates: Sequence[str]) -> np.ndarray:
        emb = super()._text_embeddings(templates)
        self._keep(list(templates), emb)
        return emb

    def fetch_class_embeddings(self, prompt: np.ndarray | str) -> np.ndarray:
        """The class-text embeddings ``[c, d]`` of ``prompt``, asked of the vendor and charged as one candidate."""
        return (self.soft_embeddings(prompt[None]) if isinstance(prompt, np.ndarray) else
                self._text_embeddings([prompt]))[0]

    def class_embeddings(self, prompt: np.ndarray | str) -> np.ndarray | None:
        """The class-text embeddings ``[c, d]`` this box was answered for ``prompt``, or None if it kept none."""
        key = prompt_key(prompt)
        return self.kept.get(key, self.latest.get(key))


@dataclass
class HeadData:
    """What the head trains on: refiner inputs ``x [n, c]``, unit image embeddings ``e [n, d]``, labels ``[n]``."""

    x: np.ndarray
    e: np.ndarray
    y: np.ndarray


def head_data(adapter: Adapter, boxes: Sequence[tuple[TappedBox, np.ndarray]]) -> HeadData:
    """Every few-shot image of ``boxes`` (box, labels) under the adapter's final prompt, with no vendor call."""
    prompt = adapter.ctx if adapter.mode == "soft" else adapter.template
    if prompt is None:
        raise HeadUnavailable("a soft-mode adapter without its context vectors")
    w = next((b.class_embeddings(prompt) for b, _ in boxes if b.class_embeddings(prompt) is not None), None)
    if w is None:  # not seen in this process (a resumed fit checked it before the restart): paid, as a check is
        box, left = boxes[0][0], boxes[0][0].meter.remaining
        if left is not None and (1 if isinstance(prompt, np.ndarray) else box.text_cost([prompt])) > left:
            raise HeadUnavailable("the embedding head needs the final prompt's class-text embeddings, which this "
                                  "resumed fit saw only before its restart, and no query of the budget is left to "
                                  "ask again; fit again with a budget one higher (the query cache replays every "
                                  "answer already paid for)")
        w = box.fetch_class_embeddings(prompt)
    xs, es, ys = [], [], []
    for box, labels in boxes:
        xs.append(refiner_input(box.cosine_logits(w[None])[0], adapter.logit_kind))  # [n, c], no vendor call
        es.append(unit_rows(box.image_embeddings()))  # [n, d], as the runtime normalises them
        ys.append(np.asarray(labels, dtype=np.int64))
    return HeadData(np.concatenate(xs), np.concatenate(es), np.concatenate(ys))


def _base(refiner: Refiner | None, x: np.ndarray) -> torch.Tensor:
    """The frozen logits under the head ``[n, c]``: ``refiner(x)``, or ``x`` itself without a refiner."""
    with torch.no_grad():
        return torch.from_numpy(x) if refiner is None else refiner(torch.from_numpy(x))


def train_head(refiner: Refiner | None, data: HeadData, scale: float, lam: float = HEAD_L2, steps: int = HEAD_STEPS,
               seed: int = 0) -> np.ndarray:
    """``delta [c, d]`` (float32) minimising ``CE(base + s e delta^T, y) + lam mean_c ||s delta_c||^2`` from zero,
    ``base`` being ``refiner(x)`` (``x`` with no refiner), frozen."""
    torch.manual_seed(seed)  # nothing here draws at random; kept so a future change that does stays seeded
    base = _base(refiner, data.x)  # [n, c]
    e, y = torch.from_numpy(data.e), torch.from_numpy(data.y)
    v = torch.zeros(base.shape[1], e.shape[1], requires_grad=True)  # s * delta: the head in logit units
    opt = torch.optim.LBFGS([v], lr=1.0, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(base + e @ v.T, y) + lam * (v * v).sum() / len(v)
        loss.backward()
        return loss

    opt.step(closure)
    return (v.detach() / scale).numpy().astype(np.float32)


def head_loss(refiner: Refiner | None, data: HeadData, scale: float, delta: np.ndarray) -> float:
    """The training cross-entropy of ``base + s e delta^T`` (no penalty), for tests and reports."""
    with torch.no_grad():
        logits = _base(refiner, data.x) + scale * torch.from_numpy(data.e) @ torch.from_numpy(delta).T
        return float(F.cross_entropy(logits, torch.from_numpy(data.y)))


def identity_refiner(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Refiner arrays of the same shapes that compute the identity, ``x + 0`` exactly (every weight zero)."""
    return {k: np.zeros_like(v) for k, v in arrays.items()}


def add_embedding_head(adapter: Adapter, boxes: Sequence[tuple[TappedBox, np.ndarray]], seed: int,
                       lam: float = HEAD_L2, steps: int = HEAD_STEPS, keep_refiner: bool = HEAD_KEEPS_REFINER) -> None:
    """Train the head on every few-shot image of ``boxes`` (box, labels) and put it in ``adapter`` (its ``head`` and
    ``fit["embedding_head"]``). The prompt stays as the CraFT loop chose it; its refiner stays under the head with
    ``keep_refiner``, else it becomes the identity (see the module docstring for why that is the default)."""
    data = head_data(adapter, boxes)
    refiner = Refiner.from_arrays(adapter.refiner) if keep_refiner else None
    delta = train_head(refiner, data, adapter.logit_scale, lam, steps, seed)
    zero = np.zeros_like(delta)
    adapter.head = delta
    if not keep_refiner:
        adapter.refiner = identity_refiner(adapter.refiner)
    adapter.fit["embedding_head"] = {
        "l2": lam, "steps": steps, "images": len(data.y), "dim": int(delta.shape[1]),
        "base": "refiner(x)" if keep_refiner else "x (the loop's refiner is replaced by the identity)",
        "train_ce_before": round(head_loss(refiner, data, adapter.logit_scale, zero), 5),
        "train_ce_after": round(head_loss(refiner, data, adapter.logit_scale, delta), 5)}
    adapter.validate()
