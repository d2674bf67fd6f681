"""An in-process open_clip model behind the black-box boundary (embedding style, with soft prompts)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from PIL import Image

from craft_adapter.vendors.protocols import MEMORY_BUDGET_MB, Capabilities

log = logging.getLogger(__name__)

MAX_TEXT_CHUNK = 4096  # sequences encoded at once, at most, whatever the memory budget
# Bytes one input holds at the peak of a no-grad transformer pass, in units of one float32 residual stream
# (tokens x width x 4): measured 13 to 17 on CPU (ViT-B-16 text 13.4 and images 12.6, one 4,000-sequence and one
# 256-image pass in benchmarks/results/scale_vit_b16_chunk.json; the reference vendor's text 17, from the same probe
# in the scale.json of commit 56eccdd). 16 keeps a chunk near the budget without a probe pass.
ACTIVATION_STREAMS = 16


class BackendError(ValueError):
    """The model could not be built from what was given; the message says what to pass instead."""


def pick_device(requested: str = "auto") -> torch.device:
    """``cuda`` when asked for or when ``auto`` finds a working GPU, else ``cpu``."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        try:
            torch.zeros(1, device="cuda")
            return torch.device("cuda")
        except RuntimeError as e:  # a CUDA build on a machine whose driver cannot run it
            log.info("CUDA visible but unusable (%s); using CPU", e)
    return torch.device("cpu")


