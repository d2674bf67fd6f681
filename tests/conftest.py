"""Shared fixtures: a tiny random open_clip model in the local-dir layout, and small image sets."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from craft_adapter.reference.task import REFERENCE_VENDOR_DIR

# Before any test imports torch: idle OpenMP workers sleep instead of spinning (the fits a test runs in this
# process would otherwise be several times slower on a small CPU quota; fit_adapter does the same for users).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "patch_size": 7, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_PRE = {"size": 28, "mode": "RGB", "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny CLIP saved as an open_clip local-dir folder."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CFG)
    d = tmp_path_factory.mktemp("tiny_clip")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": TINY_PRE}))
    return d


@pytest.fixture(scope="session")
def reference_vendor_dir() -> Path:
    """The committed reference vendor; tests that need it are skipped if it was never built."""
    if not (REFERENCE_VENDOR_DIR / "open_clip_config.json").exists():
        pytest.skip("reference vendor not built (make vendor)")
    return REFERENCE_VENDOR_DIR


def random_images(n: int, seed: int = 0, size: int = 28) -> list[Image.Image]:
    """``n`` random greyscale images."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L") for _ in range(n)]


# a soft fit small enough for a test: with few_shots(3, 5), 3 classes x 4 shots, 1 held out (9 training images)
SMALL_SOFT_FIT = {"shots": 4, "budget": 80, "popsize": 8, "intrinsic_dim": 16, "eval_every": 3, "holdout_shots": 1}


def few_shots(n_classes: int, per_class: int, seed: int = 3):  # -> LabeledImages
    """``per_class`` random images for each of ``n_classes`` classes named "class i", as a fit takes them."""
    from craft_adapter.training.image_sets import LabeledImages

    images = random_images(n_classes * per_class, seed=seed)
    return LabeledImages(images, np.repeat(np.arange(n_classes), per_class), [f"class {i}" for i in range(n_classes)])


@contextlib.contextmanager
def local_vendor(model_dir: Path) -> Iterator[str]:
    """The local zero-shot vendor (``craft-adapter vendor``'s server) for the model in ``model_dir``, in a thread on
    loopback: its URL, until the block ends."""
    from craft_adapter.reference.local_vendor import make_vendor_server, serve_in_thread
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    server = make_vendor_server(OpenClipBackend(f"local-dir:{model_dir}", device="cpu"))
    thread = serve_in_thread(server)
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
