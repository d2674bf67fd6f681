"""Refiner -> ONNX: trace the torch refiner, check the graph, prove parity on onnxruntime, then write.

Nothing is written unless ``onnx.checker`` and the runtime's own refiner check
(:mod:`craft_adapter.artifact.onnx_check`) pass and onnxruntime matches the torch refiner within ``atol`` at
every checked batch size. The difference from the artifact's numpy reference forward is reported too. An adapter
with an embedding head exports a graph with a second input, the image embedding ``[batch, d]``, and is checked the
same way, on sample embeddings as well as sample scores.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from craft_adapter.artifact.adapter_file import Adapter, AdapterError, refiner_input
from craft_adapter.artifact.onnx_check import check_refiner_onnx
from craft_adapter.artifact.onnx_graph import (
    BATCH_DIM,
    EMBEDDING_NAME,
    INPUT_NAME,
    OUTPUT_NAMES,
    metadata_props,
)
from craft_adapter.serve.session import make_session
from craft_adapter.training.refiner import Refiner

MIN_OPSET = 17
DEFAULT_OPSET = 18
PARITY_BATCHES = (1, 256)
PARITY_ATOL = 1e-5


class ExportError(RuntimeError):
    """The export failed a check; nothing was written."""


class EmbeddingHead(torch.nn.Module):
    """``e @ weight`` with ``weight = (logit_scale * head.delta)^T [d, c]``: traced as one MatMul on ``head.weight``."""

    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        # its initializer is named by its place in RefinerWithSoftmax: "head" + "weight" = onnx_graph.HEAD_WEIGHT
        self.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(adapter.head_weight().T)))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """The head's logits ``[batch, c]`` from L2-normalised image embeddings ``e [batch, d]``."""
        return e @ self.weight


