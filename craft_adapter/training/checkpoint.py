"""Resume checkpoints: a fit continues from its last one instead of replaying the whole fit (soft mode here; text
mode, with the same file, rules and checks, in :mod:`.text_checkpoint`).

Beside the adapter ``<output>`` a fit writes ``<output>.ckpt.safetensors`` every ``checkpoint_every`` generations,
after any generation that ends ``checkpoint_seconds`` or more after the last write (many-class fits have slow
generations), and when it is stopped (Ctrl-C, a vendor stop, any error): safetensors arrays plus one JSON string in
the header, written to a temporary file and renamed, so a kill leaves the previous checkpoint or the new one, never
half of one. No pickle. It holds the state after a completed generation: the refiner and Adam's moments, the torch
RNG states, the current and best (hold-out) prompt and refiner, the meter's counts, the fit history, and the
fitness values told to CMA-ES each generation.

CMA-ES: the ``cma`` package saves an ``es`` only by pickling it, and its state is a deep object graph (sampler,
step-size adaptation, boundary handler) driven by numpy's global RNG. So the checkpoint keeps what decides that
state, the fitness told each generation (``popsize`` float32 per generation), and a restore runs ``ask``/``tell``
again with those values: no vendor call, no refiner, milliseconds per generation (the numpy engine is restored the
same way, one rule for both). The mean, step size, iteration count and RNG state it reaches (numpy's global one for
``cma``, the engine's own generator for ``numpy``: ``SoftPromptSearch.state``) are checked bit for bit against the
saved ones, so a different ``cma`` or numpy that would continue differently is refused instead of silently giving
another adapter.

A checkpoint is read like any untrusted file: size capped, strict JSON, every tensor's dtype and shape checked
against what this fit expects before it is loaded, values finite. A checkpoint of another fit (other settings,
backend, images or answer precision) is ignored; the cache replays the fit instead.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from craft_adapter.artifact.checks import AdapterError, parse_json
from craft_adapter.training.prompt_modules import SoftModule
from craft_adapter.training.resume import ResumeError

VERSION = 1
META_KEY = "craft_adapter_checkpoint"
DTYPES = {"F32": np.float32, "F64": np.float64, "U8": np.uint8, "U32": np.uint32}
METER = ("queries", "vendor_calls", "images_sent")  # the meter counts a checkpoint sets back


class CheckpointError(ResumeError):
    """A checkpoint exists but cannot be trusted (damaged, hostile, or from an incompatible cma or numpy)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem + "; delete it to resume by replaying from the query cache")


def checkpoint_path(output: Path) -> Path:
    """Where the fit writing ``output`` keeps its checkpoint."""
    return output.with_name(output.name + ".ckpt.safetensors")


