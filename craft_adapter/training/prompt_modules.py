"""The three prompt modules the fit loop drives: soft context (CMA-ES), text templates (word edits), and a fixed
prompt (the refiner-only ablation). Each proposes candidates, says what scoring them costs, scores them
through the black box, and learns from their fitness."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from craft_adapter.blackbox.box import BlackBox
from craft_adapter.training.config import FitConfig
from craft_adapter.training.soft_prompt import SoftPromptSearch
from craft_adapter.training.text_prompt import TextPromptSearch, to_template, to_words, word_vocabulary


@dataclass
class Scores:
    """A population's raw scores ``[p, m, c]``, made ``take(i, j)`` a few candidates at a time.

    In soft mode the population is paid for in one call (its class-text embeddings, ``[p, c, d]``) and the
    logits are made per chunk from those, so the fit never holds ``[p, m, c]`` whole (1.9 GB at 40 x 12,000 x
    1,000). Text and fixed prompts come from the vendor as scores; they are sliced.
    """

    shape: tuple[int, int, int]
    take: Callable[[int, int], np.ndarray]

    @classmethod
    def of(cls, raw: np.ndarray) -> Scores:
        """Scores already made ``[p, m, c]``."""
        return cls(raw.shape, lambda i, j: raw[i:j])


# issue 17 (time per generation): without a cap every generation scores all C x shots images against C classes for
# every candidate and trains the refiner on all of them, O(C^2) per generation while the vendor's share is O(C)
ROWS_SALT = 1717  # keeps the soft rows' random stream apart from the fit's other seeded streams


def balanced_rows(by_class: list[np.ndarray], cap: int, rng: np.random.Generator) -> list[int]:
    """At most ``cap`` sorted rows, class-balanced: each class ``cap // C`` or one more (a random subset of classes
    gets the one more; when ``cap < C``, a random subset of ``cap`` classes gets one row each). A class with fewer
    rows than its share gives all it has."""
    classes = [c for c, r in enumerate(by_class) if len(r)]
    share = np.full(len(classes), cap // len(classes))
    share[rng.choice(len(classes), size=cap % len(classes), replace=False)] += 1
    picks = [rng.choice(by_class[c], size=min(int(k), len(by_class[c])), replace=False)
             for c, k in zip(classes, share, strict=True)]
    return sorted(int(i) for i in np.concatenate(picks))


def half_precision(emb: np.ndarray) -> np.ndarray:
    """``emb`` rounded to float16 and back: what a float16 query cache gives back, used for fresh answers too."""
    return emb.astype(np.float16).astype(np.float32)


class SoftModule:
    """Context vectors ``p0 + A z``; one generation is ``popsize`` queries, scored on the few-shot set or, when it
    has more than ``fitness_rows`` images, on a class-balanced sample of that many (see :func:`balanced_rows`)."""

    max_generations: int | None = None

    def __init__(self, box: BlackBox, cfg: FitConfig, labels: np.ndarray) -> None:
        self.search = SoftPromptSearch(box.soft_prompt_init(cfg.init_prompt), cfg)
        self._z: np.ndarray | None = None
        self.half = cfg.cache_precision == "float16"
        self.seed, self.cap = cfg.seed, cfg.fitness_rows
        self.by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)] if len(labels) else []

    def propose(self) -> list[np.ndarray]:
        """A CMA-ES generation of contexts ``[n_ctx, width]``."""
        self._z = self.search.ask()
        return list(self.search.context(self._z))

    def rows(self, used: int, budget: int) -> list[int] | None:
        """Every image (``None``) up to ``fitness_rows`` of them; above, a class-balanced sample drawn from the seed
        and the queries used so far, so a resumed fit draws the same rows with no state kept for them."""
        if not self.cap or sum(len(r) for r in self.by_class) <= self.cap:
            return None
        return balanced_rows(self.by_class, self.cap, np.random.default_rng([self.seed % 2**64, used, ROWS_SALT]))

    def cost(self, box: BlackBox, cands: list, rows: Any) -> int:
        """One query per candidate, whatever the rows (the vendor embeds class texts; images are already paid)."""
        return len(cands)

    def score(self, box: BlackBox, cands: list, rows: Any) -> Scores:
        """Raw scores ``[p, m, c]`` on ``rows`` (``None``: every image), paid now in one call, made on demand a few
        candidates at a time from the rows' image embeddings only (never ``[p, n, c]``)."""
        emb = box.soft_embeddings(np.stack(cands))  # [p, c, d]
        if self.half:
            emb = half_precision(emb)
        m = box.n_images if rows is None else len(rows)
        return Scores((len(emb), m, emb.shape[1]), lambda i, j: box.cosine_logits(emb[i:j], rows))

    def refiner_data(self, box: BlackBox, cand: Any, rows: Any, raw: np.ndarray) -> tuple[Any, np.ndarray]:
        """What the refiner trains on: the candidate's scores on this generation's rows."""
        return rows, raw

    def tell(self, cands: list, fitness: np.ndarray) -> int:
        """Update CMA-ES; index of the best candidate."""
        self.search.tell(self._z, fitness)
        return int(np.argmin(fitness))


