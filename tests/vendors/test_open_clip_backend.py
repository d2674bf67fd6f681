"""The in-process open_clip backend: loading rules, soft-prompt encoding, batched prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_images

from craft_adapter.vendors.open_clip_backend import BackendError, OpenClipBackend, encode_text_embeddings


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")


def test_soft_encoding_equals_encode_text_for_real_token_embeddings(backend):
    model, tok = backend._model, backend._tokenizer
    ids = tok(["a photo of a coat.", "a blurry picture of a sneaker on a white background."])
    with torch.no_grad():
        ref = model.encode_text(ids)
        mine = encode_text_embeddings(model, model.token_embedding(ids), ids)
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)


def test_embed_soft_with_p0_equals_text_prompt(backend):
    classes = ["coat", "ankle boot", "t-shirt"]
    p0 = backend.soft_prompt_init("a photo of a")
    assert p0.shape == (4, 32)
    # a random nudge (a constant shift would vanish in LayerNorm)
    nudged = p0 + np.random.default_rng(0).normal(0, 0.1, p0.shape).astype(np.float32)
    soft = backend.embed_soft(np.stack([p0, nudged]), classes)  # [2, 3, d]
    text = backend.embed_texts([f"a photo of a {c}." for c in classes])
    np.testing.assert_allclose(soft[0], text, atol=1e-5)
    assert np.abs(soft[1] - text).max() > 1e-3  # a different context really changes the prompt


def test_describe_soft_reads_back_real_words(backend):
    p0 = backend.soft_prompt_init("a photo of a")
    assert backend.describe_soft(p0) == "a photo of a"


def test_many_prompts_in_one_pass_match_one_at_a_time(backend):
    rng = np.random.default_rng(0)
    ctx = rng.normal(0, 0.02, size=(5, 4, 32)).astype(np.float32)
    together = backend.embed_soft(ctx, ["bag", "dress"])
    alone = np.stack([backend.embed_soft(ctx[i:i + 1], ["bag", "dress"])[0] for i in range(5)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_a_small_memory_budget_encodes_in_smaller_chunks_with_the_same_embeddings(backend, tiny_model_dir):
    # the tiny text tower: 16 tokens x width 32 -> 32 KB a sequence at 16 streams; 0.1 MB holds 3 sequences
    small = OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu", memory_mb=0.1)
    assert small.text_chunk == 3 and backend.text_chunk == 4096
    assert small.image_chunk < backend.image_chunk == 256
    classes = [f"class {i}" for i in range(7)]  # more classes than a chunk holds: a candidate is split
    ctx = np.random.default_rng(1).normal(0, 0.02, size=(4, 4, 32)).astype(np.float32)
    np.testing.assert_allclose(small.embed_soft(ctx, classes), backend.embed_soft(ctx, classes), atol=1e-5)
    few = classes[:2]  # a candidate fits: one chunk holds one whole candidate (2 of 3 rows), as before
    np.testing.assert_allclose(small.embed_soft(ctx, few), backend.embed_soft(ctx, few), atol=1e-5)
    np.testing.assert_allclose(small.embed_texts(classes), backend.embed_texts(classes), atol=1e-5)
    imgs = random_images(small.image_chunk + 2)
    np.testing.assert_allclose(small.embed_images(imgs), backend.embed_images(imgs), atol=1e-5)


def test_a_model_without_the_native_towers_keeps_the_fixed_chunks(tiny_model_dir):
    other = OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu", memory_mb=0.1)

    class HfTextTower:  # what open_clip's CustomTextCLIP exposes: encode_text, but no transformer or context_length
        def __init__(self, model):
            self.encode_text, self.visual = model.encode_text, object()

    other._model = HfTextTower(other._model)
    assert other.text_chunk == 4096 and other.image_chunk == other.batch_size == 256
    assert other.embed_texts(["a photo of a bag."]).shape == (1, 32)


def test_images_use_the_models_own_preprocessing(backend):
    imgs = random_images(3)
    emb = backend.embed_images(imgs)
    x = torch.stack([backend._preprocess(im) for im in imgs])
    # mean 0.5, std 0.25 from the folder's preprocess_cfg, not ImageNet's constants
    raw = torch.from_numpy(np.asarray(imgs[0], dtype=np.float32) / 255.0)
    torch.testing.assert_close(x[0, 0], (raw - 0.5) / 0.25, rtol=0, atol=1e-5)
    assert emb.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_builtin_name_without_weights_is_refused():
    with pytest.raises(BackendError, match="never downloads"):
        OpenClipBackend("ViT-B-32", device="cpu")


def test_builtin_name_with_missing_weights_file(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        OpenClipBackend("ViT-B-32", weights=tmp_path / "nope.bin", device="cpu")


def test_unknown_architecture_and_bad_folder(tmp_path):
    with pytest.raises(BackendError, match="unknown open_clip architecture"):
        OpenClipBackend("not-a-model", weights=tmp_path / "w.bin", device="cpu")
    with pytest.raises(BackendError, match="open_clip_config.json"):
        OpenClipBackend(f"local-dir:{tmp_path}", device="cpu")


def test_builtin_name_with_local_weights_file(tiny_model_dir, tmp_path):
    """The model-name + local-file form, as a user with real CLIP weights would use it."""
    import open_clip
    from safetensors.torch import save_file

    model = open_clip.create_model("RN50", load_weights=False)
    w = tmp_path / "open_clip_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(w))
    b = OpenClipBackend("RN50", weights=w, device="cpu")
    assert b.identity["model"] == "RN50" and b.identity["weights_sha256"] != "random-init"
    assert b.embed_texts(["a photo of a cat."]).shape == (1, 1024)


def test_local_dir_records_the_hash_of_the_file_open_clip_loads(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = {k: v + 1 for k, v in load_file(str(folder / "open_clip_model.safetensors")).items()}
    torch.save(weights, folder / "aaa_other.bin")  # sorts first, but open_clip prefers the .safetensors
    b = OpenClipBackend(f"local-dir:{folder}")
    original = OpenClipBackend(f"local-dir:{tiny_model_dir}")
    assert b.identity["weights_sha256"] == original.identity["weights_sha256"]
    np.testing.assert_array_equal(b.embed_texts(["a cat"]), original.embed_texts(["a cat"]))
    only_pt = tmp_path / "only-pt"
    only_pt.mkdir()
    shutil.copy(folder / "open_clip_config.json", only_pt)
    torch.save(weights, only_pt / "weights.pt")  # open_clip never reads a .pt there: refused, not random
    with pytest.raises(BackendError, match="would be random"):
        OpenClipBackend(f"local-dir:{only_pt}")
