"""Train the reference vendor: a small open_clip CLIP on Fashion-MNIST, offline and deterministic.

Captions say how an image looks ("a blurry photo of a coat on a white background"), so that, as with real
CLIP and its web captions, the prompt text matters. The result is written in open_clip's ``local-dir:``
layout (``open_clip_config.json`` beside ``open_clip_model.safetensors``).

    python benchmarks/train_reference_vendor.py --out craft_adapter/reference/vendor
    python benchmarks/train_reference_vendor.py --data glyphs --epochs 3 --batch 128 \
        --out benchmarks/suite/vendor_glyphs

``--data glyphs`` trains the suite's second vendor on printed lowercase letters ("letter a" ... "letter z") in the
DejaVu sans families only (benchmarks/suite/glyphs.py), with the same styles and captions; the suite's letter tasks
use the serif families it never saw. The glyphs are rendered once into a bank; styles are applied per step as for
Fashion-MNIST. Its MEAN/STD are measured on that bank, and the data kind is recorded in the config.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.suite import glyphs  # noqa: E402
from craft_adapter.reference.task import CLASS_NAMES, NOUNS, STYLES, caption, load_fashion_mnist, render  # noqa: E402

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's; the glyph vendor's are measured on its bank
GLYPH_BANK_PER_CLASS = 2400  # 62,400 renders, about Fashion-MNIST's 60,000
GLYPH_BANK_SEED_OFFSET = 1000  # bank renders drawn apart from the training loop's own generator
MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 28, "layers": 4, "width": 128, "patch_size": 4, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def preprocess_cfg(mean: float, std: float) -> dict:
    """open_clip's preprocessing for 28x28 greyscale data with these statistics."""
    return {"size": 28, "mode": "RGB", "mean": [mean] * 3, "std": [std] * 3,
            "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


# The glyph vendor: 7-pixel patches (16 tokens instead of 49) and a narrower image tower, about eight times cheaper
# a step, so that it trains in a quarter of an hour on two shared cores; printed letters need less than garments.
GLYPH_MODEL_CFG = {**MODEL_CFG, "vision_cfg": {**MODEL_CFG["vision_cfg"], "width": 64, "patch_size": 7}}
# Style combinations a training image may get: none (40%), one (40%), two (20%).
COMBOS = [()] + [(i,) for i in range(len(STYLES))] + list(itertools.combinations(range(len(STYLES)), 2))


def combo_probs() -> np.ndarray:
    """Sampling weights over COMBOS."""
    n1, n2 = len(STYLES), len(COMBOS) - 1 - len(STYLES)
    return np.array([0.4] + [0.4 / n1] * n1 + [0.2 / n2] * n2)


def to_tensor(x: np.ndarray, mean: float = MEAN, std: float = STD) -> torch.Tensor:
    """uint8 [n,h,w] -> normalised float [n,3,h,w], as the vendor's own preprocessing does."""
    t = (torch.from_numpy(x).float() / 255.0 - mean) / std
    return t[:, None].expand(-1, 3, -1, -1).contiguous()


def load_data(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray, list[str], float, float]:
    """Training images, labels, class names and the preprocessing mean/std for ``--data kind``."""
    if kind == "fashion":
        x, y = load_fashion_mnist("train")
        return x, y, list(CLASS_NAMES), MEAN, STD
    x, y = glyphs.glyph_bank(GLYPH_BANK_PER_CLASS, glyphs.SANS_FONTS, seed + GLYPH_BANK_SEED_OFFSET)
    scaled = x.astype(np.float64) / 255.0
    return x, y, list(glyphs.LETTER_CLASSES), round(float(scaled.mean()), 4), round(float(scaled.std()), 4)


def main() -> None:
    """Train and save the reference vendor."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("craft_adapter/reference/vendor"))
    ap.add_argument("--data", choices=("fashion", "glyphs"), default="fashion")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="fixed so that the weights are reproducible")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    x, y, class_names, mean, std = load_data(args.data, args.seed)
    model_cfg = MODEL_CFG if args.data == "fashion" else GLYPH_MODEL_CFG
    model = open_clip.CLIP(**model_cfg)
    tok = open_clip.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    # Every caption the vendor will ever see, tokenised once: index [class, combo, noun].
    caps = [caption(c, combo, n) for c in class_names for combo in COMBOS for n in NOUNS]
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
        img_f = F.normalize(model.encode_image(to_tensor(imgs, mean, std)), dim=-1)
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
    recorded = {"seed": args.seed, "epochs": args.epochs}
    if args.data != "fashion":  # a fashion vendor's config stays byte-identical to the committed one's
        recorded.update(data=args.data, batch=args.batch, lr=args.lr, threads=args.threads,
                        final_loss=round(loss.item(), 4))
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(mean, std), "craft_reference": recorded}
    (args.out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"saved {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