class FixedModule:
    """One prompt that never changes: it is paid for once per image set, then reused."""

    def __init__(self, box: BlackBox, cfg: FitConfig) -> None:
        self.prompt = box.soft_prompt_init(cfg.init_prompt) if cfg.prompt == "soft" else cfg.template
        self.max_generations = max(1, cfg.resolved_budget // cfg.popsize)  # as many refiner epochs as CraFT gets
        self._memo: dict[int, np.ndarray] = {}

    def propose(self) -> list:
        """The fixed prompt."""
        return [self.prompt]

    def rows(self, used: int, budget: int) -> None:
        """Every image."""
        return None

    def cost(self, box: BlackBox, cands: list, rows: Any) -> int:
        """Nothing once paid; before, what the box says."""
        if id(box) in self._memo:
            return 0
        return 1 if isinstance(self.prompt, np.ndarray) else box.text_cost([self.prompt])

    def score(self, box: BlackBox, cands: list, rows: Any) -> Scores:
        """Raw scores ``[1, n, c]``, paid the first time only."""
        if id(box) not in self._memo:
            p = self.prompt
            self._memo[id(box)] = box.logits_soft(p[None]) if isinstance(p, np.ndarray) else box.logits_text([p])
        return Scores.of(self._memo[id(box)])

    def refiner_data(self, box: BlackBox, cand: Any, rows: Any, raw: np.ndarray) -> tuple[Any, np.ndarray]:
        """The fixed prompt's scores on every image."""
        return rows, raw

    def tell(self, cands: list, fitness: np.ndarray) -> int:
        """Nothing to learn."""
        return 0


class TextModule:
    """Templates evolved by word edits, scored on class-balanced minibatches that grow with the budget spent."""

    max_generations: int | None = None

    def __init__(self, box: BlackBox, cfg: FitConfig, labels: np.ndarray) -> None:
        self.search = TextPromptSearch(cfg.template, word_vocabulary(cfg.vocab_size), cfg.text_children,
                                       cfg.text_elites, cfg.seed)
        self.cfg, self.labels = cfg, labels
        self.rng = np.random.default_rng(cfg.seed + 104729)
        self.by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
        self.all_rows = box.capabilities.style == "embedding"  # a text call there costs the same for any rows

    def propose(self) -> list[str]:
        """The elites and new children."""
        return self.search.propose()

    def rows(self, used: int, budget: int) -> list[int] | None:
        """``m`` images per class, ``m`` growing linearly from ``minibatch_start`` to ``minibatch_end``."""
        if self.all_rows:
            return None
        cfg = self.cfg
        m = round(cfg.minibatch_start + (cfg.minibatch_end - cfg.minibatch_start) * used / budget)
        picks = [self.rng.choice(rows, size=min(m, len(rows)), replace=False) for rows in self.by_class]
        return sorted(int(i) for i in np.concatenate(picks))

    def cost(self, box: BlackBox, cands: list, rows: Any) -> int:
        """Only the (image, template) pairs not paid before."""
        return box.text_cost(cands, rows)

    def score(self, box: BlackBox, cands: list, rows: Any) -> Scores:
        """Raw scores ``[p, m, c]``."""
        return Scores.of(box.logits_text(cands, rows))

    def refiner_data(self, box: BlackBox, cand: str, rows: Any, raw: np.ndarray) -> tuple[Any, np.ndarray]:
        """Every image the template has been paid for so far (more than this generation's minibatch); free."""
        if self.all_rows:
            return rows, raw
        paid = box.paid_rows(cand)
        return paid, box.logits_text([cand], paid)[0]

    def tell(self, cands: list, fitness: np.ndarray) -> int:
        """Select the elites; index of the best candidate."""
        return self.search.tell(cands, fitness)

    def state(self) -> dict[str, Any]:
        """What decides the search from here, as JSON: the elites and both random generators' states (ints)."""
        return {"elites": list(self.search.elites), "search_rng": self.search.rng.bit_generator.state,
                "rows_rng": self.rng.bit_generator.state}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`; ValueError when it is not one this search could have reached."""
        elites = state["elites"]
        if not (isinstance(elites, list) and 1 <= len(elites) <= self.cfg.text_elites
                and all(isinstance(e, str) and to_template(to_words(e)) == e for e in elites)):
            raise ValueError("the elites are not templates of this search")
        try:
            self.search.rng.bit_generator.state = state["search_rng"]
            self.rng.bit_generator.state = state["rows_rng"]
        except (TypeError, KeyError, OverflowError) as e:
            raise ValueError(f"a random generator's state is malformed ({e})") from None
        self.search.elites = list(elites)


def make_prompt_module(box: BlackBox, cfg: FitConfig, labels: np.ndarray) -> SoftModule | FixedModule | TextModule:
    """The module for ``cfg.prompt`` and ``cfg.train_prompt``."""
    if not cfg.train_prompt:
        return FixedModule(box, cfg)
    if cfg.prompt == "soft":
        return SoftModule(box, cfg, labels)
    return TextModule(box, cfg, labels)