class RefinerWithSoftmax(torch.nn.Module):
    """The fit's torch :class:`~craft_adapter.refiner.Refiner` with the adapter's weights (plus its embedding head,
    if it has one), and the softmax."""

    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self.refiner = Refiner.from_arrays(adapter.refiner)  # initializers keep the adapter's tensor names
        self.head = EmbeddingHead(adapter) if adapter.head is not None else None
        self.eval()

    def forward(self, x: torch.Tensor, e: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Refined logits and their softmax, both ``[batch, n_classes]``, from refiner input ``x`` (and the image
        embeddings ``e [batch, d]`` for an adapter with a head)."""
        refined = self.refiner(x)
        if self.head is not None:
            refined = refined + self.head(e)
        return refined, torch.softmax(refined, dim=-1)


@dataclass(frozen=True)
class ExportReport:
    """What was written and how closely it matches."""

    path: Path
    opset: int
    n_classes: int
    hidden: int
    max_abs_diff_torch: dict[int, float] = field(default_factory=dict)  # batch -> max |onnx - torch|
    max_abs_diff_numpy: dict[int, float] = field(default_factory=dict)  # batch -> max |onnx - Adapter.refine|
    float32_floor: dict[int, float] = field(default_factory=dict)  # batch -> max |torch float32 - float64|


def sample_scores(adapter: Adapter, batch: int, seed: int = 0) -> np.ndarray:
    """CLIP-like raw vendor scores ``[batch, n_classes]`` of ``adapter``'s logit kind.

    Cosine similarities near 0.2 (spread 0.05) times the logit scale (capped at CLIP's 100), or their softmax:
    the range a refiner meets in use, where float32 rounding stays well inside the parity limit.
    """
    rng = np.random.default_rng(seed + batch)
    scale = min(max(abs(adapter.logit_scale), 1.0), 100.0)
    logits = (scale * rng.normal(0.2, 0.05, (batch, adapter.n_classes))).astype(np.float32)
    if adapter.logit_kind == "logits":
        return logits
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def sample_embeddings(adapter: Adapter, batch: int, seed: int = 0) -> np.ndarray | None:
    """Random L2-normalised image embeddings ``[batch, d]`` for an adapter with a head (None without one)."""
    if adapter.head is None:
        return None
    e = np.random.default_rng(seed + 7919 * batch).normal(size=(batch, adapter.head_dim))
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


def _inputs(adapter: Adapter, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Sample vendor scores, the refiner input made from them, and sample embeddings (None without a head)."""
    scores = sample_scores(adapter, batch, seed)
    return scores, refiner_input(scores, adapter.logit_kind), sample_embeddings(adapter, batch, seed)


def trace_refiner(adapter: Adapter, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The torch refiner traced to ONNX (TorchScript exporter), with the adapter's metadata attached."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    module = RefinerWithSoftmax(adapter)
    _, x, e = _inputs(adapter, 2, 0)
    example = (torch.from_numpy(x),) if e is None else (torch.from_numpy(x), torch.from_numpy(e))
    names = [INPUT_NAME] if e is None else [INPUT_NAME, EMBEDDING_NAME]
    buf = io.BytesIO()
    dynamic = {name: {0: BATCH_DIM} for name in (*names, *OUTPUT_NAMES)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation on every call
        torch.onnx.export(module, example, buf, input_names=names, output_names=list(OUTPUT_NAMES),
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False, do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    onnx.helper.set_model_props(model, metadata_props(adapter))
    model.doc_string = ("craft-adapter refiner: refined = x + fc2(relu(fc1(x)))"
                        + ("" if e is None else " + image_embedding @ head.weight")
                        + ", probabilities = softmax(refined)")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the exported refiner: {e}") from None
    return model


def check_parity(model_bytes: bytes, adapter: Adapter, batches: tuple[int, ...] = PARITY_BATCHES,
                 seed: int = 0) -> dict[str, dict[int, float]]:
    """Max abs differences per batch size: onnxruntime (CPU) vs the torch refiner (``torch``) and vs the
    artifact's numpy forward (``numpy``), and torch float32 vs float64 (``float32_floor``, the rounding floor)."""
    session = make_session(model_bytes, device="cpu")
    module = RefinerWithSoftmax(adapter)
    module64 = RefinerWithSoftmax(adapter).double()
    diffs: dict[str, dict[int, float]] = {"torch": {}, "numpy": {}, "float32_floor": {}}
    for batch in batches:
        scores, x, e = _inputs(adapter, batch, seed)
        feed = {INPUT_NAME: x} if e is None else {INPUT_NAME: x, EMBEDDING_NAME: e}
        got_refined, got_probs = session.run(list(OUTPUT_NAMES), feed)
        args = [torch.from_numpy(v) for v in feed.values()]
        with torch.no_grad():
            want_refined, want_probs = (t.numpy() for t in module(*args))
            exact = module64(*(a.double() for a in args))[0].numpy()
        diffs["torch"][batch] = float(max(np.abs(got_refined - want_refined).max(),
                                          np.abs(got_probs - want_probs).max()))
        diffs["numpy"][batch] = float(np.abs(got_refined - adapter.refine(scores, e)).max())
        diffs["float32_floor"][batch] = float(np.abs(want_refined - exact).max())
    return diffs


def export_onnx(adapter: Adapter | str | Path, out: str | Path | None = None, opset: int = DEFAULT_OPSET,
                atol: float = PARITY_ATOL, batches: tuple[int, ...] = PARITY_BATCHES) -> ExportReport:
    """Export ``adapter``'s refiner to ``out`` (default: the adapter path with ``.onnx``) after the checks pass."""
    if not isinstance(adapter, Adapter):
        source = Path(adapter)
        adapter = Adapter.load(source)
        out = source.with_suffix(".onnx") if out is None else out
    if out is None:
        raise ExportError("give an output path for an in-memory adapter")
    out = Path(out)
    model_bytes = trace_refiner(adapter, opset).SerializeToString()
    try:
        check_refiner_onnx(model_bytes, str(out))  # write only what the runtime's loader accepts
    except AdapterError as e:
        raise ExportError(f"the traced graph is not one the runtime loads: {e}") from None
    diffs = check_parity(model_bytes, adapter, batches)
    worst = max(diffs["torch"].values())
    if not worst <= atol:  # also catches NaN
        floor = max(diffs["float32_floor"].values())
        raise ExportError(
            f"parity check failed: onnxruntime differs from the torch refiner by up to {worst:.3g} (limit {atol:g}; "
            f"per batch {diffs['torch']}); nothing was written to {out}. For scale, torch float32 itself is "
            f"{floor:.3g} from float64 on these inputs; if the two are close this is float32 rounding on large "
            "logits, and a looser --atol is safe")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(model_bytes)
    tmp.replace(out)
    return ExportReport(out, opset, adapter.n_classes, adapter.hidden, diffs["torch"], diffs["numpy"],
                        diffs["float32_floor"])
