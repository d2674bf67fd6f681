"""Resume checkpoints for text-mode fits against a scoring vendor: continue from the last one, not replay the fit.

The same file (``<output>.ckpt.safetensors``), write rules and checks as soft mode (:mod:`.checkpoint`). Beside the
state both modes share (refiner, Adam, torch RNGs, meter counts, history, hold-out best, ``checked``) it holds the
text search (the elites, and the states of its two numpy generators, JSON integers of any size, which strict JSON
parsing keeps exact) and which (image row, template) pairs each box (training, hold-out) had paid for, as
``U32 [k, 2]`` (row, index into a template list): not their scores, which at ``C`` floats a pair would be 120 MB at
1,000 classes and are in the query cache already (every answer is stored there before it is used). A restore reads
them back from there: no vendor call, nothing charged (the meter is set from the checkpoint).

If any paid pair is missing from the query cache (pruned, or another cache), the checkpoint is not used and the
fit replays from the cache instead: that is what deleting it would give, so refusing would only add a step for
the user, and replay pays again only for what the cache lost. Nothing is changed before that check. For the same
reason a text fit does not move the cache's eviction floor when it writes (a soft fit does): a resume reads back
every answer the fit paid for, not only those after the checkpoint. A text fit without a query cache writes no
checkpoint (:func:`craft_adapter.training.job.prepare`): nothing could restore it. Text fits through an embedding
vendor still resume by replay (their in-memory answers are keyed by text digests, not kept here).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from craft_adapter.training.checkpoint import (
    CheckpointError,
    Checkpoints,
    load_state,
    state_arrays,
    state_meta,
    state_meta_ok,
    state_tensors,
)
from craft_adapter.training.prompt_modules import TextModule

MAX_GENERATIONS = 10**9  # a text generation may cost nothing (all its pairs paid before): no tighter bound


class TextCheckpoints(Checkpoints):
    """Snapshots of a text-mode fit; :meth:`restore` (called before the first generation) binds its boxes."""

    boxes: tuple = ()

    def takes(self, module: Any) -> bool:
        """Text templates scored per (image, template) pair by a scoring vendor."""
        return isinstance(module, TextModule) and not module.all_rows

    def generation_done(self, gen: int, fitness: np.ndarray, meter, refiner, opt, shuffle: torch.Generator,
                        cur: str, best, history: list[dict], checked: bool, module: TextModule) -> None:
        """Snapshot the state after generation ``gen`` (copies: the next generation mutates the refiner)."""
        templates: dict[str, int] = {}
        arrays = state_arrays(refiner, opt, shuffle, None if best is None else best[2])
        for name, box in zip(("train", "holdout"), self.boxes, strict=True):
            pairs = [] if box is None else list(box.pair_scorer().cache)
            arrays[f"pairs.{name}"] = np.array([(i, templates.setdefault(t, len(templates))) for i, t in pairs],
                                               np.uint32).reshape(-1, 2)
        text = {**module.state(), "templates": list(templates), "cur": cur, "best": None if best is None else best[1]}
        self.snapshot(arrays, state_meta(self.identity, gen, meter, best, history, checked) | {"text": text})

    def restore(self, module: TextModule, refiner: torch.nn.Module, opt: torch.optim.Optimizer,
                shuffle: torch.Generator, meter, boxes: tuple) -> tuple[int, str, Any, list[dict], bool] | None:
        """(generation, current template, best, history, checked) of the checkpoint, the fit brought to it; or
        None when there is none of this fit, or a paid pair's answer is no longer in the query cache (replay)."""
        self.boxes = boxes
        expect, best_refiner = state_tensors(refiner)
        cap = (meter.budget or MAX_GENERATIONS) * (1 if meter.unit == "vendor_calls" else boxes[0].n_images)
        expect |= {"pairs.train": ("U32", (0, 2)), "pairs.holdout": ("U32", (0, 2))}
        loaded = self.load(expect, {"pairs.train": (0, cap), "pairs.holdout": (0, cap)}, best_refiner,
                           lambda meta: state_meta_ok(meta, MAX_GENERATIONS) and _text_ok(meta))
        if loaded is None:
            return None
        arrays, meta = loaded
        text = meta["text"]
        found = [_paid(box, arrays[f"pairs.{name}"], text["templates"], self.path)
                 for name, box in zip(("train", "holdout"), boxes, strict=True)]
        if any(f is None for f in found):
            return None  # an answer paid before the checkpoint is gone: replay from the cache (module docstring)
        best_state = load_state(arrays, meta, refiner, opt, shuffle, meter)
        if (best_state is None) != (text["best"] is None):
            raise CheckpointError(f"{self.path}: the best template and refiner do not go together")
        try:
            module.set_state(text)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        for box, answers in zip(boxes, found, strict=True):
            if box is not None:
                box.pair_scorer().cache.update(answers)
        best = None if best_state is None else (meta["best_acc"], text["best"], best_state)
        return meta["generation"], text["cur"], best, meta["history"], meta["checked"]


def _paid(box, pairs: np.ndarray, templates: list[str], src: Any) -> dict | None:
    """The query cache's answers of ``pairs`` (rows of ``box``), or None when one is missing."""
    if box is None:
        if len(pairs):
            raise CheckpointError(f"{src}: hold-out answers for a fit without a hold-out set")
        return {}
    if len(pairs) and (int(pairs[:, 0].max()) >= box.n_images or int(pairs[:, 1].max()) >= len(templates)):
        raise CheckpointError(f"{src}: a paid pair names an image row or template this fit does not have")
    return box.pair_scorer().stored([(int(i), templates[j]) for i, j in pairs])


def _rng_ok(state: Any) -> bool:
    inner = state.get("state") if isinstance(state, dict) else None
    return (isinstance(inner, dict) and state.get("bit_generator") == "PCG64" and set(state) == {
        "bit_generator", "state", "has_uint32", "uinteger"} and set(inner) == {"state", "inc"}
        and all(type(v) is int and 0 <= v < 2**128 for v in (*inner.values(), state["has_uint32"],
                                                              state["uinteger"])))


def _text_ok(meta: dict[str, Any]) -> bool:
    text = meta.get("text")
    return (isinstance(text, dict) and isinstance(text.get("templates"), list)
            and all(isinstance(t, str) for t in text["templates"]) and isinstance(text.get("cur"), str)
            and (text.get("best") is None or isinstance(text["best"], str))
            and (text.get("best") is None) == (meta.get("best_acc") is None)
            and _rng_ok(text.get("search_rng")) and _rng_ok(text.get("rows_rng")))
