"""Text mode against a string-only (scoring) vendor: pair cache, budget under concurrency, determinism."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from craft_adapter.artifact.adapter_file import Adapter
from craft_adapter.blackbox.box import BlackBox
from craft_adapter.blackbox.meter import BudgetExhausted, QueryMeter
from craft_adapter.blackbox.pair_scorer import RateLimiter
from craft_adapter.training.api import fit_adapter
from craft_adapter.training.config import FitConfig
from craft_adapter.training.text_prompt import TextPromptSearch, to_template, to_words, word_vocabulary
from craft_adapter.vendors.protocols import Capabilities, fill

# isort: split
from craft_adapter.serve import CallableVendor, load_runtime

CLASSES = ["coat", "bag", "sandal"]


class HashVendor:
    """A string-only vendor: probabilities from a hash of (image, template), favouring the true class a little
    more when the template contains 'white'. Records every call; safe under threads."""

    capabilities = Capabilities(style="scoring", returns="probabilities")
    identity = {"name": "hash-vendor"}

    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[bytes, str]] = []
        self.lock = threading.Lock()
        self.delay = delay

    def score(self, image, labels, template):
        if self.delay:
            time.sleep(self.delay)
        raw = image.tobytes()
        seed = int.from_bytes(hashlib.sha256(raw + template.encode()).digest()[:8], "little")
        logits = np.random.default_rng(seed).normal(size=len(labels))
        logits[raw[0] % len(labels)] += 1.0 + template.count("white")
        with self.lock:
            self.calls.append((raw, template))
        p = np.exp(logits - logits.max())
        return (p / p.sum()).astype(np.float32)


def images(n=12):
    return [Image.fromarray(np.full((4, 4), (i % 3) + 3 * i, np.uint8), mode="L") for i in range(n)]


def test_no_pair_is_paid_twice():
    v = HashVendor()
    box = BlackBox(v, images(6), CLASSES, QueryMeter(budget=100, unit="vendor_calls"), concurrency=4)
    a = box.logits_text(["a {}.", "b {}."], rows=[0, 1, 2])
    assert box.meter.vendor_calls == 6
    b = box.logits_text(["b {}.", "a {}.", "a {}."], rows=[2, 1, 0, 3])
    assert box.meter.vendor_calls == 8  # only (3, b) and (3, a) were new
    np.testing.assert_array_equal(a[0], b[1][[2, 1, 0]])
    assert len(v.calls) == len(set(v.calls)) == 8
    assert box.paid_rows("a {}.") == [0, 1, 2, 3]


def test_budget_holds_under_concurrency():
    v = HashVendor(delay=0.002)
    meter = QueryMeter(budget=50, unit="vendor_calls")
    box = BlackBox(v, images(12), CLASSES, meter, concurrency=16)
    with pytest.raises(BudgetExhausted):
        box.logits_text([f"t{i} {{}}." for i in range(5)])  # 60 pairs > 50: refused whole
    assert meter.vendor_calls == 0 and not v.calls
    box.logits_text([f"t{i} {{}}." for i in range(4)])  # 48 pairs
    assert meter.vendor_calls == len(v.calls) == 48
    assert box.text_cost(["t9 {}."]) == 12
    with pytest.raises(BudgetExhausted):
        box.logits_text(["t9 {}."])
    assert meter.vendor_calls == 48 <= meter.budget


def run_fit(concurrency: int, budget: int = 600, seed: int = 0, **kw):
    cfg = FitConfig(shots=4, seed=seed, prompt="text", budget=budget, holdout_shots=1, eval_every=2,
                    text_children=6, text_elites=2, vocab_size=200, concurrency=concurrency,
                    minibatch_start=1, minibatch_end=2, **kw)  # minibatches smaller than the set
    imgs = images(12)
    labels = np.array([im.tobytes()[0] % 3 for im in imgs])
    v = HashVendor()
    outcome = fit_adapter(imgs, v, cfg, labels=labels, class_names=CLASSES)
    return outcome, outcome.record.meter, v


def test_text_fit_is_deterministic_across_concurrency_and_within_budget():
    (r1, m1, v1), (r8, m8, v8) = run_fit(1), run_fit(8)
    assert r1.adapter.to_bytes() == r8.adapter.to_bytes()
    assert m1["vendor_calls"] == m8["vendor_calls"] == len(v1.calls) <= 600
    assert len(v8.calls) == len(set(v8.calls))  # never the same (image, template) twice
    assert r1.adapter.mode == "text" and r1.adapter.logit_kind == "probabilities"
    assert run_fit(1, seed=1)[0].adapter.to_bytes() != r1.adapter.to_bytes()


def test_learned_template_round_trips_and_runtime_sends_it_verbatim(tmp_path):
    adapter = run_fit(4)[0].adapter
    path = adapter.save(tmp_path / "text.safetensors")
    loaded = Adapter.load(path)
    assert loaded.template == adapter.template and "{}" in loaded.template
    sent = []

    def vendor(imgs, prompts):
        sent.append(list(prompts))
        return np.full((len(imgs), len(prompts)), 1 / len(prompts), np.float32)

    runtime = load_runtime(path, CallableVendor(vendor, returns="probabilities"))
    runtime.predict(images(2))
    assert sent == [[fill(loaded.template, c) for c in CLASSES]]


def test_word_edits_keep_one_slot_and_vocabulary_is_words():
    vocab = word_vocabulary(600)
    assert "white" in vocab and len(vocab) == 600 and all(w.isalpha() for w in vocab)
    search = TextPromptSearch("a photo of a {}.", vocab, children=30, elites=3, seed=0)
    cands = search.propose()
    assert cands[0] == "a photo of a {}." and len(set(cands)) == 31
    for c in cands:
        assert to_words(c).count("{}") == 1 and to_template(to_words(c)) == c
    best = search.tell(cands, np.arange(31, dtype=float)[::-1])
    assert best == 30 and search.elites[0] == cands[30]


def test_rate_limiter_spaces_calls():
    limiter = RateLimiter(200.0)
    t0 = time.monotonic()
    for _ in range(11):
        limiter.acquire()
    # 11 calls at 200/s: the last may start no earlier than 10 intervals after the first (which is immediate)
    assert time.monotonic() - t0 >= 10 / 200 - 1e-3
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_cli_fit_against_a_vendor_url_is_text_mode_with_price(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from craft_adapter.cli import app
    from craft_adapter.reference.local_vendor import make_vendor_server, serve_in_thread
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    server = make_vendor_server(OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu"))
    thread = serve_in_thread(server)
    try:
        data = tmp_path / "shots"
        for i, im in enumerate(images(12)):
            d = data / CLASSES[i % 3]
            d.mkdir(parents=True, exist_ok=True)
            im.save(d / f"{i}.png")
        out = tmp_path / "a.safetensors"
        r = CliRunner().invoke(app, ["fit", "--vendor", server.url, "--data", str(data), "--shots", "4",
                                     "--budget", "300", "--price-per-1k", "2.5", "--text-children", "4",
                                     "-o", str(out)])
        assert r.exit_code == 0, r.output
        a = Adapter.load(out)
        assert a.mode == "text" and a.fit["budget_unit"] == "vendor_calls" and a.fit["vendor_calls"] <= 300
        assert a.fit["estimated_price"] == round(a.fit["vendor_calls"] / 1000 * 2.5, 4)
        assert "vendor calls" in r.output and "$" in r.output
        r = CliRunner().invoke(app, ["fit", "--vendor", server.url, "--prompt", "soft", "--data", str(data),
                                     "--shots", "4", "-o", str(tmp_path / "b.safetensors")])
        assert r.exit_code == 2 and "only text prompts" in r.output
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_vendor_url_keys_never_reach_the_adapter_or_errors(tmp_path):
    from craft_adapter.serve import HttpZeroShotVendor, VendorError

    secret = "sk-do-not-leak-123"
    vendor = HttpZeroShotVendor(f"http://user:{secret}@127.0.0.1:9/zs?api_key={secret}", timeout=2)
    assert secret not in json.dumps(vendor.identity)
    with pytest.raises(VendorError) as e:
        vendor.score(images(1)[0], CLASSES, "a photo of a {}.")
    assert secret not in str(e.value) and "127.0.0.1:9/zs" in str(e.value)


def test_eval_of_a_text_adapter_scores_the_hand_template_as_zero_shot():
    from craft_adapter.training.evaluate import evaluate_adapter

    adapter = run_fit(2)[0].adapter
    assert adapter.template != "a photo of a {}."
    imgs = images(12)
    labels = np.array([im.tobytes()[0] % 3 for im in imgs])
    box = BlackBox(HashVendor(), imgs, CLASSES, QueryMeter())
    r = evaluate_adapter(box, labels, adapter, "a photo of a {}.")
    hand = (box.logits_text(["a photo of a {}."])[0].argmax(-1) == labels).mean()
    learned = (box.logits_text([adapter.template])[0].argmax(-1) == labels).mean()
    assert r["zero_shot_accuracy"] == hand and r["prompt_only_accuracy"] == learned
