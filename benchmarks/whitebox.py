"""White-box upper bounds on the same model, with full gradient access: CoOp-style prompt tuning and a
linear probe on image features. Benchmark-only: this loads its own copy of the model and reaches inside it,
which fit never may (the backend exposes no weights)."""

from __future__ import annotations

from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from craft_adapter.vendors.open_clip_backend import OpenClipBackend, encode_text_embeddings


def white_box_model(spec: str) -> tuple[open_clip.CLIP, Any]:
    """The model behind the backend ``spec`` (``local-dir:PATH``), on the CPU, and its tokenizer."""
    model, _, _ = open_clip.create_model_and_transforms(spec, device="cpu", load_weights=True)
    return model.eval(), open_clip.get_tokenizer(spec)


def coop(backend: OpenClipBackend, white: tuple[open_clip.CLIP, Any], train_images: list, y: np.ndarray,
         test_emb: np.ndarray, y_test: np.ndarray, class_names: list[str], init: str = "a photo of a",
         steps: int = 300, lr: float = 2e-3, seed: int = 0) -> float:
    """Tune 4 context vectors of ``white`` (the backend's model and tokenizer) by gradient descent (CoOp); return
    test accuracy."""
    torch.manual_seed(seed)
    model, tok = white
    for p in model.parameters():
        p.requires_grad_(False)
    img = torch.from_numpy(backend.embed_images(train_images))  # [n, d], normalised
    ctx = torch.nn.Parameter(torch.from_numpy(backend.soft_prompt_init(init)).clone())  # [n_ctx, width]
    n_ctx = ctx.shape[0]
    ids = tok([" ".join(["X"] * n_ctx) + f" {c}." for c in class_names])
    base = model.token_embedding(ids).detach()  # [c, L, width]
    opt = torch.optim.Adam([ctx], lr=lr)
    yt = torch.from_numpy(y)

    def text_features() -> torch.Tensor:
        emb = torch.cat([base[:, :1], ctx[None].expand(len(class_names), -1, -1), base[:, 1 + n_ctx:]], dim=1)
        return F.normalize(encode_text_embeddings(model, emb, ids), dim=-1)  # [c, d]

    for _ in range(steps):
        loss = F.cross_entropy(backend.logit_scale * img @ text_features().T, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        txt = text_features().numpy()
    return float(((test_emb @ txt.T).argmax(1) == y_test).mean())


def linear_probe(train_emb: np.ndarray, y: np.ndarray, test_emb: np.ndarray, y_test: np.ndarray, n_classes: int,
                 steps: int = 500, wd: float = 1e-4, seed: int = 0) -> float:
    """Multinomial logistic regression on L2-normalised image features; return test accuracy."""
    torch.manual_seed(seed)
    x, yt = torch.from_numpy(train_emb), torch.from_numpy(y)
    lin = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=wd)
    for _ in range(steps):
        loss = F.cross_entropy(lin(x * 10), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((lin(torch.from_numpy(test_emb) * 10).argmax(1).numpy() == y_test).mean())