class Checkpoints:
    """Snapshots of a fit after each generation; one written every ``every`` generations and on a stop.

    ``identity`` ties a checkpoint to its fit; ``on_saved(t)`` is told the time of each write (the query cache
    then knows that answers older than ``t`` are no longer needed to resume this fit).
    """

    def __init__(self, path: Path, identity: dict[str, Any], every: int, resume: bool,
                 on_saved: Callable[[float], None] | None = None, seconds: float = 0.0) -> None:
        self.path, self.identity, self.every, self.resume, self.on_saved = path, identity, every, resume, on_saved
        self.seconds, self._since = seconds, time.monotonic()  # a write is also due ``seconds`` after the last
        self.told: list[np.ndarray] = []
        self._last: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None
        self._written = -1
        if not resume:
            path.unlink(missing_ok=True)  # a stale checkpoint of an earlier fit to this output

    def takes(self, module: Any) -> bool:
        """Whether this fit's prompt module is one these checkpoints resume (soft context by CMA-ES)."""
        return isinstance(module, SoftModule)

    def restore(self, module: SoftModule, refiner: torch.nn.Module, opt: torch.optim.Optimizer,
                shuffle: torch.Generator, meter, boxes: tuple) -> tuple[int, Any, Any, list[dict], bool] | None:
        """(generation, current prompt, best, history, checked) of the checkpoint, the fit brought to it; or None
        when there is none of this fit. ``boxes`` are (train, holdout or None)."""
        search = module.search
        expect, best_refiner = state_tensors(refiner)
        es_arrays, es_meta = search.state()  # the fresh search's: the names, types and shapes to expect
        expect |= {"told": ("F32", (0, search.es.popsize)), "cur": ("F32", tuple(search.p0.shape))}
        expect |= {k: ({np.float64: "F64", np.uint32: "U32"}[v.dtype.type], v.shape) for k, v in es_arrays.items()}
        max_gen = meter.budget // search.es.popsize + 1 if meter.budget is not None else 10**6
        loaded = self.load(expect, {"told": (1, max_gen)}, best_refiner | {"best.ctx": expect["cur"]},
                           lambda meta: state_meta_ok(meta, max_gen) and isinstance(meta.get("es"), dict)
                           and all(type(meta["es"].get(k)) is type(v) for k, v in es_meta.items()))
        if loaded is None:
            return None
        arrays, meta = loaded
        for fitness in arrays["told"]:  # CMA-ES again, with the fitness it was told: no vendor call, no refiner
            search.tell(search.ask(), fitness)
        es_arrays, es_meta = search.state()
        if not (all(np.array_equal(v, arrays[k]) for k, v in es_arrays.items()) and es_meta == meta["es"]):
            raise CheckpointError(f"{self.path}: CMA-ES does not come back to the saved state (another cma or numpy "
                                  "version?)")
        self.told = list(arrays["told"])
        train, holdout = boxes
        train.prepare_images()  # the images were paid for before the checkpoint: the meter is set to its counts next
        if holdout is not None and "best.ctx" in arrays:
            holdout.prepare_images()
        best_state = load_state(arrays, meta, refiner, opt, shuffle, meter)
        best = None if best_state is None else (meta["best_acc"], arrays["best.ctx"], best_state)
        return meta["generation"], arrays["cur"], best, meta["history"], meta["checked"]

    def generation_done(self, gen: int, fitness: np.ndarray, meter, refiner, opt, shuffle: torch.Generator,
                        cur: np.ndarray, best, history: list[dict], checked: bool, module: SoftModule) -> None:
        """Snapshot a soft fit's state after generation ``gen`` (copies: the next generation mutates the refiner)."""
        self.told.append(np.asarray(fitness, np.float32).copy())
        arrays = state_arrays(refiner, opt, shuffle, None if best is None else best[2])
        es_arrays, es_meta = module.search.state()
        arrays |= {"told": np.stack(self.told), "cur": np.asarray(cur, np.float32).copy()} | es_arrays
        if best is not None:
            arrays["best.ctx"] = np.asarray(best[1], np.float32).copy()
        self.snapshot(arrays, state_meta(self.identity, gen, meter, best, history, checked) | {"es": es_meta})

    def snapshot(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Keep the state after a generation as the last one; write it when a write is due."""
        self._last = (arrays, meta)
        gen = meta["generation"]
        if (self.every and gen % self.every == 0) or (self.seconds and time.monotonic() - self._since >= self.seconds):
            self.save_last()

    def save_last(self) -> None:
        """Write the last snapshot (if not written yet) atomically."""
        if self._last is None or self._last[1]["generation"] == self._written:
            return
        arrays, meta = self._last
        meta = {**meta, "time": time.time()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(st_save(arrays, metadata={META_KEY: json.dumps(meta, allow_nan=False, sort_keys=True)}))
        os.replace(tmp, self.path)
        self._written, self._since = meta["generation"], time.monotonic()
        if self.on_saved is not None:
            self.on_saved(meta["time"])

    def load(self, expect: dict[str, tuple[str, tuple[int, ...]]], rows: dict[str, tuple[int, int]],
             optional: dict[str, tuple[str, tuple[int, ...]]], meta_ok: Callable[[dict], bool]
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The checkpoint's arrays and metadata, checked; ``None`` when there is none, or it is another fit's.

        ``expect`` maps every tensor name to its dtype and shape; those in ``rows`` have from ``lo`` to ``hi`` rows
        (the rest of the shape fixed); ``optional`` tensors are all there or none. Raises :class:`CheckpointError`
        for a file that fails a check, or whose metadata ``meta_ok`` rejects.
        """
        if not self.resume or not self.path.is_file():
            return None
        src = str(self.path)
        size = {k: np.dtype(DTYPES[d]).itemsize * int(np.prod(s[1:] if k in rows else s)) for k, (d, s) in
                expect.items()}
        limit = 2 * sum(v for k, v in size.items() if k not in rows) + sum(size[k] * hi for k, (_, hi) in
                                                                           rows.items()) + (8 << 20)
        if self.path.stat().st_size > limit:
            raise CheckpointError(f"{src} is over the {limit}-byte size a checkpoint of this fit can have")
        raw = self.path.read_bytes()[:limit + 1]
        try:
            (n,) = struct.unpack("<Q", raw[:8])
            header = parse_json(raw[8:8 + n], "checkpoint header", src, 16 << 20)
            meta = parse_json(header["__metadata__"][META_KEY], "checkpoint metadata", src, 16 << 20)
        except (AdapterError, struct.error, KeyError, TypeError) as e:
            raise CheckpointError(f"{src} is not a readable checkpoint ({str(e)[:200]})") from None
        if not isinstance(meta, dict) or meta.get("version") != VERSION or meta.get("identity") != self.identity:
            return None  # another fit's, or another format: replay from the cache instead
        _check_table(header, expect, rows, optional, src)
        try:
            arrays = st_load(raw)
        except Exception as e:  # safetensors' own errors have no common base
            raise CheckpointError(f"{src} does not load ({str(e)[:200]})") from None
        bad = [k for k, v in arrays.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
        if bad or not meta_ok(meta):
            raise CheckpointError(f"{src} holds non-finite values {bad[:4]} or malformed metadata")
        self._written = meta["generation"]  # the state it holds is on disk already
        return arrays, meta


def _check_table(header: dict, expect: dict[str, tuple[str, tuple[int, ...]]], rows: dict[str, tuple[int, int]],
                 optional: dict[str, tuple[str, tuple[int, ...]]], src: str) -> None:
    """Every tensor named, typed and shaped as this fit expects, before any is allocated."""
    header = {k: v for k, v in header.items() if k != "__metadata__"}
    given = set(header) & set(optional)
    missing = sorted(set(expect) - set(header))
    unknown = sorted(set(header) - set(expect) - set(optional))
    if missing or unknown or (given and given != set(optional)):
        raise CheckpointError(f"{src}: tensors {missing[:4]} missing or {unknown[:4]} unexpected")
    for name, spec in header.items():
        want = expect.get(name) or optional[name]
        ok = isinstance(spec, dict) and spec.get("dtype") == want[0] and isinstance(spec.get("shape"), list)
        shape = tuple(spec["shape"]) if ok else ()
        if name in rows:
            ok = ok and len(shape) == len(want[1]) and rows[name][0] <= shape[0] <= rows[name][1] \
                and shape[1:] == want[1][1:]
        elif ok:
            ok = shape == want[1]
        if not ok:
            raise CheckpointError(f"{src}: tensor {name} is {str(spec)[:80]}, expected {want[0]} {want[1]}")


def state_meta(identity: dict, gen: int, meter, best, history: list[dict], checked: bool) -> dict[str, Any]:
    """The metadata every checkpoint holds: the fit, generation, hold-out state, history and meter counts."""
    return {"version": VERSION, "identity": identity, "generation": gen, "checked": checked,
            "best_acc": None if best is None else best[0], "history": list(history),
            "meter": {k: getattr(meter, k) for k in METER}}


def state_meta_ok(meta: dict[str, Any], max_gen: int) -> bool:
    """Whether :func:`state_meta`'s part of ``meta`` is well-formed."""
    m, gen = meta.get("meter"), meta.get("generation")
    return (isinstance(gen, int) and 1 <= gen <= max_gen and isinstance(meta.get("checked"), bool)
            and isinstance(meta.get("history"), list) and len(meta["history"]) == gen
            and isinstance(m, dict) and all(isinstance(m.get(k), int) and m[k] >= 0 for k in METER)
            and (meta.get("best_acc") is None or isinstance(meta["best_acc"], float)))


def state_arrays(refiner: torch.nn.Module, opt: torch.optim.Optimizer, shuffle: torch.Generator,
                 best_state: dict | None) -> dict[str, np.ndarray]:
    """Copies of the refiner, Adam's moments, both torch RNG states and the best refiner (if any)."""
    arrays = {f"refiner.{k}": v.detach().numpy().copy() for k, v in refiner.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        arrays |= {f"adam.{i}.{k}": np.asarray(v.detach().numpy(), np.float32).reshape(-1 if k == "step" else
                                                                                  v.shape).copy()
                   for k, v in st.items()}
    arrays |= {"shuffle_rng": shuffle.get_state().numpy().copy(), "torch_rng": torch.get_rng_state().numpy().copy()}
    if best_state is not None:
        arrays |= {f"best.refiner.{k}": v.detach().numpy().copy() for k, v in best_state.items()}
    return arrays


def state_tensors(refiner: torch.nn.Module) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict]:
    """Name -> (dtype, shape) of what :func:`state_arrays` writes: always, and with a best refiner."""
    out = {f"refiner.{k}": ("F32", tuple(v.shape)) for k, v in refiner.state_dict().items()}
    for i, p in enumerate(refiner.parameters()):
        out |= {f"adam.{i}.exp_avg": ("F32", tuple(p.shape)), f"adam.{i}.exp_avg_sq": ("F32", tuple(p.shape)),
                f"adam.{i}.step": ("F32", (1,))}
    rng = tuple(torch.get_rng_state().shape)
    return out | {"shuffle_rng": ("U8", rng), "torch_rng": ("U8", rng)}, {
        f"best.{k}": v for k, v in out.items() if k.startswith("refiner.")}


def load_state(arrays: dict[str, np.ndarray], meta: dict[str, Any], refiner: torch.nn.Module,
               opt: torch.optim.Optimizer, shuffle: torch.Generator, meter) -> dict | None:
    """Put :func:`state_arrays` and the meter counts back (whatever was charged while restoring was paid before the
    checkpoint); the best refiner's state, or None."""
    refiner.load_state_dict({k: torch.from_numpy(arrays[f"refiner.{k}"]) for k in refiner.state_dict()})
    state = {i: {"step": torch.tensor(float(arrays[f"adam.{i}.step"][0])),
                 "exp_avg": torch.from_numpy(arrays[f"adam.{i}.exp_avg"]),
                 "exp_avg_sq": torch.from_numpy(arrays[f"adam.{i}.exp_avg_sq"])}
             for i, _ in enumerate(refiner.parameters())}
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    shuffle.set_state(torch.from_numpy(arrays["shuffle_rng"]))
    torch.set_rng_state(torch.from_numpy(arrays["torch_rng"]))
    for k in METER:
        setattr(meter, k, meta["meter"][k])
    if not any(k.startswith("best.refiner.") for k in arrays):
        return None
    return {k: torch.from_numpy(arrays[f"best.refiner.{k}"]) for k in refiner.state_dict()}
