"""Train the reference vendor: a small open_clip CLIP on Fashion-MNIST, offline and deterministic.

Captions say how an image looks ("a blurry photo of a coat on a white background"), so that, as with real
CLIP and its web captions, the prompt text matters. The result is written in open_clip's ``local-dir:``
layout (``open_clip_config.json`` beside ``open_clip_model.safetensors``).

    python benchmarks/train_reference_vendor.py --out craft_adapter/reference/vendor
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from craft_adapter.reference.task import CLASS_NAMES, NOUNS, STYLES, caption, load_fashion_mnist, render

MEAN, STD = 0.2860, 0.3530
MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 28, "layers": 4, "width": 128, "patch_size": 4, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PREPROCESS_CFG = {
    "size": 28, "mode": "RGB", "mean": [MEAN] * 3, "std": [STD] * 3,
    "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0,
}
# Style combinations a training image may get: none (40%), one (40%), two (20%).
COMBOS = [()] + [(i,) for i in range(len(STYLES))] + list(itertools.combinations(range(len(STYLES)), 2))


def combo_probs() -> np.ndarray:
    """Sampling weights over COMBOS."""
    n1, n2 = len(STYLES), len(COMBOS) - 1 - len(STYLES)
    return np.array([0.4] + [0.4 / n1] * n1 + [0.2 / n2] * n2)


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 [n,h,w] -> normalised float [n,3,h,w], as the vendor's own preprocessing does."""
    t = (torch.from_numpy(x).float() / 255.0 - MEAN) / STD
    return t[:, None].expand(-1, 3, -1, -1).contiguous()


def main() -> None:
    """Train and save the reference vendor."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("craft_adapter/reference/vendor"))
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="fixed so that the weights are reproducible")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    x, y = load_fashion_mnist("train")
    model = open_clip.CLIP(**MODEL_CFG)
    tok = open_clip.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    # Every caption the vendor will ever see, tokenised once: index [class, combo, noun].
    caps = [caption(c, combo, n) for c in CLASS_NAMES for combo in COMBOS for n in NOUNS]
    cap_tokens = tok(caps)
    n_c, n_n = len(COMBOS), len(NOUNS)

    steps = int(args.epochs * len(x) / args.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.05)
    probs = combo_probs()
    t0 = time.time()
    model.train()
    for step in range(steps):
        idx = rng.choice(len(x), size=args.batch, replace=False)
        combo = rng.choice(len(COMBOS), size=args.batch, p=probs)
        noun = rng.integers(0, n_n, size=args.batch)
        imgs = np.empty((args.batch, 28, 28), np.uint8)
        for c in np.unique(combo):
            m = combo == c
            imgs[m] = render(x[idx[m]], COMBOS[c], rng)
        cap_id = (y[idx] * n_c + combo) * n_n + noun
        img_f = F.normalize(model.encode_image(to_tensor(imgs)), dim=-1)
        txt_f = F.normalize(model.encode_text(cap_tokens[cap_id]), dim=-1)
        logits = model.logit_scale.exp() * img_f @ txt_f.T  # [batch, batch]
        # Same class and style is a positive even with another noun: no false negatives in the batch.
        sem = torch.from_numpy(cap_id // n_n)
        target = (sem[:, None] == sem[None, :]).float()
        target /= target.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    # fp16 on disk keeps the folder small enough to commit; open_clip casts back to fp32 when loading.
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "open_clip_model.safetensors"))
    cfg = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG,
           "craft_reference": {"seed": args.seed, "epochs": args.epochs}}
    (args.out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"saved {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