def encode_text_embeddings(model: open_clip.CLIP, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` starting from token embeddings ``[b, L, width]`` instead of ids ``[b, L]``.

    Mirrors ``CLIP.encode_text`` step for step (batch-first transformer); ``ids`` only locates the
    pooled (end-of-text) position.
    """
    cast_dtype = model.transformer.get_cast_dtype()
    x = embeds.to(cast_dtype) + model.positional_embedding.to(cast_dtype)  # [b, L, width]
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(x, ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else (
            x @ model.text_projection)
    return x  # [b, embed_dim]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _require_weights_only(model: str, weights_file: Path | None) -> None:
    """Refuse a pickled weights file (``.bin``/``.pth``) that ``torch.load(weights_only=True)`` cannot read.

    open_clip reads such files with ``weights_only=True``, but when that raises ``TypeError`` (a crafted file can
    make it) it retries without the flag: a full unpickle on torch < 2.6 or with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
    A file that passes this identical call never reaches that retry. In a local-dir: folder every candidate is checked.
    """
    if weights_file is None:
        return
    in_folder = model.startswith("local-dir:")  # open_clip picks among *.safetensors, *.bin, *.pth there
    files = sorted(p for p in weights_file.parent.iterdir() if p.suffix in (".bin", ".pth")) if in_folder else [
        weights_file]
    for path in files:
        if path.suffix in (".safetensors", ".npz", ".npy"):
            continue  # read by safetensors, or by numpy without allow_pickle: never torch.load
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise BackendError(f"{path} is not plain tensors (torch.load with weights_only=True: {str(e)[:200]}); "
                               "use a .safetensors file") from None


def _local_dir_checkpoint(folder: Path) -> Path | None:
    """The weights file open_clip itself loads from a ``local-dir:`` folder, so the hash we record is of that file."""
    find = getattr(open_clip.factory, "_find_checkpoint_in_dir", None)  # open_clip 3.x's own choice
    if find is not None:
        found = find(folder)
        return Path(found) if found else None
    found = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))
    if len(found) > 1:
        raise BackendError(f"{folder} holds several weights files {[p.name for p in found]}; keep one")
    return found[0] if found else None


class OpenClipBackend:
    """Any open_clip CLIP, loaded from local files only, answering embedding-style requests.

    ``model`` is either a built-in architecture name (``ViT-B-32``) with ``weights`` a local file, or
    ``local-dir:PATH`` holding ``open_clip_config.json`` beside the weights. Nothing is ever downloaded.
    """

    def __init__(self, model: str, weights: str | Path | None = None, device: str = "auto",
                 batch_size: int = 256, allow_random_init: bool = False,
                 memory_mb: float = MEMORY_BUDGET_MB) -> None:
        self.device = pick_device(device)
        self.batch_size, self.memory_mb = batch_size, memory_mb
        weights_file = self._resolve_weights(model, weights, allow_random_init)
        _require_weights_only(model, weights_file)
        self._model, _, self._preprocess = open_clip.create_model_and_transforms(
            model, pretrained=str(weights_file) if weights_file and not model.startswith("local-dir:") else None,
            device=self.device, load_weights=weights_file is not None,
        )
        self._model.eval()
        self._tokenizer = open_clip.get_tokenizer(model)
        self._soft_ok = isinstance(self._model, open_clip.CLIP)
        self.capabilities = Capabilities(style="embedding", text_prompts=True, soft_prompts=self._soft_ok)
        self.logit_scale = float(self._model.logit_scale.exp().item())
        self.identity = {
            "name": "open_clip", "model": model.split("/")[-1] if model.startswith("local-dir:") else model,
            "weights_sha256": _file_digest(weights_file) if weights_file else "random-init",
        }

    def _fits(self, tokens: int, width: int) -> int:
        """How many inputs of ``tokens`` x ``width`` one pass may take within ``memory_mb`` (at least one)."""
        return max(1, int(self.memory_mb * 2**20) // (ACTIVATION_STREAMS * tokens * width * 4))

    @property
    def text_chunk(self) -> int:
        """Text sequences encoded at once: as many as the memory budget holds, at most 4,096."""
        tokens = getattr(self._model, "context_length", None)
        width = getattr(getattr(self._model, "transformer", None), "width", None)
        if not isinstance(tokens, int) or not isinstance(width, int):  # a non-native text tower: no estimate
            return MAX_TEXT_CHUNK
        return min(MAX_TEXT_CHUNK, self._fits(tokens, width))

    @property
    def image_chunk(self) -> int:
        """Images encoded at once: ``batch_size``, fewer when a ViT batch of that size would pass the budget."""
        visual = self._model.visual
        grid, trunk = getattr(visual, "grid_size", None), getattr(visual, "transformer", None)
        if grid is None or trunk is None:  # not a ViT: no estimate, the batch size as given
            return self.batch_size
        return min(self.batch_size, self._fits(int(np.prod(grid)) + 1, trunk.width))

    @staticmethod
    def _resolve_weights(model: str, weights: str | Path | None, allow_random: bool) -> Path | None:
        if model.startswith("local-dir:"):
            folder = Path(model[len("local-dir:"):])
            if not (folder / "open_clip_config.json").is_file():
                raise BackendError(f"{folder} has no open_clip_config.json; a local-dir: model folder needs one")
            if weights is not None:
                raise BackendError("pass weights inside the local-dir: folder, not with --weights")
            chosen = _local_dir_checkpoint(folder)
            if chosen is None and not allow_random:
                raise BackendError(f"{folder} holds no weights file that open_clip reads there (.safetensors, "
                                   ".bin or .pth); without one the model would be random")
            return chosen
        if model not in open_clip.list_models():
            raise BackendError(f"unknown open_clip architecture {model!r}; use a name from "
                               "open_clip.list_models() or local-dir:PATH")
        if weights is None:
            if allow_random:  # only for memory measurement and tests, never a silent fallback
                return None
            raise BackendError(f"{model} needs a local weights file (--weights PATH, e.g. "
                               "open_clip_pytorch_model.bin); craft-adapter never downloads weights")
        path = Path(weights)
        if not path.is_file():
            raise BackendError(f"weights file {path} does not exist")
        return path

    # -- image side ---------------------------------------------------------------------------------
    # The L2 normalisation here stays in torch, on the model's device, rather than vendors.replies.unit_rows: it is
    # the model's own last step, and numpy's norm rounds differently (the last bit of ~20-30% of entries), which
    # would change every adapter fitted on this backend.
    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised image embeddings ``[n, d]``, through the model's own preprocessing."""
        out, step = [], self.image_chunk
        for i in range(0, len(images), step):
            batch = torch.stack([self._preprocess(im) for im in images[i:i + step]])
            out.append(F.normalize(self._model.encode_image(batch.to(self.device)), dim=-1).float().cpu())
        return torch.cat(out).numpy()

    # -- text side ----------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings ``[t, d]``; the texts go through in chunks sized by the memory budget."""
        ids, step = self._tokenizer(list(texts)).to(self.device), self.text_chunk
        out = [F.normalize(self._model.encode_text(ids[i:i + step]), dim=-1).float().cpu()
               for i in range(0, len(ids), step)]
        return torch.cat(out).numpy()

    def _ctx_len(self, text: str) -> int:
        ids = self._tokenizer([text])[0]
        return int((ids != 0).sum()) - 2  # without start and end tokens

    @torch.no_grad()
    def soft_prompt_init(self, text: str) -> np.ndarray:
        """Token embeddings ``[n_ctx, width]`` of ``text`` (without start/end tokens)."""
        self._require_soft()
        ids = self._tokenizer([text]).to(self.device)
        n = self._ctx_len(text)
        return self._model.token_embedding(ids)[0, 1:1 + n].float().cpu().numpy()

    @torch.no_grad()
    def embed_soft(self, ctx: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
        """Embeddings ``[p, c, d]`` of prompts "<ctx> {class}." for context vectors ``ctx [p, n_ctx, width]``."""
        self._require_soft()
        p, n_ctx, width = ctx.shape
        if width != self._model.token_embedding.embedding_dim:
            raise ValueError(f"context width {width} != the model's token width "
                             f"{self._model.token_embedding.embedding_dim}")
        # Placeholder words hold the context positions; their embeddings are overwritten below.
        ids = self._tokenizer([" ".join(["X"] * n_ctx) + f" {c}." for c in class_names]).to(self.device)
        base = self._model.token_embedding(ids)  # [c, L, width]
        ctx_t = torch.as_tensor(ctx, dtype=base.dtype, device=self.device)
        step, c = self.text_chunk, len(class_names)
        if c > step:  # one candidate's class texts do not fit at once: its classes a chunk at a time
            return torch.stack([torch.cat([self._soft_chunk(base[j:j + step], ids[j:j + step], ctx_t[i:i + 1])[0]
                                           for j in range(0, c, step)]) for i in range(p)]).numpy()
        per = step // c  # whole candidates a chunk, as many as fit
        return torch.cat([self._soft_chunk(base, ids, ctx_t[i:i + per]) for i in range(0, p, per)]).numpy()

    def _soft_chunk(self, base: torch.Tensor, ids: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[q, c, d]`` of the class token rows ``base [c, L, width]`` with contexts ``ctx [q, n, w]``."""
        emb = base.unsqueeze(0).repeat(len(ctx), 1, 1, 1)  # [q, c, L, width]
        emb[:, :, 1:1 + ctx.shape[1]] = ctx[:, None]
        flat = encode_text_embeddings(self._model, emb.flatten(0, 1), ids.repeat(len(ctx), 1))
        return F.normalize(flat, dim=-1).view(len(ctx), len(base), -1).float().cpu()

    @torch.no_grad()
    def describe_soft(self, ctx: np.ndarray) -> str:
        """Nearest vocabulary token (by cosine) at each context position, decoded to text."""
        self._require_soft()
        table = F.normalize(self._model.token_embedding.weight.float(), dim=-1)  # [vocab, width]
        q = F.normalize(torch.as_tensor(ctx, dtype=torch.float32, device=table.device), dim=-1)
        ids = (q @ table.T).argmax(-1).tolist()
        tok = open_clip.tokenizer._tokenizer
        return tok.decode(ids).strip()

    def _require_soft(self) -> None:
        if not self._soft_ok:
            raise TypeError("this open_clip model has a non-native text tower; it accepts only text prompts")

